"""The PPO family of losses: clipped policy loss (clip-higher, dual-clip), clipped value loss, entropy bonus,
KL term, loss aggregation modes, and a fused token-level policy loss from hidden states + LM-head weight.

Per-token inputs come padded (``[B, T]`` with a 0/1 ``mask``) or packed (``[N]`` tokens with int32/int64
``cu_seqlens``, and an optional ``[N]`` mask). Metrics are returned as detached 0-dim tensors (no host sync),
named as TRL names them.
"""

from __future__ import annotations

import math

import torch

from fastalign._utils import FLOAT_DTYPES, check_cu_seqlens, check_tensor
from fastalign.rl.kl import kl_estimate
from fastalign.rl.whiten import check_mask

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: the log-ratio is clamped before exp so a stale logprob cannot overflow


def _acc(x):
    return x.double() if x.dtype == torch.float64 else x.float()


def _valid(x, mask, cu_seqlens):
    """The bool mask of valid tokens of ``x`` (all valid when ``mask`` is None), after checking the layout."""
    if cu_seqlens is not None:
        if x.dim() != 1:
            raise ValueError(f"per-token inputs must be 1-D packed tokens with cu_seqlens; got shape {tuple(x.shape)}")
        check_cu_seqlens(cu_seqlens, x.numel())
    elif x.dim() < 1:
        raise ValueError("per-token inputs must be [B, T] (or [N] tokens); got a 0-d tensor")
    m = check_mask(mask, x)
    return torch.ones_like(x, dtype=torch.bool) if m is None else m


def aggregate(loss: torch.Tensor, mask: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
              mode: str = "token-mean") -> torch.Tensor:
    """Reduce per-token losses to a scalar over the valid tokens.

    - ``token-mean``: ``sum(loss * mask) / sum(mask)`` (every token weighs the same; TRL, verl's default);
    - ``seq-mean-token-sum``: the mean over sequences of each sequence's token sum (no length normalization:
      Dr. GRPO's recommendation);
    - ``seq-mean-token-mean``: the mean over sequences of each sequence's token mean (GRPO's original).

    Sequences without valid tokens do not count in the sequence means. Masked elements never reach the result
    (a NaN there is ignored). ``loss``: ``[B, T]`` (rows are sequences; any leading dims are flattened) with
    ``mask``, or ``[N]`` with ``cu_seqlens`` (a 1-D ``loss`` without ``cu_seqlens`` is one sequence).

    Example:
        >>> aggregate(torch.tensor([[1., 3.], [5., 0.]]), torch.tensor([[1, 1], [1, 0]]), mode="seq-mean-token-mean")
        tensor(3.5000)
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg mode must be one of {AGG_MODES}; got {mode!r}")
    m = _valid(loss, mask, cu_seqlens)
    x = torch.where(m, _acc(loss), 0.0)
    mf = m.to(x.dtype)
    if mode == "token-mean":
        return x.sum() / mf.sum().clamp(min=1)
    if cu_seqlens is not None:
        from fastalign.ops.segment_sum import segment_sum

        seq_sum, seq_count = segment_sum(x, cu_seqlens).to(x.dtype), segment_sum(mf, cu_seqlens).to(x.dtype)
    else:
        x2, m2 = x.reshape(-1, x.shape[-1]), mf.reshape(-1, x.shape[-1])
        seq_sum, seq_count = x2.sum(-1), m2.sum(-1)
    per_seq = seq_sum if mode == "seq-mean-token-sum" else seq_sum / seq_count.clamp(min=1)
    has = seq_count > 0
    return torch.where(has, per_seq, 0.0).sum() / has.sum().clamp(min=1)


def _select(x, m):
    """``x`` in the accumulation dtype with its masked-out elements replaced by 0, before any arithmetic: a NaN or
    inf there (padding) then reaches neither a value nor a gradient (a select after the arithmetic would leave
    ``0 * NaN`` in the backward)."""
    return torch.where(m, _acc(x), 0.0)


def _masked_mean(x, m):
    x = x.detach()
    return torch.where(m, _acc(x), 0.0).sum() / m.sum().clamp(min=1)


def _check_same_shape(ref_name, ref, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(t, name, dtypes=FLOAT_DTYPES)
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}; got {tuple(t.shape)}")


def _check_clip(clip_low, clip_high, dual_clip):
    if not (0 <= clip_low < 1):
        raise ValueError(f"clip_low must be in [0, 1); got {clip_low}")
    if not (math.isfinite(clip_high) and clip_high >= 0):
        raise ValueError(f"clip_high must be a finite number >= 0; got {clip_high}")
    if dual_clip is not None and not (math.isfinite(dual_clip) and dual_clip > 1):
        raise ValueError(f"dual_clip must be None or a finite number > 1; got {dual_clip}")


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                    clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                    agg: str = "token-mean", entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                    kl_clamp: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate policy loss, with clip-higher, dual-clip, entropy bonus and a KL loss term.

    Per token, with ``ratio = exp(logprobs - old_logprobs)`` (log-ratio clamped to [-20, 20]) and ``A`` the
    advantage::

        pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        pg = min(pg, -A * dual_clip)  where A < 0          # dual-clip (Ye et al. 2020), when given
        loss = agg(pg) - entropy_coef * agg(entropy) + kl_coef * agg(kl(logprobs, ref_logprobs))

    ``clip_high`` defaults to ``clip_low`` (DAPO's clip-higher sets it larger, e.g. 0.28). ``agg`` is one of
    :data:`AGG_MODES` (see :func:`aggregate`). Gradients flow to ``logprobs`` and ``entropy``. Masked-out
    positions may hold anything (NaN and inf included): they reach neither the loss, the metrics nor a gradient.

    Args:
        logprobs, old_logprobs, advantages: ``[B, T]`` (with ``mask``) or ``[N]`` (with ``cu_seqlens``).
        entropy: optional per-token entropy, same shape (for the bonus and its metric).
        ref_logprobs: optional reference logprobs for the KL term (``kl_kind`` k1/k2/k3, ``kl_clamp``).

    Returns:
        ``(loss, metrics)``: a scalar float32 loss (float64 for float64 inputs) and detached 0-dim metrics:
        ``loss/policy_avg``, ``policy/approxkl_avg`` (``0.5 * mean(log_ratio**2)``), ``policy/clipfrac_avg``,
        ``val/ratio``, ``val/ratio_var``, and when they apply ``policy/dual_clipfrac_avg``,
        ``policy/entropy_avg``, ``objective/kl``.

    Example:
        >>> lp = torch.randn(2, 4, requires_grad=True)
        >>> loss, metrics = ppo_policy_loss(lp, lp.detach() + 0.1, torch.randn(2, 4), torch.ones(2, 4))
        >>> loss.backward()
    """
    check_tensor(logprobs, "logprobs", dtypes=FLOAT_DTYPES)
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, entropy=entropy,
                      ref_logprobs=ref_logprobs)
    clip_high = clip_low if clip_high is None else clip_high
    _check_clip(clip_low, clip_high, dual_clip)
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}; got {agg!r}")
    m = _valid(logprobs, mask, cu_seqlens)
    lp, old, adv = _select(logprobs, m), _select(old_logprobs, m).detach(), _select(advantages, m).detach()
    log_ratio = (lp - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    metrics = {}
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        metrics["policy/dual_clipfrac_avg"] = _masked_mean(((adv < 0) & (pg > pg3)).to(pg.dtype), m)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    policy_loss = aggregate(pg, m, cu_seqlens=cu_seqlens, mode=agg)
    loss = policy_loss
    metrics["loss/policy_avg"] = policy_loss.detach()
    metrics["policy/approxkl_avg"] = 0.5 * _masked_mean(log_ratio**2, m)
    metrics["policy/clipfrac_avg"] = _masked_mean((pg2 > pg1).to(pg.dtype), m)
    ratio_mean = _masked_mean(ratio, m)
    metrics["val/ratio"] = ratio_mean
    metrics["val/ratio_var"] = _masked_mean((ratio.detach() - ratio_mean) ** 2, m)
    if entropy is not None:
        entropy = _select(entropy, m)
        metrics["policy/entropy_avg"] = _masked_mean(entropy, m)
        if entropy_coef:
            loss = loss - entropy_coef * aggregate(entropy, m, cu_seqlens=cu_seqlens, mode=agg)
    if ref_logprobs is not None:
        kl = kl_estimate(lp, _select(ref_logprobs, m).detach(), kl_kind, kl_clamp)
        metrics["objective/kl"] = _masked_mean(kl, m)
        if kl_coef:
            loss = loss + kl_coef * aggregate(kl, m, cu_seqlens=cu_seqlens, mode=agg)
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor | None = None, *, cu_seqlens: torch.Tensor | None = None,
                   clip: float | None = 0.2, agg: str = "token-mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss ``0.5 * agg(max((V - R)^2, (V_clipped - R)^2))`` with
    ``V_clipped = old_V + clamp(V - old_V, -clip, clip)``; ``clip=None`` gives the plain MSE ``0.5 * agg((V - R)^2)``.

    Same as TRL's ``vf_loss`` (``cliprange_value``). Gradients flow to ``values``. Masked-out positions may hold
    anything (NaN and inf included): they reach neither the loss, the metrics nor a gradient.

    Returns:
        ``(loss, metrics)`` with ``loss/value_avg``, ``val/clipfrac_avg``, ``val/vpred``, ``val/error``.

    Example:
        >>> v = torch.randn(2, 4, requires_grad=True)
        >>> loss, metrics = ppo_value_loss(v, v.detach() + 0.3, torch.randn(2, 4), clip=0.2)
    """
    check_tensor(values, "values", dtypes=FLOAT_DTYPES)
    _check_same_shape("values", values, old_values=old_values, returns=returns)
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be None (plain MSE) or a finite number > 0; got {clip}")
    m = _valid(values, mask, cu_seqlens)
    v, old, ret = _select(values, m), _select(old_values, m).detach(), _select(returns, m).detach()
    vf1 = (v - ret) ** 2
    if clip is None:
        vf, clipfrac = vf1, torch.zeros((), dtype=v.dtype, device=v.device)
    else:
        vf2 = (old + (v - old).clamp(-clip, clip) - ret) ** 2
        vf = torch.maximum(vf1, vf2)
        clipfrac = _masked_mean((vf2 > vf1).to(v.dtype), m)
    loss = 0.5 * aggregate(vf, m, cu_seqlens=cu_seqlens, mode=agg)
    metrics = {"loss/value_avg": loss.detach(), "val/clipfrac_avg": clipfrac, "val/vpred": _masked_mean(v, m),
               "val/error": _masked_mean(vf1, m)}
    return loss, metrics


def fused_linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None, *,
                          bias: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                          temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                          ignore_index: int = -100, clip_low: float = 0.2, clip_high: float | None = None,
                          dual_clip: float | None = None, agg: str = "token-mean", entropy_coef: float = 0.0,
                          ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "k3",
                          kl_clamp: float | None = None, impl: str = "auto"):
    """Token-level PPO policy loss straight from the final hidden states and the LM-head weight.

    Same as materializing ``logits = hidden @ weight.T`` (with the logit processing of
    :func:`fastalign.linear_logprobs`), taking ``log_softmax(logits).gather(targets)`` and the entropy, then
    :func:`ppo_policy_loss`; built on ``linear_logprobs(..., return_entropy=True)``, so the fused impls never
    build the ``[tokens, vocab]`` logits. Tokens whose target is ``ignore_index`` are excluded like masked ones.
    Entropy is computed only when ``entropy_coef`` is nonzero. Tokens clipped where the clip binds have zero
    gradient; the ``cpp`` impl's backward leaves them out (its cost falls with the clip fraction).

    Args:
        hidden: ``[B, T, D]`` (padded, with ``mask`` ``[B, T]``) or ``[N, D]`` (packed, with ``cu_seqlens``).
        weight: ``[V, D]``; bias: optional ``[V]``; targets: ``[B, T]`` / ``[N]`` token ids.
        old_logprobs, advantages (and ``ref_logprobs``): per token, shaped like ``targets``.
        impl: the ``linear_logprobs`` implementation; the loss is the same whichever runs.
        The remaining options are :func:`ppo_policy_loss`'s and :func:`fastalign.linear_logprobs`'s.

    Returns:
        ``(loss, metrics)`` as :func:`ppo_policy_loss`; differentiable w.r.t. ``hidden``, ``weight``, ``bias``.

    Example:
        >>> h, W = torch.randn(2, 5, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> loss, metrics = fused_linear_ppo_loss(h, W, y, torch.randn(2, 5) - 5, torch.randn(2, 5))
        >>> loss.backward()
    """
    from fastalign.ops.logprobs import linear_logprobs

    check_tensor(targets, "targets", dtypes=(torch.int32, torch.int64))
    _check_same_shape("targets", targets, old_logprobs=old_logprobs, advantages=advantages,
                      ref_logprobs=ref_logprobs)
    want_entropy = bool(entropy_coef)
    out = linear_logprobs(hidden, weight, targets, bias, temperature=temperature, softcap=softcap,
                          logit_scale=logit_scale, ignore_index=ignore_index, return_entropy=want_entropy,
                          impl=impl)
    logprobs, entropy = out if want_entropy else (out, None)
    m = _valid(targets, mask, cu_seqlens) & (targets != ignore_index)
    return ppo_policy_loss(logprobs, old_logprobs, advantages, m, cu_seqlens=cu_seqlens, clip_low=clip_low,
                           clip_high=clip_high, dual_clip=dual_clip, agg=agg, entropy=entropy,
                           entropy_coef=entropy_coef, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind,
                           kl_clamp=kl_clamp)
