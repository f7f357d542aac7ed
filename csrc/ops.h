// Declarations of every host function registered in bindings.cpp, grouped by op.
#pragma once

#include <torch/extension.h>

namespace fastalign {

// segment_sum(values [N], cu_seqlens [S+1]) -> [S]
void check_segment_sum_args(const at::Tensor& values, const at::Tensor& cu_seqlens);
at::Tensor segment_sum_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens);
#ifdef WITH_CUDA
at::Tensor segment_sum_cuda(const at::Tensor& values, const at::Tensor& cu_seqlens);
#endif

// gae(rewards, values, mask?, cu_seqlens?, bootstrap?, gamma, lam) -> (advantages, returns);
// discounted_returns(rewards, mask?, cu_seqlens?, bootstrap?, gamma) -> returns
int64_t check_gae_args(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                       const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& cu_seqlens,
                       const c10::optional<at::Tensor>& bootstrap, double gamma, double lam);
std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const c10::optional<at::Tensor>& mask,
                                           const c10::optional<at::Tensor>& cu_seqlens,
                                           const c10::optional<at::Tensor>& bootstrap, double gamma, double lam);
at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                  const c10::optional<at::Tensor>& cu_seqlens,
                                  const c10::optional<at::Tensor>& bootstrap, double gamma);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& cu_seqlens,
                                            const c10::optional<at::Tensor>& bootstrap, double gamma, double lam);
at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& cu_seqlens,
                                   const c10::optional<at::Tensor>& bootstrap, double gamma);
#endif
// linear_logprobs: (hidden [N, D], weight [V, D], targets [N], bias [V]?) -> (lse, z_target, sum_pz) [N] and the
// backward -> (grad_hidden [N, D], grad_weight [V, D] or [0, D], grad_bias [V] or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, double temperature, std::optional<double> softcap, double logit_scale,
    int64_t ignore_index, int64_t vocab_start, int64_t vocab_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const std::optional<at::Tensor>& sum_pz,
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, double temperature,
    std::optional<double> softcap, double logit_scale, int64_t ignore_index, int64_t vocab_start, int64_t vocab_size,
    bool compute_grad_weight);

}  // namespace fastalign
