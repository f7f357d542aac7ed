"""segment_sum: per-sequence sums of packed per-token values (e.g. token logprobs -> sequence logprobs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign._backend import resolve_impl
from fastalign._utils import FLOAT_DTYPES, check_cu_seqlens, check_same_device, check_tensor
from fastalign.ops.segment_sum import naive


@dataclass(frozen=True)
class SegmentSumParams:
    impl: str


def _segment_sum_fwd(values, cu_seqlens, params: SegmentSumParams):
    if params.impl == "torch":
        return naive.segment_sum(values, cu_seqlens)
    if params.impl == "cuda":
        from fastalign.ops.segment_sum.cuda import segment_sum_fwd
    else:
        from fastalign.ops.segment_sum.cpu import segment_sum_fwd
    return segment_sum_fwd(values, cu_seqlens)


def _segment_sum_bwd(grad_out, cu_seqlens, num_values: int, dtype: torch.dtype):
    # d out[s] / d values[i] = 1 for i in segment s: broadcast each segment's gradient over its tokens.
    lengths = cu_seqlens.diff().long()
    return torch.repeat_interleave(grad_out, lengths, output_size=num_values).to(dtype)


class SegmentSumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens, params: SegmentSumParams):
        ctx.save_for_backward(cu_seqlens)
        ctx.num_values, ctx.dtype = values.numel(), values.dtype
        return _segment_sum_fwd(values, cu_seqlens, params)

    @staticmethod
    def backward(ctx, grad_out):
        (cu_seqlens,) = ctx.saved_tensors
        return _segment_sum_bwd(grad_out, cu_seqlens, ctx.num_values, ctx.dtype), None, None


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Sum packed per-token values per sequence, accumulating in float64.

    Same as ``torch.stack([values[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])`` with float64 accumulation.

    Args:
        values: ``[N]`` float32/bfloat16/float16/float64, the tokens of all sequences back to back.
        cu_seqlens: ``[S + 1]`` int32/int64 offsets, or a list/tuple of ints: sequence ``s`` is
            ``values[cu_seqlens[s]:cu_seqlens[s+1]]``. Must start at 0, be non-decreasing and end at ``N``
            (checked for CPU tensors; on CUDA the kernel clamps offsets to ``[0, N]`` instead of checking, to
            avoid a host sync).
        impl: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"cuda"`` (see ``fastalign._backend``).

    Returns:
        ``[S]`` float32 (float64 for float64 values); differentiable w.r.t. ``values``.

    Example:
        >>> segment_sum(torch.tensor([1., 2., 3.]), torch.tensor([0, 2, 3]))
        tensor([3., 3.])
    """
    check_tensor(values, "values", ndim=1, dtypes=FLOAT_DTYPES)
    if isinstance(cu_seqlens, (list, tuple)):  # offsets as Python ints (as gae takes them)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in cu_seqlens):
            raise TypeError(f"cu_seqlens given as a list must hold ints; got {list(cu_seqlens)!r}")
        cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int64, device=values.device)
    check_cu_seqlens(cu_seqlens, values.numel())  # (first: it checks that cu_seqlens is a tensor)
    device = check_same_device(values=values, cu_seqlens=cu_seqlens)
    params = SegmentSumParams(impl=resolve_impl(impl, device, op="segment_sum", impls=("torch", "cpp", "cuda")))
    return SegmentSumFunction.apply(values, cu_seqlens, params)
