"""KL estimators between the policy and a reference policy from per-token log-probabilities (Schulman's k1/k2/k3).

With ``log_ratio = logprobs - ref_logprobs`` (sampled from the policy): ``k1 = log_ratio`` (unbiased, high
variance, can be negative), ``k2 = log_ratio**2 / 2`` (biased, low variance; its gradient is the KL's),
``k3 = exp(-log_ratio) - 1 + log_ratio`` (unbiased, always >= 0, low variance; GRPO's loss term).
"""

from __future__ import annotations

import torch

from fastalign._utils import FLOAT_DTYPES, check_same_device, check_tensor

KINDS = ("k1", "k2", "k3")
K3_LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: beyond it k3 is dominated by rounding; clamp the log-ratio first


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3",
                clamp: float | None = None) -> torch.Tensor:
    """Per-token KL estimate ``[...]`` of ``KL(policy || reference)``; differentiable w.r.t. both inputs.

    Replaces ``logprobs - ref_logprobs`` (k1), ``0.5 * (logprobs - ref_logprobs) ** 2`` (k2) and
    ``torch.exp(ref_logprobs - logprobs) - 1 - (ref_logprobs - logprobs)`` (k3). For k3 the log-ratio is
    clamped to ``[-20, 20]`` so the exponential cannot overflow. ``clamp`` (> 0) clamps the estimate to
    ``[-clamp, clamp]`` (verl's ``low_var_kl`` uses k3 with ``clamp=10``).

    Use as reward shaping (``rewards = score - beta * kl``, see :func:`kl_penalized_rewards`) with the inputs
    detached, or as a loss term (``beta * masked_mean(kl)``) with gradient through ``logprobs``.

    Example:
        >>> kl_estimate(torch.tensor([-1.0]), torch.tensor([-1.5]), "k3")
        tensor([0.1065])
    """
    check_tensor(logprobs, "logprobs", dtypes=FLOAT_DTYPES)
    check_tensor(ref_logprobs, "ref_logprobs", dtypes=FLOAT_DTYPES)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have the shape of logprobs {tuple(logprobs.shape)}; "
                         f"got {tuple(ref_logprobs.shape)}")
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be None or > 0; got {clamp}")
    log_ratio = logprobs.float() - ref_logprobs.float() if logprobs.dtype != torch.float64 else \
        logprobs - ref_logprobs.double()
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        lr = log_ratio.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        kl = torch.expm1(-lr) + lr
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def k1(logprobs, ref_logprobs, clamp=None):
    """``logprobs - ref_logprobs`` (see :func:`kl_estimate`)."""
    return kl_estimate(logprobs, ref_logprobs, "k1", clamp)


def k2(logprobs, ref_logprobs, clamp=None):
    """``0.5 * (logprobs - ref_logprobs) ** 2`` (see :func:`kl_estimate`)."""
    return kl_estimate(logprobs, ref_logprobs, "k2", clamp)


def k3(logprobs, ref_logprobs, clamp=None):
    """``exp(ref - logprobs) - 1 - (ref - logprobs)``, log-ratio clamped to [-20, 20] (see :func:`kl_estimate`)."""
    return kl_estimate(logprobs, ref_logprobs, "k3", clamp)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float, kind: str = "k1",
                         clamp: float | None = None) -> torch.Tensor:
    """Per-token rewards for PPO: ``-beta * kl_t`` on every valid token, plus the sequence's score on its last
    valid token (TRL's and OpenRLHF's reward shaping). Computed without gradient.

    Args:
        scores: ``[B]`` reward-model scores. logprobs, ref_logprobs, mask: ``[B, T]``. beta: KL coefficient >= 0.

    Returns:
        ``[B, T]`` float32 rewards, 0 outside the mask (a sequence without valid tokens gets no score).

    Example:
        >>> m = torch.tensor([[1, 1, 0]])
        >>> kl_penalized_rewards(torch.tensor([2.]), torch.zeros(1, 3), torch.zeros(1, 3), m, beta=0.1)
        tensor([[0., 2., 0.]])
    """
    from fastalign.rl.whiten import check_mask

    check_tensor(scores, "scores", ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor(logprobs, "logprobs", ndim=2, dtypes=FLOAT_DTYPES)
    if scores.shape[0] != logprobs.shape[0]:
        raise ValueError(f"scores must be [B] with B = logprobs.shape[0] = {logprobs.shape[0]}; "
                         f"got shape {tuple(scores.shape)}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0; got {beta}")
    m = check_mask(mask, logprobs)
    with torch.no_grad():
        rewards = torch.where(m, -beta * kl_estimate(logprobs, ref_logprobs, kind, clamp).float() + 0.0, 0.0)
        T = m.shape[1]
        last = torch.where(m, torch.arange(T, device=m.device), -1).amax(dim=1)  # -1: no valid token
        has = last >= 0
        rows = torch.arange(m.shape[0], device=m.device)[has]
        rewards[rows, last[has]] += scores[has].float()
    return rewards
