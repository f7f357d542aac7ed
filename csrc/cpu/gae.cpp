// GAE and discounted returns on the CPU: parallel over sequences, one tight reverse loop per sequence with the
// state (next advantage, next value) in registers, in float32 whatever the input dtype.
//
// The recurrence is serial in time: one sequence alone runs at the latency of its multiply-add chain. In the
// padded layout, where all rows have length T, kLanes rows are walked in lockstep (independent chains the core
// overlaps; masked positions handled by selects, not branches). Packed sequences of different lengths, and
// the rows left over, take the one-sequence loop.
//
// The mask is read as it comes (bool, any integer or floating dtype), as raw bits of its width: a position is
// valid when its bits, sign bit aside for floating dtypes, are not all 0 (so -0.0 is 0), and the 0/1 check is
// "valid implies bits == the dtype's 1". The check rides in the same pass (one OR per element); a failure is
// located and reported after it. So every mask dtype takes the same arithmetic: outputs are bitwise identical.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>

#include "common.h"
#include "ops.h"

namespace fastalign {

namespace {

// The bits of a mask dtype: `mag` clears the sign bit of floating dtypes, `one` is the pattern of 1, and
// `check` is false for bool (any nonzero byte is true there).
struct MaskBits {
  uint64_t mag, one;
  bool check;
};

template <typename value_t>
uint64_t bits_of_one() {
  const value_t one = static_cast<value_t>(1);
  uint64_t bits = 0;
  std::memcpy(&bits, &one, sizeof(value_t));
  return bits;
}

MaskBits mask_bits(at::ScalarType s) {
  switch (s) {
    case at::kBool: return {0xffu, 1u, false};
    case at::kByte: return {0xffu, 1u, true};
    case at::kChar: return {0xffu, 1u, true};
    case at::kShort: return {0xffffu, 1u, true};
    case at::kInt: return {0xffffffffu, 1u, true};
    case at::kLong: return {~uint64_t(0), 1u, true};
    case at::kHalf: return {0x7fffu, bits_of_one<at::Half>(), true};
    case at::kBFloat16: return {0x7fffu, bits_of_one<at::BFloat16>(), true};
    case at::kFloat: return {0x7fffffffu, bits_of_one<float>(), true};
    case at::kDouble: return {~uint64_t(0) >> 1, bits_of_one<double>(), true};
    default:
      FA_CHECK_TYPE(false, "mask must be bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32 or "
                    "float64; got ", s);
  }
  return {0, 0, false};
}

// One sequence, walked backward. Masked positions (mask bits 0) are skipped: outputs 0, state untouched.
// Returns true when a valid position's mask is not the dtype's 1 (the caller raises).
template <typename scalar_t, typename acc_t, typename mask_t>
inline bool gae_sequence(const scalar_t* r, const scalar_t* v, const mask_t* m, MaskBits mb, int64_t L,
                         acc_t next_value, acc_t gamma, acc_t lam, acc_t* adv, acc_t* ret) {
  const acc_t gl = gamma * lam;
  acc_t next_adv = 0;
  bool bad = false;
  for (int64_t t = L - 1; t >= 0; --t) {
    if (m != nullptr) {
      const uint64_t bits = m[t];
      if ((bits & mb.mag) == 0) {
        adv[t] = 0;
        if (ret != nullptr) ret[t] = 0;
        continue;
      }
      bad |= mb.check && bits != mb.one;
    }
    const acc_t vt = v != nullptr ? static_cast<acc_t>(v[t]) : acc_t(0);
    const acc_t delta = static_cast<acc_t>(r[t]) + gamma * next_value - vt;
    const acc_t a = delta + gl * next_adv;
    adv[t] = a;
    if (ret != nullptr) ret[t] = a + vt;
    next_adv = a;
    next_value = vt;
  }
  return bad;
}

// kLanes rows of a padded batch (row j at offset j * T), in lockstep; same arithmetic and mask rule as
// gae_sequence.
template <typename scalar_t, typename mask_t, int kLanes, bool HAS_VALUES, bool HAS_MASK, bool HAS_RET>
inline bool gae_rows(const scalar_t* r, const scalar_t* v, const mask_t* m, MaskBits mb, int64_t T,
                     const float* boot, float gamma, float lam, float* adv, float* ret) {
  const float gl = gamma * lam;
  uint64_t bad = 0;  // OR of (bits ^ one) over valid positions: nonzero when one is not 1
  float next_value[kLanes], next_adv[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    next_value[j] = boot != nullptr ? boot[j] : 0.0f;
    next_adv[j] = 0.0f;
  }
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 8
    for (int j = 0; j < kLanes; ++j) {
      const int64_t i = j * T + t;
      const uint64_t bits = HAS_MASK ? static_cast<uint64_t>(m[i]) : 1u;
      const bool valid = !HAS_MASK || (bits & mb.mag) != 0;
      if (HAS_MASK) bad |= valid ? bits ^ mb.one : 0u;
      const float vt = HAS_VALUES ? static_cast<float>(v[i]) : 0.0f;
      const float delta = static_cast<float>(r[i]) + gamma * next_value[j] - vt;
      const float a = delta + gl * next_adv[j];
      adv[i] = valid ? a : 0.0f;
      if (HAS_RET) ret[i] = valid ? a + vt : 0.0f;
      next_adv[j] = valid ? a : next_adv[j];
      next_value[j] = valid ? vt : next_value[j];
    }
  }
  return mb.check && bad != 0;
}

template <typename scalar_t, typename mask_t, int kLanes>
inline bool gae_rows_dispatch(const scalar_t* r, const scalar_t* v, const mask_t* m, MaskBits mb, int64_t T,
                              const float* boot, float gamma, float lam, float* adv, float* ret) {
  if (v != nullptr && ret != nullptr) {
    if (m != nullptr) {
      return gae_rows<scalar_t, mask_t, kLanes, true, true, true>(r, v, m, mb, T, boot, gamma, lam, adv, ret);
    }
    return gae_rows<scalar_t, mask_t, kLanes, true, false, true>(r, v, m, mb, T, boot, gamma, lam, adv, ret);
  }
  if (m != nullptr) {
    return gae_rows<scalar_t, mask_t, kLanes, false, true, false>(r, v, m, mb, T, boot, gamma, lam, adv, ret);
  }
  return gae_rows<scalar_t, mask_t, kLanes, false, false, false>(r, v, m, mb, T, boot, gamma, lam, adv, ret);
}

// Raise for the first position whose mask is neither 0 nor the dtype's 1 (after a kernel pass flagged one).
template <typename mask_t>
void raise_bad_mask(const at::Tensor& m, MaskBits mb) {
  const mask_t* p = static_cast<const mask_t*>(m.data_ptr());
  const int64_t T = m.size(1);
  for (int64_t i = 0; i < m.numel(); ++i) {
    const uint64_t bits = p[i];
    if ((bits & mb.mag) != 0 && bits != mb.one) {
      FA_CHECK_VALUE(false, "mask must hold only 0 and 1; got ", m.reshape(-1)[i].item(), " at index (", i / T,
                     ", ", i % T, ")");
    }
  }
}

}  // namespace

// Shapes, dtypes and devices (no data reads), shared by the CPU and CUDA entry points.
// Padded: rewards [B, T], values/mask [B, T], bootstrap [B]. Packed: rewards [N], cu_seqlens [S+1], bootstrap [S].
int64_t check_gae_args(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                       const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
                       const c10::optional<at::Tensor>& bootstrap, double gamma, double lam) {
  check_floating(rewards, "rewards");
  FA_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1]; got ", gamma);
  FA_CHECK_VALUE(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1]; got ", lam);
  if (values.has_value()) {
    check_floating(*values, "values");
    FA_CHECK_TYPE(values->scalar_type() == rewards.scalar_type(), "values must have the dtype of rewards (",
                  rewards.scalar_type(), "); got ", values->scalar_type());
    FA_CHECK_VALUE(values->sizes() == rewards.sizes(), "values must have the shape of rewards ", rewards.sizes(),
                   "; got ", values->sizes());
    check_same_device(rewards, "rewards", *values, "values");
  }
  int64_t num_seqs;
  if (cu_seqlens.has_value()) {
    check_dim(rewards, "rewards", 1);
    check_dim(*cu_seqlens, "cu_seqlens", 1);
    check_index(*cu_seqlens, "cu_seqlens");
    FA_CHECK_VALUE(cu_seqlens->size(0) >= 1, "cu_seqlens must hold at least one offset (0); got an empty tensor");
    FA_CHECK_VALUE(!mask.has_value(), "mask must be None with cu_seqlens (packed tokens are all valid)");
    check_same_device(rewards, "rewards", *cu_seqlens, "cu_seqlens");
    num_seqs = cu_seqlens->size(0) - 1;
  } else {
    check_dim(rewards, "rewards", 2);
    if (mask.has_value()) {
      mask_bits(mask->scalar_type());  // raises for a dtype the kernels cannot read
      FA_CHECK_VALUE(mask->sizes() == rewards.sizes(), "mask must have the shape of rewards ", rewards.sizes(),
                     "; got ", mask->sizes());
      check_same_device(rewards, "rewards", *mask, "mask");
    }
    num_seqs = rewards.size(0);
  }
  if (bootstrap.has_value()) {
    check_dim(*bootstrap, "bootstrap", 1);
    check_floating(*bootstrap, "bootstrap");
    FA_CHECK_VALUE(bootstrap->size(0) == num_seqs, "bootstrap must have one value per sequence (", num_seqs,
                   "); got shape ", bootstrap->sizes());
    check_same_device(rewards, "rewards", *bootstrap, "bootstrap");
  }
  return num_seqs;
}

namespace {

// The CPU launcher behind both ops; `ret` is undefined (and not written) for discounted returns.
void gae_cpu_impl(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                  const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
                  const c10::optional<at::Tensor>& bootstrap, double gamma, double lam, int64_t S, at::Tensor& adv,
                  at::Tensor* ret) {
  FA_CHECK_VALUE(rewards.device().is_cpu(), "rewards must be a CPU tensor for the cpu kernel; got ",
                 rewards.device());
  const at::Tensor r = rewards.contiguous();
  const at::Tensor v = values.has_value() ? values->contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const auto acc_type = at::kFloat;
  const at::Tensor boot = bootstrap.has_value() ? bootstrap->to(acc_type).contiguous() : at::Tensor();
  at::Tensor cu;
  const int64_t N = r.numel();
  if (cu_seqlens.has_value()) {
    cu = cu_seqlens->to(at::kLong).contiguous();
    const int64_t* p_cu = cu.data_ptr<int64_t>();
    FA_CHECK_VALUE(p_cu[0] == 0, "cu_seqlens must start at 0; got ", p_cu[0]);
    FA_CHECK_VALUE(p_cu[S] == N, "cu_seqlens must end at the number of tokens (", N, "); got ", p_cu[S]);
    for (int64_t s = 0; s < S; ++s) {
      FA_CHECK_VALUE(p_cu[s + 1] >= p_cu[s], "cu_seqlens must be non-decreasing; got ", p_cu[s], " then ",
                     p_cu[s + 1], " at position ", s);
    }
  }
  adv = new_output(r.sizes(), r.options().dtype(acc_type));
  if (ret != nullptr) *ret = new_output(r.sizes(), r.options().dtype(acc_type));
  const int64_t T = cu.defined() ? 0 : r.size(1);
  const int64_t* p_cu = cu.defined() ? cu.data_ptr<int64_t>() : nullptr;
  const MaskBits mb = m.defined() ? mask_bits(m.scalar_type()) : MaskBits{0, 0, false};
  const int64_t avg_len = S > 0 ? std::max<int64_t>(1, N / S) : 1;
  std::atomic<bool> bad_mask{false};
  // The mask is read as unsigned integers of its width (see the header comment): one instantiation per width.
  auto run = [&](auto mask_tag) {
    using mask_t = decltype(mask_tag);
    const mask_t* p_m = m.defined() ? static_cast<const mask_t*>(m.data_ptr()) : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "gae_cpu", [&] {
      using acc_t = float;
      const scalar_t* p_r = r.data_ptr<scalar_t>();
      const scalar_t* p_v = v.defined() ? v.data_ptr<scalar_t>() : nullptr;
      const acc_t* p_boot = boot.defined() ? boot.data_ptr<acc_t>() : nullptr;
      acc_t* p_adv = adv.data_ptr<acc_t>();
      acc_t* p_ret = ret != nullptr ? ret->data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, S, std::max<int64_t>(8, 16384 / avg_len), [&](int64_t begin, int64_t end) {
        constexpr int kLanes = 8;
        bool bad = false;
        int64_t s = begin;
        if (p_cu == nullptr) {
          for (; s + kLanes <= end; s += kLanes) {
            const int64_t off = s * T;
            bad |= gae_rows_dispatch<scalar_t, mask_t, kLanes>(
                p_r + off, p_v != nullptr ? p_v + off : nullptr, p_m != nullptr ? p_m + off : nullptr, mb, T,
                p_boot != nullptr ? p_boot + s : nullptr, static_cast<float>(gamma), static_cast<float>(lam),
                p_adv + off, p_ret != nullptr ? p_ret + off : nullptr);
          }
        }
        for (; s < end; ++s) {
          const int64_t off = p_cu != nullptr ? p_cu[s] : s * T;
          const int64_t L = p_cu != nullptr ? p_cu[s + 1] - p_cu[s] : T;
          bad |= gae_sequence<scalar_t, acc_t, mask_t>(
              p_r + off, p_v != nullptr ? p_v + off : nullptr, p_m != nullptr ? p_m + off : nullptr, mb, L,
              p_boot != nullptr ? p_boot[s] : acc_t(0), static_cast<acc_t>(gamma), static_cast<acc_t>(lam),
              p_adv + off, p_ret != nullptr ? p_ret + off : nullptr);
        }
        if (bad) bad_mask.store(true, std::memory_order_relaxed);
      });
    });
    if (bad_mask.load()) raise_bad_mask<mask_t>(m, mb);
  };
  switch (m.defined() ? m.element_size() : 1) {
    case 1: run(uint8_t{}); break;
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    default: run(uint64_t{}); break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& cu_seqlens,
                                           const c10::optional<at::Tensor>& bootstrap, double gamma, double lam) {
  const int64_t S = check_gae_args(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam);
  at::Tensor adv, ret;
  gae_cpu_impl(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam, S, adv, &ret);
  return {adv, ret};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& cu_seqlens,
                                  const c10::optional<at::Tensor>& bootstrap, double gamma) {
  const int64_t S = check_gae_args(rewards, c10::nullopt, mask, cu_seqlens, bootstrap, gamma, 1.0);
  at::Tensor out;
  gae_cpu_impl(rewards, c10::nullopt, mask, cu_seqlens, bootstrap, gamma, 1.0, S, out, nullptr);
  return out;
}

}  // namespace fastalign
