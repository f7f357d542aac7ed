// segment_sum on CUDA: plain CUDA, no torch headers. The host code in csrc/cuda/ passes raw pointers
// and the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastalign {
namespace kernels {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out[s] = sum(values[cu[s]:cu[s+1]]) accumulated in float64; out is float64 when values are float64,
// else float32. Offsets are clamped to [0, N], so malformed offsets never read out of bounds.
cudaError_t segment_sum(const void* values, DType dtype, const int64_t* cu_seqlens, int64_t num_segments,
                        int64_t num_values, void* out, cudaStream_t stream);

}  // namespace kernels
}  // namespace fastalign
