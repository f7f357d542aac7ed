from fastalign.ops.segment_sum.api import segment_sum

__all__ = ["segment_sum"]
