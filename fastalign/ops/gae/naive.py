"""Reference GAE and discounted returns: the reverse loop over time, written to be read. The spec of every impl.

Padded layout: ``rewards``/``values`` ``[B, T]`` and a 0/1 ``mask``; the loop runs backward over time for all
rows at once and *skips* masked positions (the state passes through them unchanged), so left padding, right
padding and holes all work. Packed layout: 1-D tokens with ``cu_seqlens``; the sequences are scattered into a
padded batch, run through the same loop and gathered back.

Math in float32, or float64 when the inputs are float64. Outputs are 0 outside the mask.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when every given float tensor is float64, else float32 (the op's math precision)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors if t is not None) else torch.float32


def _gae_padded(rewards, values, mask, gamma, lam, bootstrap):
    dtype = compute_dtype(rewards, values)
    B, T = rewards.shape
    r = rewards.to(dtype)
    v = values.to(dtype) if values is not None else torch.zeros_like(r)
    valid = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    next_value = torch.zeros(B, dtype=dtype, device=r.device) if bootstrap is None else bootstrap.to(dtype)
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)
    adv = torch.zeros_like(r)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        # Masked positions leave the state untouched (torch.where, so a NaN there cannot leak in).
        next_adv = torch.where(valid[:, t], a_t, next_adv)
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        adv[:, t] = torch.where(valid[:, t], a_t, 0.0)
    returns = torch.where(valid, adv + v, 0.0)
    return adv, returns


def _to_padded(x, cu_seqlens):
    """Packed ``[N]`` -> padded ``[S, Lmax]`` plus its mask and the flat index of every token."""
    cu = cu_seqlens.long()
    lengths = cu.diff()
    S, L = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    seq = torch.repeat_interleave(torch.arange(S, device=x.device), lengths, output_size=x.numel())
    pos = torch.arange(x.numel(), device=x.device) - cu[seq]
    padded = torch.zeros(S, L, dtype=x.dtype, device=x.device)
    padded[seq, pos] = x
    mask = torch.zeros(S, L, dtype=torch.bool, device=x.device)
    mask[seq, pos] = True
    return padded, mask, (seq, pos)


def gae(rewards, values, mask=None, cu_seqlens=None, gamma=1.0, lam=0.95, bootstrap=None):
    """``(advantages, returns)``: ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``,
    ``R_t = A_t + V_t``, where "next" is the next valid token of the same sequence and the value after the
    last valid token is ``bootstrap[b]`` (0 when None). ``values=None`` means all-zero values."""
    if cu_seqlens is None:
        return _gae_padded(rewards, values, mask, gamma, lam, bootstrap)
    r, m, (seq, pos) = _to_padded(rewards, cu_seqlens)
    v = _to_padded(values, cu_seqlens)[0] if values is not None else None
    adv, ret = _gae_padded(r, v, m, gamma, lam, bootstrap)
    return adv[seq, pos], ret[seq, pos]


def discounted_returns(rewards, mask=None, cu_seqlens=None, gamma=1.0, bootstrap=None):
    """``G_t = r_t + gamma G_next`` over the valid tokens of each sequence, ``G`` after the last = ``bootstrap``
    (0 when None): GAE with ``lam=1`` and all-zero values."""
    return gae(rewards, None, mask, cu_seqlens, gamma, 1.0, bootstrap)[0]


def trl_style_gae(rewards, values, gamma, lam):
    """GAE as TRL's PPO trainer loops over time (no mask: padding must carry zero rewards and values).

    Kept beside the reference as the behaviour users migrate from; the tests and ``bench/bench_gae.py`` use it.
    """
    T = rewards.shape[1]
    lastgaelam, out = 0.0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


def verl_style_gae(rewards, values, mask, gamma, lam):
    """GAE as verl loops over time: the state is carried through masked positions by blending with the mask."""
    nextvalues, lastgaelam, out = 0.0, 0.0, []
    m = mask.to(rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values
