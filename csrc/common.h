// Shared host-side helpers of fastalign._C: argument checks that raise Python exceptions, and the
// output allocator that the test suite can poison with NaN.
#pragma once

#include <torch/extension.h>

#include <sstream>
#include <string>

namespace fastalign {

// Argument checks. Each raises a Python exception (never aborts): FA_CHECK_VALUE -> ValueError,
// FA_CHECK_TYPE -> TypeError. Messages name the argument, the expected and the actual value.
#define FA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE((cond), __VA_ARGS__)
#define FA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE((cond), __VA_ARGS__)

// `name` must have `ndim` dimensions.
inline void check_dim(const at::Tensor& t, const char* name, int64_t ndim) {
  FA_CHECK_VALUE(t.dim() == ndim, name, " must be ", ndim, "-D; got shape ", t.sizes());
}

// `name` must be one of the floating dtypes fastalign computes with.
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  FA_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, name,
                " must be float32, float64, bfloat16 or float16; got ", s);
}

// `name` must be an integer index tensor (int32 or int64).
inline void check_index(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  FA_CHECK_TYPE(s == at::kInt || s == at::kLong, name, " must be int32 or int64; got ", s);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  FA_CHECK_VALUE(a.device() == b.device(), an, " and ", bn, " must be on the same device; got ", a.device(),
                 " and ", b.device());
}

// When true (set by the test suite through _C._set_poison), fresh outputs are filled with NaN (floating)
// or the most negative value (integers) so that an element a kernel forgets to write is caught.
bool& poison_outputs();

// at::empty, poisoned when the test suite asks for it.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fastalign
