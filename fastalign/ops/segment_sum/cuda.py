"""The cuda impl of segment_sum is the same torch.library op as the cpp one (``kernels/segment_sum.cu``)."""

from fastalign.ops.segment_sum.cpu import segment_sum_fwd

__all__ = ["segment_sum_fwd"]
