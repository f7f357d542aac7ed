"""gae and discounted_returns: generalized advantage estimation and REINFORCE returns in one kernel family.

Layers (STYLE.md 2): the impl modules' launchers ``gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, gamma,
lam) -> (advantages, returns | None)`` (``triton.py``, ``cpu.py``, ``cuda.py``; ``values=None`` gives the
discounted returns in ``advantages``) -> the public functions here (validation, docs, dispatch). There is no
autograd Function: advantages and returns are regression/policy-gradient *targets*, computed without gradient
(as every PPO trainer does under ``torch.no_grad()``), so the outputs never require grad. The triton, cpp and
cuda launchers are torch.library ops with fake impls (``fastalign::gae_triton`` / ``fastalign::gae`` and their
``discounted_returns`` twins), so ``torch.compile(fullgraph=True)`` traces each call as one op.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from fastalign._backend import resolve_impl
from fastalign._utils import FLOAT_DTYPES, check_cu_seqlens, check_same_device, check_tensor
from fastalign.ops.gae import naive

IMPLS = ("torch", "triton", "cpp", "cuda")
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOAT_DTYPES


@dataclass(frozen=True)
class GaeParams:
    """Non-tensor options of gae / discounted_returns."""

    gamma: float = 1.0
    lam: float = 0.95
    impl: str = "torch"


def _check_unit(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1]; got {type(x).__name__}")
    x = float(x)
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be in [0, 1]; got {x}")
    return x


def _offsets_from_sequence(cu_seqlens, device) -> torch.Tensor:
    """``cu_seqlens`` given as a list/tuple of Python ints -> an int64 tensor on the device of ``rewards``."""
    for i, x in enumerate(cu_seqlens):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"cu_seqlens given as a {type(cu_seqlens).__name__} must hold ints; got "
                            f"{type(x).__name__} {x!r} at position {i}")
    return torch.tensor([int(x) for x in cu_seqlens], dtype=torch.int64, device=device)


def _check_zero_one(mask: torch.Tensor) -> None:
    """Raise unless every element of a (CPU) mask is 0 or 1: the check the cpp kernel makes in its own pass."""
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        at = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"mask must hold only 0 and 1; got {mask[at].item()} at index {at}")


def _prepare(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam, impl, op):
    """Validate, then return contiguous kernel inputs (the mask in its own dtype, float32 bootstrap) and the
    params."""
    check_tensor(rewards, "rewards", dtypes=FLOAT_DTYPES)
    if isinstance(cu_seqlens, (list, tuple)):
        cu_seqlens = _offsets_from_sequence(cu_seqlens, rewards.device)
    if values is not None:
        check_tensor(values, "values", dtypes=FLOAT_DTYPES)
        if values.shape != rewards.shape:
            raise ValueError(f"values must have the shape of rewards {tuple(rewards.shape)}; "
                             f"got {tuple(values.shape)}")
    gamma, lam = _check_unit(gamma, "gamma"), _check_unit(lam, "lam")
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards must be [B, T] (or 1-D packed tokens with cu_seqlens); "
                             f"got shape {tuple(rewards.shape)}")
        num_seqs = rewards.shape[0]
        if mask is not None:
            check_tensor(mask, "mask", dtypes=MASK_DTYPES)
            if mask.shape != rewards.shape:
                raise ValueError(f"mask must have the shape of rewards {tuple(rewards.shape)}; "
                                 f"got {tuple(mask.shape)}")
    else:
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be 1-D packed tokens with cu_seqlens; got shape {tuple(rewards.shape)}")
        if mask is not None:
            raise ValueError("mask must be None with cu_seqlens (packed tokens are all valid); got a tensor")
        # Only the static checks here (a meta copy: reading the values is a data-dependent branch that
        # torch.compile cannot trace): the ops (triton, cpp, cuda) check the offsets' values themselves, and the
        # torch impl (no op) gets its value check below.
        check_cu_seqlens(cu_seqlens.to("meta"), rewards.numel())
        num_seqs = cu_seqlens.numel() - 1
    if bootstrap is not None:
        check_tensor(bootstrap, "bootstrap", ndim=1, dtypes=FLOAT_DTYPES)
        if bootstrap.shape[0] != num_seqs:
            raise ValueError(f"bootstrap must have one value per sequence ({num_seqs}); "
                             f"got shape {tuple(bootstrap.shape)}")
    device = check_same_device(rewards=rewards, values=values, mask=mask, cu_seqlens=cu_seqlens,
                               bootstrap=bootstrap)
    impl = resolve_impl(impl, device, op=op, impls=IMPLS)
    # Every impl reads the mask in its own dtype (no conversion pass): nonzero = valid. The cpp kernel checks for
    # values other than 0/1 in the same pass; for the torch impl and Triton on CPU (interpreted) it is checked
    # here; on CUDA it is not checked (a host sync).
    if mask is not None and mask.dtype != torch.bool and device.type == "cpu" and impl != "cpp":
        _check_zero_one(mask)
    if cu_seqlens is not None and impl == "torch":
        check_cu_seqlens(cu_seqlens, rewards.numel())
    if values is not None and values.dtype != rewards.dtype and impl in ("cpp", "cuda"):
        # The compiled kernels read one input dtype; mixed inputs (rare) are promoted to float32 first.
        rewards, values = rewards.float(), values.float()
    contig = lambda t: None if t is None else t.contiguous()
    boot = None if bootstrap is None else bootstrap.float().contiguous()
    return (contig(rewards), contig(values), contig(mask), contig(cu_seqlens), boot,
            GaeParams(gamma=gamma, lam=lam, impl=impl))


def _gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, params: GaeParams):
    if params.impl == "torch":
        adv, ret = naive.gae(rewards, values, mask, cu_seqlens, params.gamma, params.lam, bootstrap)
        return adv.float(), None if values is None else ret.float()
    if params.impl == "triton":
        from fastalign.ops.gae.triton import gae_fwd
    elif params.impl == "cuda":
        from fastalign.ops.gae.cuda import gae_fwd
    else:
        from fastalign.ops.gae.cpu import gae_fwd
    return gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, params.gamma, params.lam)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, *, mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 0.95,
        bootstrap: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over padded or packed sequences, in one kernel.

    Replaces the reverse Python loop of PPO trainers::

        lastgaelam, next_value = 0, bootstrap          # per sequence
        for t in reversed(range(T)):                   # over valid tokens only
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages[:, t], next_value = lastgaelam, values[:, t]
        returns = advantages + values

    Masked positions are skipped (the state passes through them), so left padding, right padding and holes all
    work; the value after a sequence's last valid token is 0, or ``bootstrap[b]`` for a truncated sequence.
    Math in float32 whatever the input dtype; outputs are 0 outside the mask. The outputs carry no gradient
    (they are targets). Whitening is separate: :func:`fastalign.rl.whiten`.

    Args:
        rewards: ``[B, T]`` per-token rewards (padded), or ``[N]`` packed tokens with ``cu_seqlens``.
        values: the critic's values, same shape as ``rewards``.
        mask: padded layout only: ``[B, T]`` 0/1 marking valid tokens, in any of bool, uint8, int8, int16, int32,
            int64 (a Hugging Face ``attention_mask``), float16, bfloat16, float32, float64; None = all valid. It is
            read in its own dtype (no conversion pass), and every dtype gives bitwise the same outputs. A value
            other than 0/1 (NaN included; -0.0 is 0) raises on CPU tensors; on CUDA it is not checked (no host
            sync) and any nonzero counts as valid.
        cu_seqlens: packed layout: ``[S + 1]`` int32/int64 offsets (start at 0, non-decreasing, end at ``N``;
            checked on CPU tensors only), or a list/tuple of ints (made an int64 tensor on ``rewards``' device).
        gamma: discount in [0, 1]. lam: GAE lambda in [0, 1].
        bootstrap: ``[B]`` (or ``[S]``) value after each sequence's last valid token; None = 0 (terminated).
        impl: ``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"`` or ``"cuda"`` (see ``fastalign._backend``).

    Returns:
        ``(advantages, returns)``, float32, shaped like ``rewards``.

    NaN: a NaN reward or value at a valid position makes that sequence's advantages and returns NaN at that
    position and every earlier valid position; later positions, other sequences and masked positions are
    unaffected (a NaN at a masked position is ignored).

    Example:
        >>> r, v = torch.tensor([[0., 0., 1.]]), torch.tensor([[.5, .5, .5]])
        >>> adv, ret = gae(r, v, gamma=1.0, lam=1.0)    # lam=1: returns are the reward-to-go
        >>> ret
        tensor([[1., 1., 1.]])
    """
    if values is None:
        raise TypeError("values must be a torch.Tensor; got None (use discounted_returns for value-free returns)")
    rewards, values, mask, cu_seqlens, bootstrap, params = _prepare(rewards, values, mask, cu_seqlens, bootstrap,
                                                                     gamma, lam, impl, "gae")
    return _gae_fwd(rewards, values, mask, cu_seqlens, bootstrap, params)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, *, mask: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None, gamma: float = 1.0,
                       bootstrap: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma G_next`` per sequence (REINFORCE-style estimators).

    Same kernel family and layouts as :func:`gae` (it is GAE with ``lam=1`` and zero values). Replaces::

        running = bootstrap                            # per sequence, 0 when None
        for t in reversed(range(T)):                   # over valid tokens only
            running = rewards[:, t] + gamma * running
            returns[:, t] = running

    Args:
        rewards: ``[B, T]`` padded (with optional 0/1 ``mask``) or ``[N]`` packed with ``cu_seqlens``.
        mask, cu_seqlens, bootstrap, impl: as in :func:`gae`. gamma: discount in [0, 1].

    Returns:
        ``[B, T]`` (or ``[N]``) float32, 0 outside the mask; no gradient.

    Example:
        >>> discounted_returns(torch.tensor([[1., 1., 1., 0.]]), mask=torch.tensor([[1, 1, 1, 0]]), gamma=0.5)
        tensor([[1.7500, 1.5000, 1.0000, 0.0000]])
    """
    rewards, _, mask, cu_seqlens, bootstrap, params = _prepare(rewards, None, mask, cu_seqlens, bootstrap,
                                                                gamma, 1.0, impl, "discounted_returns")
    return _gae_fwd(rewards, None, mask, cu_seqlens, bootstrap, params)[0]
