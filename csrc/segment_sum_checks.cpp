#include "common.h"
#include "ops.h"

namespace fastalign {

// Checks shared by the CPU and CUDA segment_sum (shapes, dtypes, devices; no data reads).
void check_segment_sum_args(const at::Tensor& values, const at::Tensor& cu_seqlens) {
  check_dim(values, "values", 1);
  check_floating(values, "values");
  check_dim(cu_seqlens, "cu_seqlens", 1);
  check_index(cu_seqlens, "cu_seqlens");
  FA_CHECK_VALUE(cu_seqlens.size(0) >= 1, "cu_seqlens must hold at least one offset (0); got an empty tensor");
  check_same_device(values, "values", cu_seqlens, "cu_seqlens");
}

}  // namespace fastalign
