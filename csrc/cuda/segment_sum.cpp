// Host side of the CUDA segment_sum: checks, allocation, and the launch on the current stream.
#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"
#include "ops.h"
#include "segment_sum.cuh"

namespace fastalign {

at::Tensor segment_sum_cuda(const at::Tensor& values, const at::Tensor& cu_seqlens) {
  check_segment_sum_args(values, cu_seqlens);
  FA_CHECK_VALUE(values.is_cuda(), "values must be a CUDA tensor for the cuda kernel; got ", values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor x = values.contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t S = cu.size(0) - 1;
  kernels::DType dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = kernels::DType::kFloat32; break;
    case at::kDouble: dtype = kernels::DType::kFloat64; break;
    case at::kHalf: dtype = kernels::DType::kFloat16; break;
    default: dtype = kernels::DType::kBFloat16; break;
  }
  at::Tensor out = new_output({S}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const cudaError_t err = kernels::segment_sum(x.data_ptr(), dtype, cu.data_ptr<int64_t>(), S, x.size(0),
                                               out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "segment_sum CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace fastalign
#endif  // WITH_CUDA
