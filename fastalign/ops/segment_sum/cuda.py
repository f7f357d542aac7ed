"""segment_sum launcher of the ``cuda`` impl: fastalign._C's CUDA kernel (``kernels/segment_sum.cu``; host side in
``csrc/cuda/segment_sum.cpp``).

It is the CUDA-key implementation of the torch.library op ``fastalign::segment_sum``, whose CPU key the cpp impl
runs and whose fake impl ``cpu.py`` registers. The dispatcher picks a kernel by the tensors' device, so this
launcher checks the device itself: given CPU tensors it raises rather than run the CPU kernel in the cuda impl's
name. ``fastalign._backend.resolve_impl`` raises first when the extension was built without CUDA.
"""

from __future__ import annotations

import torch

from fastalign.ops.segment_sum import cpu


def segment_sum_fwd(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[S]`` per-sequence sums (float32, float64 for float64 values) of CUDA tensors."""
    if values.device.type != "cuda":
        raise ValueError(f"the cuda impl of segment_sum takes CUDA tensors; got values on {values.device} "
                         "(impl='cpp' runs on CPU tensors)")
    return cpu.segment_sum_fwd(values, cu_seqlens)
