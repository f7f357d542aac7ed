from fastalign.ops.logprobs.api import LinearLogprobsFunction, LogprobsParams, linear_logprobs
from fastalign.ops.logprobs.module import LinearLogprobs, causal_lm_logprobs

__all__ = ["LinearLogprobs", "LinearLogprobsFunction", "LogprobsParams", "causal_lm_logprobs", "linear_logprobs"]
