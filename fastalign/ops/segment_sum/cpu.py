"""segment_sum launcher of the ``cpp`` impl: fastalign._C's CPU kernel (``csrc/cpu/segment_sum.cpp``), the
torch.library op ``fastalign::segment_sum``, whose fake impl is registered here.

The ``cuda`` impl (``cuda.py``) calls the same op on CUDA tensors: the dispatcher picks the kernel by the tensors'
device.
"""

import torch

from fastalign import _ext

if _ext.get() is not None:

    @torch.library.register_fake("fastalign::segment_sum")
    def _segment_sum_fake(values, cu_seqlens):
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        return values.new_empty(cu_seqlens.shape[0] - 1, dtype=dtype)


def segment_sum_fwd(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastalign.segment_sum(values, cu_seqlens)
