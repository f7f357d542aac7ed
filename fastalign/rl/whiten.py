"""Masked whitening (advantage normalization), optionally all-reduced across the ranks of a process group."""

from __future__ import annotations

import torch

from fastalign._utils import FLOAT_DTYPES, check_same_device, check_tensor


def _all_reduce_sum(x: torch.Tensor, process_group) -> torch.Tensor:
    """Differentiable sum over the ranks of ``process_group`` (no-op without one)."""
    if process_group is None:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, group=process_group)


def check_mask(mask, x, name: str = "mask") -> torch.Tensor | None:
    """Validate an optional 0/1 mask shaped like ``x`` and return it as bool (values checked on CPU only)."""
    if mask is None:
        return None
    check_tensor(mask, name)
    if mask.shape != x.shape:
        raise ValueError(f"{name} must have the shape {tuple(x.shape)}; got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.device.type == "cpu" and ((mask != 0) & (mask != 1)).any():
            bad = ((mask != 0) & (mask != 1)).nonzero()[0].tolist()
            raise ValueError(f"{name} must hold only 0 and 1; got {mask[tuple(bad)].item()} at index {tuple(bad)}")
        mask = mask != 0
    return mask


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, *, unbiased: bool = True,
           eps: float = 1e-8, process_group=None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the valid elements of ``x`` (all ranks' when a group is given).

    Same as TRL's ``masked_whiten(x, mask, shift_mean)``: with ``shift_mean=False`` the mean is added back
    (only the scale changes). ``unbiased`` uses the ``n - 1`` variance. With ``process_group``, the count, the sum
    and the sum of squared deviations are all-reduced, so every rank gets exactly the whitening of the
    concatenation of all ranks' valid elements. Differentiable w.r.t. ``x``. Elements outside the mask are 0 and get
    zero gradient, whatever they hold (NaN and inf included).

    Args:
        x: any shape, floating. mask: 0/1 (bool, integer or float) of ``x``'s shape; None = all valid.
        process_group: a ``torch.distributed`` group, or None for this process alone.

    Example:
        >>> whiten(torch.tensor([1., 2., 3., 100.]), torch.tensor([1, 1, 1, 0]))
        tensor([-1.,  0.,  1.,  0.])
    """
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    mask = check_mask(mask, x)
    check_same_device(x=x, mask=mask)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    # Masked-out elements are replaced by 0 before any arithmetic: a NaN/inf there then reaches neither the value
    # nor the gradient (selecting after the arithmetic would leave 0 * NaN in the backward of (x - mean)^2).
    xm = torch.where(m, x.to(acc), 0.0)
    stats = _all_reduce_sum(torch.stack([m.sum().to(acc), xm.sum()]), process_group)
    count, mean = stats[0], stats[1] / stats[0].clamp(min=1)
    sq = _all_reduce_sum(torch.where(m, (xm - mean) ** 2, 0.0).sum(), process_group)
    var = sq / (count - 1 if unbiased else count).clamp(min=1)
    out = (xm - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0).to(x.dtype)
