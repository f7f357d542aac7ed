"""fastalign: fused kernels and a lean trainer for aligning language models with human preferences.

Importing never fails and never touches CUDA: a missing compiled extension or Triton only makes those
implementations unavailable (``python -m fastalign.env`` says which and why).
"""

from fastalign._backend import ImplUnavailableError, availability, resolve_impl
from fastalign._version import __version__
from fastalign.hf import causal_lm_logprobs
from fastalign.losses.dpo import BCORunningMean, dpo_loss
from fastalign.losses.fused_dpo import FusedLinearDPOLoss, fused_linear_dpo_loss
from fastalign.losses.ppo import fused_linear_ppo_loss, ppo_policy_loss, ppo_value_loss
from fastalign.losses.reward import reward_model_loss
from fastalign.ops.gae import discounted_returns, gae
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.logprobs.module import LinearLogprobs
from fastalign.ops.segment_sum import segment_sum

__all__ = [
    "BCORunningMean",
    "FusedLinearDPOLoss",
    "ImplUnavailableError",
    "LinearLogprobs",
    "__version__",
    "availability",
    "discounted_returns",
    "fused_linear_ppo_loss",
    "gae",
    "dpo_loss",
    "fused_linear_dpo_loss",
    "causal_lm_logprobs",
    "linear_logprobs",
    "ppo_policy_loss",
    "ppo_value_loss",
    "resolve_impl",
    "reward_model_loss",
    "segment_sum",
]
