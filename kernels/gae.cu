// GAE as a block-wide reverse scan of affine maps (the math is derived in fastalign/ops/gae/triton.py):
// with A_t = (r_t - V_t) + E_t, E_t = f_{t+1}(f_{t+2}(... (gamma * bootstrap))) where position s carries
// f_s(x) = e_s + gl x (e_s = gamma (lam r_s + (1 - lam) V_s), gl = gamma lam), or the identity where masked.
//
// One block per sequence walks it from the end in tiles of NT * K positions. Thread i owns K consecutive
// positions of a tile, i = 0 the latest. Per tile: each thread composes its K maps; an inclusive warp scan
// (shuffles) and a scan over the warps' totals (shared memory) give each thread the composite of all later
// positions of the tile; applied to the carry (E at the tile's later edge) it is the thread's entering value,
// from which the thread walks its K positions serially. Composition: (a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gae.cuh"

namespace fastalign {
namespace kernels {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

struct Affine {
  float a, b;
};

// `later` applies first (it holds positions later in time), then `here`.
__device__ __forceinline__ Affine after(Affine here, Affine later) {
  return {here.a * later.a, fmaf(here.a, later.b, here.b)};
}

// Position p of the mask is valid (nonzero, sign bit aside for floating dtypes). The width is the same for the
// whole grid, so the switch never diverges.
__device__ __forceinline__ bool mask_valid(const MaskView& m, int64_t p) {
  uint64_t bits;
  switch (m.bytes) {
    case 1: bits = static_cast<const uint8_t*>(m.data)[p]; break;
    case 2: bits = static_cast<const uint16_t*>(m.data)[p]; break;
    case 4: bits = static_cast<const uint32_t*>(m.data)[p]; break;
    default: bits = static_cast<const uint64_t*>(m.data)[p]; break;
  }
  return (bits & m.mag) != 0;
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename T, bool HAS_VALUES, bool HAS_MASK, int NT, int K>
__global__ void __launch_bounds__(NT) gae_kernel(const T* __restrict__ r, const T* __restrict__ v,
                                                 const MaskView m, const int64_t* __restrict__ cu,
                                                 const float* __restrict__ boot, int64_t T_len, int64_t N,
                                                 float gamma, float lam, float* __restrict__ adv,
                                                 float* __restrict__ ret) {
  constexpr int kWarps = NT / 32;
  __shared__ Affine warp_total[kWarps];
  const int64_t s = blockIdx.x;
  int64_t begin, end;
  if (cu != nullptr) {
    begin = clamp64(cu[s], 0, N);
    end = clamp64(cu[s + 1], begin, N);
  } else {
    begin = s * T_len;
    end = begin + T_len;
  }
  const float gl = gamma * lam;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float carry = boot != nullptr ? gamma * boot[s] : 0.0f;

  // f_p for position p of this sequence: identity outside [begin, end) or where masked.
  auto map_at = [&](int64_t p) -> Affine {
    if (p < begin || p >= end || (HAS_MASK && !mask_valid(m, p))) return {1.0f, 0.0f};
    const float vp = HAS_VALUES ? to_float(v[p]) : 0.0f;
    return {gl, gamma * (lam * to_float(r[p]) + (1.0f - lam) * vp)};
  };

  for (int64_t tile_end = end; tile_end > begin; tile_end -= NT * K) {
    const int64_t t0 = tile_end - 1 - static_cast<int64_t>(threadIdx.x) * K;  // this thread's latest position
    // g[k] = f_{t0 - k + 1}: the map of the position after each owned one.
    Affine g[K];
    g[0] = map_at(t0 + 1);
#pragma unroll
    for (int k = 1; k < K; ++k) g[k] = map_at(t0 - k + 1);
    Affine mine = g[0];
#pragma unroll
    for (int k = 1; k < K; ++k) mine = after(g[k], mine);
    // Inclusive scan over lanes (lower lane = later in time).
    Affine incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      Affine other{__shfl_up_sync(0xffffffffu, incl.a, off), __shfl_up_sync(0xffffffffu, incl.b, off)};
      if (lane >= off) incl = after(incl, other);
    }
    Affine excl{__shfl_up_sync(0xffffffffu, incl.a, 1), __shfl_up_sync(0xffffffffu, incl.b, 1)};
    if (lane == 0) excl = {1.0f, 0.0f};
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    Affine before{1.0f, 0.0f}, total{1.0f, 0.0f};  // warps before this one; the whole tile
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w == warp) before = total;
      total = after(warp_total[w], total);
    }
    excl = after(excl, before);
    float x = fmaf(excl.a, carry, excl.b);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t t = t0 - k;
      x = fmaf(g[k].a, x, g[k].b);  // E_t
      if (t >= begin) {
        if (HAS_MASK && !mask_valid(m, t)) {
          adv[t] = 0.0f;
          if (HAS_VALUES) ret[t] = 0.0f;
        } else {
          const float vt = HAS_VALUES ? to_float(v[t]) : 0.0f;
          const float a = to_float(r[t]) - vt + x;
          adv[t] = a;
          if (HAS_VALUES) ret[t] = a + vt;
        }
      }
    }
    carry = fmaf(total.a, carry, total.b);
    __syncthreads();  // warp_total is rewritten by the next tile
  }
}

template <typename T, bool HAS_VALUES, bool HAS_MASK>
cudaError_t launch(const void* r, const void* v, const MaskView m, const int64_t* cu, const float* boot, int64_t S,
                   int64_t T_len, int64_t N, float gamma, float lam, float* adv, float* ret, cudaStream_t stream) {
  const T* pr = static_cast<const T*>(r);
  const T* pv = static_cast<const T*>(v);
  // Short padded rows get one warp per sequence; long or packed (lengths unknown on the host) get 4 warps.
  if (cu == nullptr && T_len <= 128) {
    gae_kernel<T, HAS_VALUES, HAS_MASK, 32, 4>
        <<<static_cast<unsigned>(S), 32, 0, stream>>>(pr, pv, m, cu, boot, T_len, N, gamma, lam, adv, ret);
  } else {
    gae_kernel<T, HAS_VALUES, HAS_MASK, 128, 8>
        <<<static_cast<unsigned>(S), 128, 0, stream>>>(pr, pv, m, cu, boot, T_len, N, gamma, lam, adv, ret);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_flags(const void* r, const void* v, const MaskView m, const int64_t* cu, const float* boot,
                           int64_t S, int64_t T_len, int64_t N, float gamma, float lam, float* adv, float* ret,
                           cudaStream_t stream) {
  if (v != nullptr) {
    return m.data != nullptr ? launch<T, true, true>(r, v, m, cu, boot, S, T_len, N, gamma, lam, adv, ret, stream)
                        : launch<T, true, false>(r, v, m, cu, boot, S, T_len, N, gamma, lam, adv, ret, stream);
  }
  return m.data != nullptr ? launch<T, false, true>(r, v, m, cu, boot, S, T_len, N, gamma, lam, adv, ret, stream)
                      : launch<T, false, false>(r, v, m, cu, boot, S, T_len, N, gamma, lam, adv, ret, stream);
}

}  // namespace

cudaError_t gae(const void* rewards, const void* values, DType dtype, MaskView mask, const int64_t* cu_seqlens,
                const float* bootstrap, int64_t num_seqs, int64_t T, int64_t N, float gamma, float lam,
                float* advantages, float* returns, cudaStream_t stream) {
  if (num_seqs == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_flags<float>(rewards, values, mask, cu_seqlens, bootstrap, num_seqs, T, N, gamma, lam,
                                   advantages, returns, stream);
    case DType::kFloat64:
      return dispatch_flags<double>(rewards, values, mask, cu_seqlens, bootstrap, num_seqs, T, N, gamma, lam,
                                    advantages, returns, stream);
    case DType::kFloat16:
      return dispatch_flags<__half>(rewards, values, mask, cu_seqlens, bootstrap, num_seqs, T, N, gamma, lam,
                                    advantages, returns, stream);
    case DType::kBFloat16:
      return dispatch_flags<__nv_bfloat16>(rewards, values, mask, cu_seqlens, bootstrap, num_seqs, T, N, gamma,
                                           lam, advantages, returns, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace fastalign
