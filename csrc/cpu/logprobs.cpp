// linear_logprobs on the CPU: per-row logsumexp, target logit and sum p*z of the processed logits
// z = softcap*tanh(logit_scale*(h W^T + b)/softcap)/temperature, and their gradients, without ever holding
// more than a [BN, BV] tile of logits per thread.
//
// Schedule. The rows that are not ignore_index are packed into row blocks of exactly BN rows (the last one
// zero-padded), processed one after the other. The vocabulary is cut into tiles of BV rows and the tiles into
// S chunks (S depends on V, D and the dtype only); the chunks of a row block run in parallel
// (at::parallel_for), each walking its tiles in order. Per tile, one BLAS gemm of the fixed shape
// [BN, D] x [D, bv] gives the raw logits (float32, or float64 for float64 inputs; bf16/fp16 operands are
// upcast per tile), which are processed in place.
//
// Batch invariance: a row's logits come from gemms of one shape whatever N is (padding the last row block;
// MKL's sgemm does give a row other bits when the call has 1-3 rows instead of 64), per-row reductions over a
// tile use a fixed lane layout, and the online logsumexp merges tiles in vocabulary order within a chunk and
// chunks in chunk order (the final merge in float64: lse and sum_pz are returned in float64, sum_pz as
// max + sum p (z - max), so that the entropy lse - sum_pz does not cancel at large logits). Nothing a row sees
// depends on N, on the other rows or on where it sits, so its outputs are bitwise identical.
//
// Backward, per tile, with p = exp(z - lse) from the given (global) lse, g = dL/dlogprob, e = dL/dentropy:
//   logprob = z_y - lse             -> dz_v = g (1[v=y] - p_v)
//   entropy = lse - sum_u p_u z_u   -> dz_v = -e p_v (z_v - sum_u p_u z_u)
//   z = c tanh(u/c)/T, u = s x      -> dx = dz * s (1 - tanh^2(u/c)) / T   (no tanh factor without softcap)
// then dh += dx W_tile, dW_tile += dx^T h, db_tile += sum_rows dx. A chunk owns its vocabulary rows, so dW and
// db are accumulated (in float32) by one thread in row-block order; dh of a row block is summed over
// per-chunk partials in chunk order. The backward is therefore always bitwise reproducible, at no cost.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace fastalign {
namespace {

constexpr int64_t BN = 64;    // rows per row block (fixed: a row's gemm shape must not depend on N)
constexpr int64_t BV = 512;   // vocabulary rows per tile
constexpr int64_t LANES = 16;  // lanes of the per-tile reductions (fixed order, vectorizable)
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kPartialBytes = 32 << 20;  // budget of the backward's per-chunk dh partials

// A row-major [rows, cols] matrix over existing memory, for the BLAS calls (at::mm_out / addmm_).
template <typename acc_t>
at::Tensor mat(const acc_t* ptr, int64_t rows, int64_t cols) {
  const auto dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  return at::from_blob(const_cast<acc_t*>(ptr), {rows, cols}, at::TensorOptions().dtype(dtype));
}

// ---- elementwise math on one tile row (float has a vectorizable exp; float64 uses libm) -------------------

// e^x = 2^n e^r with n = round(x / ln2) and r = x - n ln2 (ln2 split in two so n*ln2_hi is exact),
// |r| <= ln2/2; e^r by its degree-7 Taylor polynomial, whose remainder r^8/8! < 6e-9 is below float's
// half ulp. Branch-free so that loops over it vectorize; x < -87 (e^x < 2e-38) gives 0.
__attribute__((always_inline)) inline float exp_approx(float x) {
  const bool tiny = x < -87.0f;
  x = tiny ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440054690583e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : p * scale;
}
__attribute__((always_inline)) inline double exp_approx(double x) { return std::exp(x); }

// tanh(y) = sign(y) (1 - e) / (1 + e) with e = exp(-2|y|): no overflow, absolute error ~ one ulp of 1.
template <typename T>
__attribute__((always_inline)) inline T tanh_approx(T y) {
  const T e = exp_approx(T(-2) * std::abs(y));
  const T t = (T(1) - e) / (T(1) + e);
  return y < T(0) ? -t : t;
}

struct Opts {
  double temperature, softcap, logit_scale;  // softcap <= 0: none
};

// x <- z(x + b) in place.
template <typename T>
__attribute__((always_inline)) inline void process_row_impl(T* x, int64_t n, const T* b, const Opts& o) {
  const T s = T(o.logit_scale), c = T(o.softcap), temp = T(o.temperature);
  if (o.softcap > 0) {
    for (int64_t v = 0; v < n; ++v) {
      const T u = ((b ? x[v] + b[v] : x[v]) * s);
      x[v] = (c * tanh_approx(u / c)) / temp;
    }
  } else {
    for (int64_t v = 0; v < n; ++v) x[v] = ((b ? x[v] + b[v] : x[v]) * s) / temp;
  }
}

// Softmax statistics of a row, relative to its running max m: l = sum_v exp(z_v - m) and
// t = sum_v exp(z_v - m) (z_v - m). Then lse = m + log l and sum_pz = m + t / l, and the entropy lse - sum_pz =
// log l - t / l does not cancel however large the logits are. Merging two partial rows (m, l, t), (m2, l2, t2):
// with M = max(m, m2), exp(z - M) = exp(z - m) exp(m - M) and z - M = (z - m) + (m - M), so
// l' = l exp(m - M) + ..., t' = exp(m - M) (t + (m - M) l) + ... (an empty part has m = -inf).
template <typename T>
inline void merge_stats(T* m, T* l, T* t, T m2, T l2, T t2) {
  if (m2 == -std::numeric_limits<T>::infinity()) return;
  if (*m == -std::numeric_limits<T>::infinity()) {
    *m = m2, *l = l2, *t = t2;
    return;
  }
  const T M = std::max(*m, m2);
  const T a = std::exp(*m - M), b = std::exp(m2 - M);
  // A part whose max is so far below M that its weight is 0 drops out whole ((m - M) l may overflow).
  *t = (a > T(0) ? a * (*t + (*m - M) * *l) : T(0)) + (b > T(0) ? b * (t2 + (m2 - M) * l2) : T(0));
  *l = a * *l + b * l2;
  *m = M;
}

// Folds one tile row into (m, l, t): the tile's own max and sums (reduced LANES-wise, then across lanes in a
// fixed order), merged into the running values. An entry of probability 0 (z = -inf, or z - max overflowing to
// -inf) adds e d = 0 to t: p log p = 0 at p = 0. A tile whose every logit is -inf has max -inf and is skipped by
// merge_stats.
template <typename T>
__attribute__((always_inline)) inline void row_stats_impl(const T* z, int64_t n, T* m, T* l, T* t) {
  T mx[LANES];
  for (int64_t k = 0; k < LANES; ++k) mx[k] = -std::numeric_limits<T>::infinity();
  int64_t v = 0;
  for (; v + LANES <= n; v += LANES)
    for (int64_t k = 0; k < LANES; ++k) mx[k] = z[v + k] > mx[k] ? z[v + k] : mx[k];
  for (int64_t k = 0; v + k < n; ++k) mx[k] = z[v + k] > mx[k] ? z[v + k] : mx[k];
  T mt = mx[0];
  for (int64_t k = 1; k < LANES; ++k) mt = mx[k] > mt ? mx[k] : mt;
  T sl[LANES] = {}, st[LANES] = {};
  for (v = 0; v + LANES <= n; v += LANES) {
    for (int64_t k = 0; k < LANES; ++k) {
      const T d = z[v + k] - mt;
      const T e = exp_approx(d);
      sl[k] += e;
      st[k] += e > T(0) ? e * d : T(0);
    }
  }
  for (int64_t k = 0; v + k < n; ++k) {
    const T d = z[v + k] - mt;
    const T e = exp_approx(d);
    sl[k] += e;
    st[k] += e > T(0) ? e * d : T(0);
  }
  T lt = 0, tt = 0;
  for (int64_t k = 0; k < LANES; ++k) {
    lt += sl[k];
    tt += st[k];
  }
  merge_stats(m, l, t, mt, lt, tt);
}

// z <- dx (see the header) in place; y is the target's column in this tile (outside [0, n): not here).
template <typename T>
__attribute__((always_inline)) inline void row_grad_impl(T* z, int64_t n, T lse, T spz, T g, T e, int64_t y,
                                                         const Opts& o) {
  const T outer = T(o.logit_scale) / T(o.temperature), inv_c = T(o.temperature) / T(o.softcap);
  if (o.softcap > 0) {
    for (int64_t v = 0; v < n; ++v) {
      const T p = exp_approx(z[v] - lse);
      const T th = z[v] * inv_c;  // tanh(u / c) = z T / c
      const T dz = (v == y ? g : T(0)) - g * p - e * (p > T(0) ? p * (z[v] - spz) : T(0));
      z[v] = dz * outer * (T(1) - th * th);
    }
  } else {
    for (int64_t v = 0; v < n; ++v) {
      const T p = exp_approx(z[v] - lse);
      // p (z - sum_pz) = 0 where p = 0, as in the forward (z = -inf would give 0 * -inf)
      const T dz = (v == y ? g : T(0)) - g * p - e * (p > T(0) ? p * (z[v] - spz) : T(0));
      z[v] = dz * outer;
    }
  }
}

// Vectorized clones of the float row functions (picked at load time by the CPU); float64 is used as is.
#define FA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
FA_CLONES void process_row(float* x, int64_t n, const float* b, const Opts& o) { process_row_impl(x, n, b, o); }
FA_CLONES void row_stats(const float* z, int64_t n, float* m, float* l, float* t) { row_stats_impl(z, n, m, l, t); }
FA_CLONES void row_grad(float* z, int64_t n, float lse, float spz, float g, float e, int64_t y, const Opts& o) {
  row_grad_impl(z, n, lse, spz, g, e, y, o);
}
void process_row(double* x, int64_t n, const double* b, const Opts& o) { process_row_impl(x, n, b, o); }
void row_stats(const double* z, int64_t n, double* m, double* l, double* t) { row_stats_impl(z, n, m, l, t); }
void row_grad(double* z, int64_t n, double lse, double spz, double g, double e, int64_t y, const Opts& o) {
  row_grad_impl(z, n, lse, spz, g, e, y, o);
}

// ---- the blocked driver --------------------------------------------------------------------------------

// What both passes share: the packed valid rows, the tiling of the vocabulary, and per-tile operand access.
template <typename scalar_t, typename acc_t>
struct Plan {
  const scalar_t* h;  // [N, D]
  const scalar_t* w;  // [V, D], element (v, d) at w[v * w_s0 + d * w_s1]
  const scalar_t* b;  // [V] or null
  int64_t N, D, V, vocab_start;
  int64_t w_s0, w_s1;
  bool w_direct;  // the weight is acc_t and contiguous: its tiles are used in place
  Opts opts;
  std::vector<int64_t> rows;  // indices of the rows whose target is not ignore_index
  std::vector<int64_t> ylocal;  // their target - vocab_start
  int64_t n_tiles, n_chunks;

  int64_t tile_begin(int64_t chunk) const { return chunk * n_tiles / n_chunks; }
  int64_t tile_rows(int64_t tile) const { return std::min(BV, V - tile * BV); }
  int64_t n_blocks() const { return (static_cast<int64_t>(rows.size()) + BN - 1) / BN; }
  int64_t block_rows(int64_t blk) const { return std::min(BN, static_cast<int64_t>(rows.size()) - blk * BN); }

  // The [BN, D] accumulation-type copy of row block `blk`, zero-padded.
  void load_block(int64_t blk, acc_t* out) const {
    const int64_t nr = block_rows(blk);
    std::fill(out, out + BN * D, acc_t(0));
    for (int64_t r = 0; r < nr; ++r) {
      const scalar_t* src = h + rows[blk * BN + r] * D;
      for (int64_t d = 0; d < D; ++d) out[r * D + d] = static_cast<acc_t>(src[d]);
    }
  }

  // Pointer to tile `tile` of the weight in acc_t, row-major [nv, D]: the weight itself (w_direct), or its
  // upcast / strided copy into `buf` [BV, D] (an expanded weight, stride 0, is read in place tile by tile).
  const acc_t* weight_tile(int64_t tile, acc_t* buf) const {
    if (w_direct) return reinterpret_cast<const acc_t*>(w + tile * BV * D);
    const int64_t nv = tile_rows(tile);
    if (w_s1 == 1) {
      for (int64_t v = 0; v < nv; ++v) {
        const scalar_t* src = w + (tile * BV + v) * w_s0;
        for (int64_t d = 0; d < D; ++d) buf[v * D + d] = static_cast<acc_t>(src[d]);
      }
    } else {
      for (int64_t v = 0; v < nv; ++v)
        for (int64_t d = 0; d < D; ++d) buf[v * D + d] = static_cast<acc_t>(w[(tile * BV + v) * w_s0 + d * w_s1]);
    }
    return buf;
  }

  // Processed logits of the block's rows for one tile: tile_out [BN, nv] (nv = tile_rows(tile)).
  void logits(const acc_t* hblk, const acc_t* wt, int64_t tile, int64_t nr, acc_t* tile_out) const {
    const int64_t nv = tile_rows(tile);
    // Always the full [BN, D] x [D, nv] product, padding rows included: one gemm shape whatever N is.
    at::Tensor out = mat(tile_out, BN, nv);
    at::mm_out(out, mat(hblk, BN, D), mat(wt, nv, D).t());
    acc_t bias_buf[BV];
    const acc_t* bias = nullptr;
    if (b != nullptr) {
      for (int64_t v = 0; v < nv; ++v) bias_buf[v] = static_cast<acc_t>(b[tile * BV + v]);
      bias = bias_buf;
    }
    for (int64_t r = 0; r < nr; ++r) process_row(tile_out + r * nv, nv, bias, opts);
  }
};

template <typename scalar_t, typename acc_t>
Plan<scalar_t, acc_t> make_plan(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                const std::optional<at::Tensor>& bias, const Opts& opts, int64_t ignore_index,
                                int64_t vocab_start, int64_t vocab_size) {
  Plan<scalar_t, acc_t> p;
  p.h = hidden.data_ptr<scalar_t>();
  p.w = weight.data_ptr<scalar_t>();
  p.b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  p.N = hidden.size(0);
  p.D = hidden.size(1);
  p.V = weight.size(0);
  p.w_s0 = weight.stride(0);
  p.w_s1 = weight.stride(1);
  p.w_direct = std::is_same_v<scalar_t, acc_t> && weight.is_contiguous();
  p.vocab_start = vocab_start;
  p.opts = opts;
  const int64_t* y = targets.data_ptr<int64_t>();
  const int64_t bound = vocab_size > 0 ? vocab_size : vocab_start + p.V;
  for (int64_t n = 0; n < p.N; ++n) {
    if (y[n] == ignore_index) continue;
    FA_CHECK_VALUE(y[n] >= 0 && y[n] < bound, "targets must be in [0, ", bound, ") or ignore_index=", ignore_index,
                   "; got ", y[n], " at row ", n);
    p.rows.push_back(n);
    p.ylocal.push_back(y[n] - vocab_start);
  }
  p.n_tiles = (p.V + BV - 1) / BV;
  // Chunks: as many as the dh partials' budget allows (a function of V, D and the dtype only, never of N).
  const int64_t by_budget = std::max<int64_t>(1, kPartialBytes / (BN * p.D * static_cast<int64_t>(sizeof(acc_t))));
  p.n_chunks = std::min({p.n_tiles, kMaxChunks, by_budget});
  return p;
}

// Forward: lse, z_target, sum_pz per row (0 on ignored rows); lse and sum_pz in float64 (see merge_stats).
template <typename scalar_t, typename acc_t>
void fwd_kernel(const Plan<scalar_t, acc_t>& p, double* lse, acc_t* zt, double* spz) {
  const int64_t S = p.n_chunks, D = p.D;
  std::fill(lse, lse + p.N, 0.0);
  std::fill(zt, zt + p.N, acc_t(0));
  std::fill(spz, spz + p.N, 0.0);
  std::vector<acc_t> hblk(BN * D);
  std::vector<acc_t> stats(S * BN * 3);  // per chunk and row: (m, l, t) of merge_stats
  std::vector<acc_t> zt_blk(BN);
  for (int64_t blk = 0; blk < p.n_blocks(); ++blk) {
    const int64_t nr = p.block_rows(blk);
    p.load_block(blk, hblk.data());
    std::fill(zt_blk.begin(), zt_blk.end(), acc_t(0));
    at::parallel_for(0, S, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> tile(BN * BV), wbuf(p.w_direct ? 0 : BV * D);
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* st = stats.data() + c * BN * 3;
        for (int64_t r = 0; r < BN; ++r) {
          st[3 * r] = -std::numeric_limits<acc_t>::infinity();
          st[3 * r + 1] = st[3 * r + 2] = acc_t(0);
        }
        for (int64_t t = p.tile_begin(c); t < p.tile_begin(c + 1); ++t) {
          p.logits(hblk.data(), p.weight_tile(t, wbuf.data()), t, nr, tile.data());
          const int64_t nv = p.tile_rows(t);
          for (int64_t r = 0; r < nr; ++r) {
            const acc_t* z = tile.data() + r * nv;
            row_stats(z, nv, &st[3 * r], &st[3 * r + 1], &st[3 * r + 2]);
            const int64_t y = p.ylocal[blk * BN + r] - t * BV;
            if (y >= 0 && y < nv) zt_blk[r] = z[y];
          }
        }
      }
    });
    for (int64_t r = 0; r < nr; ++r) {  // chunks merged in order, in float64
      double m = -std::numeric_limits<double>::infinity(), l = 0, tz = 0;
      for (int64_t c = 0; c < S; ++c) {
        const acc_t* st = &stats[(c * BN + r) * 3];
        merge_stats<double>(&m, &l, &tz, st[0], st[1], st[2]);
      }
      const int64_t n = p.rows[blk * BN + r];
      lse[n] = m + std::log(l);
      spz[n] = m + tz / l;
      zt[n] = zt_blk[r];
    }
  }
}

// Backward: grad_hidden [N, D] (scalar_t), grad_weight accumulated into gw [V, D] (acc_t, zeroed; null: not
// wanted), grad_bias into gb [V] (acc_t, zeroed; null without bias).
template <typename scalar_t, typename acc_t>
void bwd_kernel(const Plan<scalar_t, acc_t>& p, const acc_t* lse, const acc_t* spz, const acc_t* g,
                const acc_t* e, scalar_t* gh, acc_t* gw, acc_t* gb) {
  const int64_t S = p.n_chunks, D = p.D;
  std::fill(gh, gh + p.N * D, scalar_t(0));
  std::vector<acc_t> hblk(BN * D);
  std::vector<acc_t> partial(S * BN * D);  // per chunk: its share of dh for the block's rows
  for (int64_t blk = 0; blk < p.n_blocks(); ++blk) {
    const int64_t nr = p.block_rows(blk);
    p.load_block(blk, hblk.data());
    at::parallel_for(0, S, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> tile(BN * BV), wbuf(p.w_direct ? 0 : BV * D);
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* dh = partial.data() + c * BN * D;
        std::fill(dh, dh + nr * D, acc_t(0));
        for (int64_t t = p.tile_begin(c); t < p.tile_begin(c + 1); ++t) {
          const acc_t* wt = p.weight_tile(t, wbuf.data());
          p.logits(hblk.data(), wt, t, nr, tile.data());
          const int64_t nv = p.tile_rows(t);
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t n = p.rows[blk * BN + r];
            row_grad(tile.data() + r * nv, nv, lse[n], spz ? spz[n] : acc_t(0), g[n], e ? e[n] : acc_t(0),
                     p.ylocal[blk * BN + r] - t * BV, p.opts);
          }
          const at::Tensor dx = mat(tile.data(), nr, nv);
          mat(dh, nr, D).addmm_(dx, mat(wt, nv, D));                       // dh [nr, D] += dx W_tile
          if (gw != nullptr) {  // dW_tile += dx^T h
            mat(gw + t * BV * D, nv, D).addmm_(dx.t(), mat(hblk.data(), nr, D));
          }
          if (gb != nullptr) {
            for (int64_t r = 0; r < nr; ++r)
              for (int64_t v = 0; v < nv; ++v) gb[t * BV + v] += tile[r * nv + v];
          }
        }
      }
    });
    at::parallel_for(0, nr, 1, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> sum(D);
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t c = 0; c < S; ++c) {
          const acc_t* src = partial.data() + (c * BN + r) * D;
          for (int64_t d = 0; d < D; ++d) sum[d] += src[d];
        }
        scalar_t* dst = gh + p.rows[blk * BN + r] * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(sum[d]);
      }
    });
  }
}

// ---- argument checks -----------------------------------------------------------------------------------

Opts check_common(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                  const std::optional<at::Tensor>& bias, double temperature, std::optional<double> softcap,
                  double logit_scale, int64_t vocab_start, int64_t vocab_size) {
  check_dim(hidden, "hidden", 2);
  check_floating(hidden, "hidden");
  check_dim(weight, "weight", 2);
  FA_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight must have the dtype of hidden (",
                hidden.scalar_type(), "); got ", weight.scalar_type());
  FA_CHECK_VALUE(weight.size(1) == hidden.size(1), "weight must be [V, D] with D = hidden.size(1) = ",
                 hidden.size(1), "; got shape ", weight.sizes());
  FA_CHECK_VALUE(weight.size(0) >= 1, "weight must hold at least one vocabulary row (V >= 1); got shape ",
                 weight.sizes());
  FA_CHECK_VALUE(hidden.size(1) >= 1, "hidden must have a hidden size D = hidden.size(1) >= 1; got shape ",
                 hidden.sizes());
  check_dim(targets, "targets", 1);
  check_index(targets, "targets");
  FA_CHECK_VALUE(targets.size(0) == hidden.size(0), "targets must be [N] with N = hidden.size(0) = ",
                 hidden.size(0), "; got shape ", targets.sizes());
  FA_CHECK_VALUE(hidden.device().is_cpu(), "hidden must be a CPU tensor for the cpu kernel; got ", hidden.device());
  check_same_device(hidden, "hidden", weight, "weight");
  check_same_device(hidden, "hidden", targets, "targets");
  if (bias.has_value()) {
    check_dim(*bias, "bias", 1);
    FA_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "bias must have the dtype of weight (",
                  weight.scalar_type(), "); got ", bias->scalar_type());
    FA_CHECK_VALUE(bias->size(0) == weight.size(0), "bias must be [V] with V = weight.size(0) = ", weight.size(0),
                   "; got shape ", bias->sizes());
    check_same_device(hidden, "hidden", *bias, "bias");
  }
  FA_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0; got ",
                 temperature);
  FA_CHECK_VALUE(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0),
                 "softcap must be None or a finite number > 0; got ", softcap.value_or(0));
  FA_CHECK_VALUE(std::isfinite(logit_scale), "logit_scale must be finite; got ", logit_scale);
  FA_CHECK_VALUE(vocab_start >= 0, "vocab_start must be >= 0; got ", vocab_start);
  FA_CHECK_VALUE(vocab_size == 0 || vocab_start + weight.size(0) <= vocab_size,
                 "vocab_size must be 0 (this weight's V) or hold the shard [vocab_start, vocab_start + V) = [",
                 vocab_start, ", ", vocab_start + weight.size(0), "); got ", vocab_size);
  return Opts{temperature, softcap.value_or(0.0), logit_scale};
}

// The weight as the kernels read it: itself when contiguous or expanded (a zero stride: read tile by tile, never
// materialized; 4 bytes expanded to [V, D] stay 4 bytes), else a contiguous copy (the size of its own storage).
at::Tensor weight_operand(const at::Tensor& weight) {
  if (weight.is_contiguous() || weight.stride(0) == 0 || weight.stride(1) == 0) return weight;
  return weight.contiguous();
}

// A per-row tensor of the backward: [N], float32 or float64; returned contiguous in the accumulation type.
at::Tensor per_row(const at::Tensor& t, const char* name, int64_t N, at::ScalarType acc, const at::Tensor& hidden) {
  check_dim(t, name, 1);
  FA_CHECK_VALUE(t.size(0) == N, name, " must be [N] with N = hidden.size(0) = ", N, "; got shape ", t.sizes());
  FA_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                " must be float32 or float64; got ", t.scalar_type());
  check_same_device(hidden, "hidden", t, name);
  return t.to(acc).contiguous();
}

#define FA_DISPATCH_LOGPROBS(TYPE, NAME, ...)                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {          \
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>; \
    __VA_ARGS__();                                                                     \
  })

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, double temperature, std::optional<double> softcap, double logit_scale,
    int64_t ignore_index, int64_t vocab_start, int64_t vocab_size) {
  const Opts opts =
      check_common(hidden, weight, targets, bias, temperature, softcap, logit_scale, vocab_start, vocab_size);
  const at::Tensor h = hidden.contiguous(), w = weight_operand(weight), y = targets.to(at::kLong).contiguous();
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  const int64_t N = h.size(0);
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = new_output({N}, h.options().dtype(at::kDouble));
  at::Tensor zt = new_output({N}, h.options().dtype(acc));
  at::Tensor spz = new_output({N}, h.options().dtype(at::kDouble));
  FA_DISPATCH_LOGPROBS(h.scalar_type(), "linear_logprobs_fwd_cpu", [&] {
    const auto plan = make_plan<scalar_t, acc_t>(h, w, y, b, opts, ignore_index, vocab_start, vocab_size);
    fwd_kernel(plan, lse.data_ptr<double>(), zt.data_ptr<acc_t>(), spz.data_ptr<double>());
  });
  return {lse, zt, spz};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const std::optional<at::Tensor>& sum_pz,
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, double temperature,
    std::optional<double> softcap, double logit_scale, int64_t ignore_index, int64_t vocab_start, int64_t vocab_size,
    bool compute_grad_weight) {
  const Opts opts =
      check_common(hidden, weight, targets, bias, temperature, softcap, logit_scale, vocab_start, vocab_size);
  FA_CHECK_VALUE(!grad_entropy.has_value() || sum_pz.has_value(),
                 "sum_pz must be given with grad_entropy (the entropy's gradient needs it); got None");
  const at::Tensor h = hidden.contiguous(), w = weight_operand(weight), y = targets.to(at::kLong).contiguous();
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  const int64_t N = h.size(0), V = w.size(0), D = h.size(1);
  const auto acc = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse_a = per_row(lse, "lse", N, acc, h);
  const at::Tensor g_a = per_row(grad_logprobs, "grad_logprobs", N, acc, h);
  std::optional<at::Tensor> spz_a, e_a;
  if (grad_entropy.has_value()) {
    spz_a = per_row(*sum_pz, "sum_pz", N, acc, h);
    e_a = per_row(*grad_entropy, "grad_entropy", N, acc, h);
  }
  at::Tensor gh = new_output({N, D}, h.options());
  // grad_weight (and grad_bias) accumulate in the accumulation type; in place when that is the input dtype.
  const int64_t gw_rows = compute_grad_weight ? V : 0;  // a frozen LM head: no grad_weight, one gemm less
  at::Tensor gw = new_output({gw_rows, D}, h.options());
  at::Tensor gw_acc = h.scalar_type() == acc ? gw : at::empty({gw_rows, D}, h.options().dtype(acc));
  gw_acc.zero_();
  at::Tensor gb = new_output({b.has_value() ? V : 0}, h.options());
  at::Tensor gb_acc = at::zeros({b.has_value() ? V : 0}, h.options().dtype(acc));
  FA_DISPATCH_LOGPROBS(h.scalar_type(), "linear_logprobs_bwd_cpu", [&] {
    const auto plan = make_plan<scalar_t, acc_t>(h, w, y, b, opts, ignore_index, vocab_start, vocab_size);
    bwd_kernel(plan, lse_a.data_ptr<acc_t>(), spz_a ? spz_a->data_ptr<acc_t>() : nullptr, g_a.data_ptr<acc_t>(),
               e_a ? e_a->data_ptr<acc_t>() : nullptr, gh.data_ptr<scalar_t>(),
               compute_grad_weight ? gw_acc.data_ptr<acc_t>() : nullptr,
               b.has_value() ? gb_acc.data_ptr<acc_t>() : nullptr);
  });
  if (!gw_acc.is_same(gw)) gw.copy_(gw_acc);
  if (b.has_value()) gb.copy_(gb_acc);
  return {gh, gw, gb};
}

}  // namespace fastalign
