"""Small shared helpers: output allocation (NaN-poisoned under test) and argument checks."""

from __future__ import annotations

import torch

_POISON = False


def set_poison(on: bool) -> None:
    """Fill every fresh output (Python and C++) with NaN / the most negative integer. For tests."""
    global _POISON
    _POISON = bool(on)
    from fastalign import _ext

    ext = _ext.get()
    if ext is not None:
        ext._set_poison(_POISON)


def new_output(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, poisoned when the test suite asks for it, so an unwritten element is caught."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON and out.numel():
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(dtype).min)
    return out


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(x, name: str, *, ndim: int | None = None, dtypes=None, min_ndim: int | None = None):
    """Raise a clear TypeError/ValueError unless ``x`` is a tensor with the given rank and dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s); got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}); got {str(x.dtype).replace('torch.', '')}")


def check_same_device(**tensors) -> torch.device:
    """Raise ValueError unless every non-None tensor is on one device; return that device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            raise ValueError(f"{items[0][0]} and {k} must be on the same device; got {device} and {v.device}")
    return device


def check_cu_seqlens(cu_seqlens, total: int, *, name: str = "cu_seqlens") -> None:
    """Validate packed-sequence offsets: 1-D int32/int64, starting at 0, non-decreasing, ending at ``total``.

    The value checks read the data, so they run only for CPU tensors (on CUDA they would cost a host sync).
    """
    check_tensor(cu_seqlens, name, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must hold at least one offset (0); got an empty tensor")
    if cu_seqlens.device.type != "cpu":
        return
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"{name} must start at 0; got {int(cu_seqlens[0])}")
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"{name} must end at the number of tokens ({total}); got {int(cu_seqlens[-1])}")
    steps = cu_seqlens.diff()
    if (steps < 0).any():
        i = int((steps < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing; got {int(cu_seqlens[i])} then {int(cu_seqlens[i + 1])} "
                         f"at position {i}")
