// segment_sum on the CPU: per-segment sums of a packed 1-D tensor, accumulated in float64.
// The small proof-of-path op of fastalign._C (used by the DPO family to sum token logprobs per sequence).
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace fastalign {

at::Tensor segment_sum_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens) {
  check_segment_sum_args(values, cu_seqlens);
  FA_CHECK_VALUE(values.device().is_cpu(), "values must be a CPU tensor for the cpu kernel; got ", values.device());
  const int64_t N = values.size(0);
  const int64_t S = cu_seqlens.size(0) - 1;
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* p_cu = cu.data_ptr<int64_t>();
  FA_CHECK_VALUE(p_cu[0] == 0, "cu_seqlens must start at 0; got ", p_cu[0]);
  FA_CHECK_VALUE(p_cu[S] == N, "cu_seqlens must end at the number of values (", N, "); got ", p_cu[S]);
  for (int64_t s = 0; s < S; ++s) {
    FA_CHECK_VALUE(p_cu[s + 1] >= p_cu[s], "cu_seqlens must be non-decreasing; got ", p_cu[s], " then ",
                   p_cu[s + 1], " at position ", s);
  }
  const at::Tensor x = values.contiguous();
  const auto out_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = new_output({S}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_sum_cpu", [&] {
    const scalar_t* p_x = x.data_ptr<scalar_t>();
    at::parallel_for(0, S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        double acc = 0.0;
        for (int64_t i = p_cu[s]; i < p_cu[s + 1]; ++i) acc += static_cast<double>(p_x[i]);
        if (out_dtype == at::kDouble) {
          out.data_ptr<double>()[s] = acc;
        } else {
          out.data_ptr<float>()[s] = static_cast<float>(acc);
        }
      }
    });
  });
  return out;
}

}  // namespace fastalign
