// Host side of the CUDA GAE: checks (shapes, dtypes, devices only: reading cu_seqlens or the mask would cost a
// host sync), allocation, and the launch on the current stream.
#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"
#include "gae.cuh"
#include "ops.h"

namespace fastalign {

namespace {

kernels::DType kernel_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kDouble: return kernels::DType::kFloat64;
    case at::kHalf: return kernels::DType::kFloat16;
    default: return kernels::DType::kBFloat16;
  }
}

// The mask as the kernel reads it, in its own dtype (no conversion pass): elements of its width, valid where
// nonzero with the sign bit of floating dtypes cleared (so -0.0 is 0), as on the CPU.
kernels::MaskView mask_view(const at::Tensor& m) {
  if (!m.defined()) return {nullptr, 1, 0};
  const int bytes = static_cast<int>(m.element_size());
  const uint64_t all = bytes == 8 ? ~uint64_t(0) : (uint64_t(1) << (8 * bytes)) - 1;
  const uint64_t mag = at::isFloatingType(m.scalar_type()) ? all >> 1 : all;
  return {m.data_ptr(), bytes, mag};
}

void gae_cuda_impl(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                   const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
                   const c10::optional<at::Tensor>& bootstrap, double gamma, double lam, int64_t S, at::Tensor& adv,
                   at::Tensor* ret) {
  FA_CHECK_VALUE(rewards.is_cuda(), "rewards must be a CUDA tensor for the cuda kernel; got ", rewards.device());
  const c10::cuda::CUDAGuard guard(rewards.device());
  const at::Tensor r = rewards.contiguous();
  const at::Tensor v = values.has_value() ? values->contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor boot = bootstrap.has_value() ? bootstrap->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor cu = cu_seqlens.has_value() ? cu_seqlens->to(at::kLong).contiguous() : at::Tensor();
  adv = new_output(r.sizes(), r.options().dtype(at::kFloat));
  if (ret != nullptr) *ret = new_output(r.sizes(), r.options().dtype(at::kFloat));
  const cudaError_t err = kernels::gae(
      r.data_ptr(), v.defined() ? v.data_ptr() : nullptr, kernel_dtype(r), mask_view(m),
      cu.defined() ? cu.data_ptr<int64_t>() : nullptr, boot.defined() ? boot.data_ptr<float>() : nullptr, S,
      cu.defined() ? 0 : r.size(1), r.numel(), static_cast<float>(gamma), static_cast<float>(lam),
      adv.data_ptr<float>(), ret != nullptr ? ret->data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gae CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& cu_seqlens,
                                            const c10::optional<at::Tensor>& bootstrap, double gamma, double lam) {
  const int64_t S = check_gae_args(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam);
  at::Tensor adv, ret;
  gae_cuda_impl(rewards, values, mask, cu_seqlens, bootstrap, gamma, lam, S, adv, &ret);
  return {adv, ret};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& cu_seqlens,
                                   const c10::optional<at::Tensor>& bootstrap, double gamma) {
  const int64_t S = check_gae_args(rewards, c10::nullopt, mask, cu_seqlens, bootstrap, gamma, 1.0);
  at::Tensor out;
  gae_cuda_impl(rewards, c10::nullopt, mask, cu_seqlens, bootstrap, gamma, 1.0, S, out, nullptr);
  return out;
}

}  // namespace fastalign
#endif  // WITH_CUDA
