#include "common.h"

#include <limits>

namespace fastalign {

bool& poison_outputs() {
  static bool flag = false;
  return flag;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs() && out.numel() > 0) {
    if (at::isFloatingType(options.dtype().toScalarType())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(std::numeric_limits<int32_t>::min());
    }
  }
  return out;
}

}  // namespace fastalign
