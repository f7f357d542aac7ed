from fastalign.ops.logprobs.api import linear_logprobs

__all__ = ["linear_logprobs"]
