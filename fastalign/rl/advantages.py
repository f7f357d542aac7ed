"""Advantage estimators for PPO-style training: GAE (with a critic) and the critic-free group estimators.

Outcome estimators (``grpo``, ``dr_grpo``, ``rloo``) take one scalar score per sampled response and the group
(prompt) each response belongs to, given either as ``group_size`` (responses of a prompt are contiguous, TRL's
layout: ``scores.view(-1, group_size)``) or as ``group_ids`` (any layout, verl's ``uid``). They return one
advantage per response; pass ``mask`` ``[B, T]`` to get it broadcast over each response's valid tokens.
They are differentiable w.r.t. the scores (they are usually computed from detached scores).
"""

from __future__ import annotations

import torch

from fastalign._utils import FLOAT_DTYPES, check_tensor
from fastalign.ops.gae import discounted_returns
from fastalign.ops.gae import gae as _gae_op
from fastalign.rl.whiten import check_mask, whiten


def gae(rewards, values, *, mask=None, cu_seqlens=None, gamma=1.0, lam=0.95, bootstrap=None,
        whiten_advantages=False, process_group=None, impl="auto"):
    """GAE advantages and returns (:func:`fastalign.gae`), whitened over the valid tokens when
    ``whiten_advantages`` (across ranks with ``process_group``), as PPO with a critic uses them.

    Example:
        >>> adv, ret = gae(torch.randn(2, 5), torch.randn(2, 5), gamma=1.0, lam=0.95, whiten_advantages=True)
    """
    adv, ret = _gae_op(rewards, values, mask=mask, cu_seqlens=cu_seqlens, gamma=gamma, lam=lam,
                       bootstrap=bootstrap, impl=impl)
    if whiten_advantages:
        adv = whiten(adv, mask, process_group=process_group)
    return adv, ret


def _group_index(scores, group_size, group_ids):
    """``(index [B] in [0, G), number of groups G)`` from exactly one of group_size / group_ids."""
    check_tensor(scores, "scores", ndim=1, dtypes=FLOAT_DTYPES)
    B = scores.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (contiguous groups) or group_ids; got "
                         f"group_size={group_size!r} and group_ids={'a tensor' if group_ids is not None else None}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1; got {group_size!r}")
        if B % group_size:
            raise ValueError(f"the number of scores ({B}) must be a multiple of group_size ({group_size})")
        return torch.arange(B, device=scores.device) // group_size, B // group_size
    check_tensor(group_ids, "group_ids", ndim=1, dtypes=(torch.int32, torch.int64))
    if group_ids.shape[0] != B:
        raise ValueError(f"group_ids must be [B] with B = {B}; got shape {tuple(group_ids.shape)}")
    uniq, index = torch.unique(group_ids, return_inverse=True)
    return index, uniq.numel()


def _group_stats(scores, index, G):
    """Per-response group count, mean and unbiased std (std 1 for a group of one, whose advantage is 0)."""
    s = scores.double() if scores.dtype == torch.float64 else scores.float()
    count = torch.zeros(G, dtype=s.dtype, device=s.device).index_add(0, index, torch.ones_like(s))
    mean = torch.zeros(G, dtype=s.dtype, device=s.device).index_add(0, index, s) / count
    dev2 = (s - mean[index]) ** 2
    var = torch.zeros(G, dtype=s.dtype, device=s.device).index_add(0, index, dev2) / (count - 1).clamp(min=1)
    # sqrt has an infinite slope at 0: take it only where var > 0 (identical scores give std 0, zero gradient).
    std = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), 0.0)
    std = torch.where(count > 1, std, 1.0)
    return s, count[index], mean[index], std[index]


def _broadcast(adv, mask):
    if mask is None:
        return adv
    check_tensor(mask, "mask", ndim=2)
    if mask.shape[0] != adv.shape[0]:
        raise ValueError(f"mask must be [B, T] with B = {adv.shape[0]}; got shape {tuple(mask.shape)}")
    m = check_mask(mask, mask)
    return torch.where(m, adv[:, None], 0.0)


def grpo(scores, *, group_size=None, group_ids=None, scale_by_std=True, eps=1e-6, mask=None):
    """GRPO's group-normalized advantage: ``(score - group mean) / (group std + eps)``, or ``score - group mean``
    with ``scale_by_std=False`` (TRL's ``scale_rewards=False``). std is unbiased (``torch.std``'s default);
    a group of one response gets advantage 0.

    Same as ``(s - s.view(-1, G).mean(1).repeat_interleave(G)) / (s.view(-1, G).std(1).repeat_interleave(G) + eps)``.

    Args:
        scores: ``[B]`` one score per response. group_size / group_ids: the groups (see the module docstring).
        mask: optional ``[B, T]``: return the advantages broadcast over each response's valid tokens.

    Returns:
        ``[B]`` (or ``[B, T]`` with ``mask``) float32 (float64 for float64 scores).

    Example:
        >>> grpo(torch.tensor([1., 0., 3., 3.]), group_size=2)
        tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    index, G = _group_index(scores, group_size, group_ids)
    s, _, mean, std = _group_stats(scores, index, G)
    adv = s - mean
    if scale_by_std:
        adv = adv / (std + eps)
    return _broadcast(adv, mask)


def dr_grpo(scores, *, group_size=None, group_ids=None, mask=None):
    """Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-like training"): ``score - group mean``,
    without the std scaling that biases GRPO towards too easy / too hard prompts. Pair it with a loss
    aggregation that does not divide by response length (``agg="seq-mean-token-sum"`` in
    :func:`fastalign.losses.ppo.ppo_policy_loss`).

    Example:
        >>> dr_grpo(torch.tensor([1., 0., 3., 3.]), group_size=2)
        tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    return grpo(scores, group_size=group_size, group_ids=group_ids, scale_by_std=False, mask=mask)


def rloo(scores, *, group_size=None, group_ids=None, mask=None):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): ``score_i - mean_{j != i} score_j`` within each group,
    which equals ``G / (G - 1) * (score_i - group mean)``; a group of one response gets advantage 0.

    Example:
        >>> rloo(torch.tensor([1., 0., 2., 3., 4., 5.]), group_size=3)
        tensor([ 0.0000, -1.5000,  1.5000, -1.5000,  0.0000,  1.5000])
    """
    index, G = _group_index(scores, group_size, group_ids)
    s, count, mean, _ = _group_stats(scores, index, G)
    adv = torch.where(count > 1, (s - mean) * count / (count - 1).clamp(min=1), 0.0)
    return _broadcast(adv, mask)


def reinforce_pp(token_rewards, mask, *, gamma=1.0, group_size=None, group_ids=None, process_group=None,
                 impl="auto"):
    """REINFORCE++ (Hu 2025) advantages ``[B, T]``: per-token rewards (the score on the last token, minus the
    per-token KL penalty, e.g. from :func:`fastalign.rl.kl_penalized_rewards`) ...

    - without a baseline (no groups given): discounted returns ``G_t = r_t + gamma G_{t+1}`` over the valid
      tokens (:func:`fastalign.discounted_returns`), whitened over the whole batch's valid tokens;
    - with a baseline (``group_size`` or ``group_ids``: REINFORCE++-baseline): each response's total reward
      minus its group's mean, broadcast over its tokens, then whitened over the batch (``gamma`` unused).

    Whitening is all-reduced across ``process_group``. Computed without gradient (targets).

    Example:
        >>> r = torch.tensor([[0., 0., 1.], [0., 2., 0.]]); m = torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> adv = reinforce_pp(r, m, gamma=1.0)
    """
    check_tensor(token_rewards, "token_rewards", ndim=2, dtypes=FLOAT_DTYPES)
    m = check_mask(mask, token_rewards)
    with torch.no_grad():
        if group_size is None and group_ids is None:
            returns = discounted_returns(token_rewards, mask=m, gamma=gamma, impl=impl)
        else:
            totals = torch.where(m, token_rewards.float(), 0.0).sum(1)
            returns = dr_grpo(totals, group_size=group_size, group_ids=group_ids, mask=m)
        return whiten(returns, m, process_group=process_group)
