// The single registration point of fastalign._C: torch.library ops (schemas here, one implementation per
// device key) and a few plain pybind11 helpers. Fake (meta) implementations live in Python, next to each op's
// wrapper, so torch.compile can trace the ops.
#include "common.h"
#include "ops.h"

TORCH_LIBRARY(fastalign, m) {
  m.def("segment_sum(Tensor values, Tensor cu_seqlens) -> Tensor");
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, Tensor? cu_seqlens, Tensor? bootstrap, float gamma, "
        "float lam) -> (Tensor, Tensor)");
  m.def("discounted_returns(Tensor rewards, Tensor? mask, Tensor? cu_seqlens, Tensor? bootstrap, float gamma) "
        "-> Tensor");
  m.def("linear_logprobs_fwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature, "
        "float? softcap, float logit_scale, int ignore_index, int vocab_start, int vocab_size) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("linear_logprobs_bwd(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, Tensor lse, "
        "Tensor? sum_pz, Tensor grad_logprobs, Tensor? grad_entropy, float temperature, float? softcap, "
        "float logit_scale, int ignore_index, int vocab_start, int vocab_size, bool compute_grad_weight) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastalign, CPU, m) {
  m.impl("segment_sum", &fastalign::segment_sum_cpu);
  m.impl("gae", &fastalign::gae_cpu);
  m.impl("discounted_returns", &fastalign::discounted_returns_cpu);
  m.impl("linear_logprobs_fwd", &fastalign::linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_bwd", &fastalign::linear_logprobs_bwd_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fastalign, CUDA, m) {
  m.impl("segment_sum", &fastalign::segment_sum_cuda);
  m.impl("gae", &fastalign::gae_cuda);
  m.impl("discounted_returns", &fastalign::discounted_returns_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastalign compiled kernels (CPU, and CUDA when built with it)";
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("_set_poison", [](bool on) { fastalign::poison_outputs() = on; },
        "Fill fresh outputs with NaN (tests only).");
  m.def("_get_poison", []() { return fastalign::poison_outputs(); });
}
