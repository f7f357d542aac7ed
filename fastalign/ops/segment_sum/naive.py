"""Reference segment_sum: plain PyTorch, float64 accumulation."""

import torch


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``out[s] = values[cu_seqlens[s]:cu_seqlens[s+1]].sum()``; float64 out for float64 values, else float32."""
    out_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    num_segments = cu_seqlens.numel() - 1
    lengths = cu_seqlens.diff().long()
    segment_of = torch.repeat_interleave(torch.arange(num_segments, device=values.device), lengths,
                                         output_size=values.numel())
    out = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    return out.index_add_(0, segment_of, values.double()).to(out_dtype)
