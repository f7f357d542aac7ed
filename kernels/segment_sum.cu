#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "segment_sum.cuh"

namespace fastalign {
namespace kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ double to_double(T x) { return static_cast<double>(x); }
template <>
__device__ __forceinline__ double to_double<__half>(__half x) { return static_cast<double>(__half2float(x)); }
template <>
__device__ __forceinline__ double to_double<__nv_bfloat16>(__nv_bfloat16 x) {
  return static_cast<double>(__bfloat162float(x));
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// One block per segment: threads stride over the segment, then a warp-shuffle + shared-memory tree.
// The reduction order depends only on the segment's length, so results are deterministic.
template <typename T, typename O>
__global__ void segment_sum_kernel(const T* __restrict__ x, const int64_t* __restrict__ cu, int64_t N,
                                   O* __restrict__ out) {
  const int64_t s = blockIdx.x;
  const int64_t begin = clamp64(cu[s], 0, N);
  const int64_t end = clamp64(cu[s + 1], begin, N);
  double acc = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) acc += to_double(x[i]);
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[s] = static_cast<O>(acc);
  }
}

template <typename T, typename O>
cudaError_t launch(const void* values, const int64_t* cu, int64_t S, int64_t N, void* out, cudaStream_t stream) {
  if (S == 0) return cudaSuccess;
  segment_sum_kernel<T, O><<<static_cast<unsigned>(S), kThreads, 0, stream>>>(static_cast<const T*>(values), cu, N,
                                                                               static_cast<O*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t segment_sum(const void* values, DType dtype, const int64_t* cu_seqlens, int64_t num_segments,
                        int64_t num_values, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float, float>(values, cu_seqlens, num_segments, num_values, out, stream);
    case DType::kFloat64: return launch<double, double>(values, cu_seqlens, num_segments, num_values, out, stream);
    case DType::kFloat16: return launch<__half, float>(values, cu_seqlens, num_segments, num_values, out, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, float>(values, cu_seqlens, num_segments, num_values, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace fastalign
