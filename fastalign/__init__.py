"""fastalign: fused kernels and a lean trainer for aligning language models with human preferences.

Importing never fails and never touches CUDA: a missing compiled extension or Triton only makes those
implementations unavailable (``python -m fastalign.env`` says which and why).
"""

from fastalign._backend import ImplUnavailableError, availability, resolve_impl
from fastalign._version import __version__
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.logprobs.module import LinearLogprobs, causal_lm_logprobs
from fastalign.ops.segment_sum import segment_sum

__all__ = [
    "ImplUnavailableError",
    "LinearLogprobs",
    "__version__",
    "availability",
    "causal_lm_logprobs",
    "linear_logprobs",
    "resolve_impl",
    "segment_sum",
]
