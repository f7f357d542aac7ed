// Declarations of every host function registered in bindings.cpp, grouped by op.
#pragma once

#include <torch/extension.h>

namespace fastalign {

// segment_sum(values [N], cu_seqlens [S+1]) -> [S]
void check_segment_sum_args(const at::Tensor& values, const at::Tensor& cu_seqlens);
at::Tensor segment_sum_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens);
#ifdef WITH_CUDA
at::Tensor segment_sum_cuda(const at::Tensor& values, const at::Tensor& cu_seqlens);
#endif

}  // namespace fastalign
