"""Test helpers shared by the test suite and by users checking their own kernels against references."""

from __future__ import annotations

import contextlib

import torch

from fastalign._utils import set_poison


@contextlib.contextmanager
def poisoned_outputs(on: bool = True):
    """Within the block, fresh op outputs (Python and C++) are filled with NaN so unwritten elements show."""
    from fastalign import _utils

    previous = _utils._POISON
    set_poison(on)
    try:
        yield
    finally:
        set_poison(previous)


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None, *,
                        atol: float = 1e-6, factor: float = 2.0, name: str = "output") -> None:
    """Check ``out`` against a float64 reference by the tolerance rule of DESIGN.md.

    ``max|out - ref64| <= factor * max|ref_lowp - ref64| + atol``, where ``ref_lowp`` is the reference run
    in the same low precision as ``out`` (None: the bound is ``atol`` alone). NaN/Inf where the reference is
    finite fail. On failure the message names the worst element, its index and both values.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}")
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    both_nonfinite = ~torch.isfinite(o) & ~torch.isfinite(r) & ((o == r) | (o.isnan() & r.isnan()))
    err = torch.where(both_nonfinite, 0.0, (o - r).abs())
    err = torch.where(err.isnan(), float("inf"), err)
    ref_err = 0.0
    if ref_lowp is not None:
        lr = ref_lowp.detach().double().cpu()
        re = torch.where(~torch.isfinite(lr) & (lr == r), 0.0, (lr - r).abs())
        ref_err = float(re.max()) if re.numel() else 0.0
    bound = factor * ref_err + atol
    if err.numel() == 0:
        return
    worst = int(err.argmax())
    if not float(err.reshape(-1)[worst]) <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{name}: max error {float(err.reshape(-1)[worst]):.3e} at index {idx} exceeds the bound {bound:.3e} "
            f"(= {factor} x reference low-precision error {ref_err:.3e} + atol {atol:.1e}); "
            f"got {float(o.reshape(-1)[worst])!r}, reference {float(r.reshape(-1)[worst])!r}"
        )
