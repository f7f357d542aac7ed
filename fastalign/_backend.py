"""Implementation dispatch: resolves ``impl="auto" | "torch" | "triton" | "cpp" | "cuda"`` in one place.

``auto`` picks ``triton`` for CUDA tensors (then ``cuda``), ``cpp`` for CPU tensors when the extension is
built, and ``torch`` (the reference) otherwise. An implementation asked for by name that is unavailable
raises :class:`ImplUnavailableError` with the reason; nothing falls back silently. Nothing here touches
CUDA or imports Triton at import time.
"""

from __future__ import annotations

import functools
import os

import torch

from fastalign import _ext

IMPLS = ("torch", "triton", "cpp", "cuda")


class ImplUnavailableError(RuntimeError):
    """An implementation was asked for by name but cannot run here (the message says why)."""


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import():
    try:
        import triton  # noqa: F401
    except Exception as e:
        return None, f"Triton is not importable ({type(e).__name__}: {e})"
    return triton.__version__, None


def availability(impl: str, device: torch.device | str) -> tuple[bool, str | None]:
    """Whether ``impl`` can run on tensors on ``device``, and if not, why."""
    device = torch.device(device)
    if impl == "torch":
        return True, None
    if impl == "triton":
        version, why = _triton_import()
        if version is None:
            return False, why
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return True, None
        if device.type == "cpu":
            return False, "Triton kernels take CUDA tensors; on the CPU they run only under TRITON_INTERPRET=1"
        return False, f"Triton kernels do not run on {device.type} tensors"
    if impl in ("cpp", "cuda"):
        ext, why = _ext.load()
        if ext is None:
            return False, why
        if impl == "cpp":
            return (True, None) if device.type == "cpu" else (False, f"the cpp impl takes CPU tensors; got {device}")
        if not ext.WITH_CUDA:
            return False, "fastalign._C was built without CUDA (see the build log for why)"
        return (True, None) if device.type == "cuda" else (False, f"the cuda impl takes CUDA tensors; got {device}")
    raise ValueError(f"impl must be one of {('auto',) + IMPLS}; got {impl!r}")


def resolve_impl(impl: str, device: torch.device | str, *, op: str, impls: tuple[str, ...] = IMPLS) -> str:
    """Resolve ``impl`` for an op that has the implementations ``impls``, for tensors on ``device``.

    Raises ``ValueError`` for an unknown name or one the op does not have, and ``ImplUnavailableError``
    when the named implementation cannot run here.
    """
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"{op}: impl must be one of {('auto',) + IMPLS}; got {impl!r}")
    device = torch.device(device)
    if impl == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
        return next(c for c in order if c in impls + ("torch",) and availability(c, device)[0])
    if impl not in impls:
        raise ValueError(f"{op}: impl={impl!r} does not exist for this op; it has {impls}")
    ok, why = availability(impl, device)
    if not ok:
        raise ImplUnavailableError(f"{op}: impl={impl!r} is unavailable: {why}")
    return impl
