from fastalign.ops.logprobs.api import LinearLogprobsFunction, LogprobsParams, linear_logprobs
from fastalign.ops.logprobs.module import LinearLogprobs

__all__ = ["LinearLogprobs", "LinearLogprobsFunction", "LogprobsParams", "linear_logprobs"]
