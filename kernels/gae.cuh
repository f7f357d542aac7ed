// GAE and discounted returns on CUDA: plain CUDA, no torch headers. The host code in csrc/cuda/gae.cpp passes
// raw pointers and the current stream; nothing here synchronizes with the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "segment_sum.cuh"  // kernels::DType

namespace fastalign {
namespace kernels {

// The mask as the kernel reads it: raw elements of `bytes` (1, 2, 4 or 8) bytes, valid where `bits & mag` is not
// 0 (`mag` clears the sign bit of floating dtypes, so -0.0 is 0; all ones for bool and integers).
struct MaskView {
  const void* data;  // null: no mask
  int bytes;
  uint64_t mag;
};

// advantages/returns (float32) of `num_seqs` sequences. Padded layout (cu_seqlens == nullptr): sequence s is
// rewards[s*T : (s+1)*T], with `mask` (any dtype, see MaskView; data may be null) marking valid tokens. Packed layout: sequence s is
// rewards[cu_seqlens[s] : cu_seqlens[s+1]] (offsets clamped to [0, N], so malformed offsets never read out of
// bounds), mask null. values == nullptr gives the discounted returns in `advantages` (returns not written).
// bootstrap (float32, may be null) is the value after each sequence's last valid token.
cudaError_t gae(const void* rewards, const void* values, DType dtype, MaskView mask, const int64_t* cu_seqlens,
                const float* bootstrap, int64_t num_seqs, int64_t T, int64_t N, float gamma, float lam,
                float* advantages, float* returns, cudaStream_t stream);

}  // namespace kernels
}  // namespace fastalign
