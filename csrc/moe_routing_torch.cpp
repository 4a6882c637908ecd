// The torch binding of the fused routing kernel: the schema of moe_gemm::route (a fragment of the
// library that moe_gemm_torch.cpp opens) and its CUDA kernel. The CPU kernel, the fallback while the
// extension is absent, the fake kernel and autograd are registered in Python (moe_gemm/_routing_ops.py).
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "moe_routing.h"

namespace {

moe_gemm::RoutingScoring to_scoring(std::string_view scoring) {
  if (scoring == "softmax") return moe_gemm::RoutingScoring::kSoftmax;
  if (scoring == "softmax_topk") return moe_gemm::RoutingScoring::kSoftmaxTopK;
  TORCH_CHECK(scoring == "sigmoid", "moe_gemm.route: scoring must be softmax, softmax_topk or sigmoid, got ", scoring);
  return moe_gemm::RoutingScoring::kSigmoid;
}

moe_gemm::RoutingLogitsDType to_logits_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return moe_gemm::RoutingLogitsDType::kFloat32;
    case at::kBFloat16:
      return moe_gemm::RoutingLogitsDType::kBFloat16;
    case at::kHalf:
      return moe_gemm::RoutingLogitsDType::kFloat16;
    default:
      TORCH_CHECK(false, "moe_gemm.route: the CUDA kernel takes float32, bfloat16 or float16 logits, got ", type);
  }
}

// (weights float32 [T, top_k], ids int64 [T, top_k]) of router_logits [T, E].
std::tuple<at::Tensor, at::Tensor> route_cuda(at::Tensor const& router_logits, int64_t top_k,
                                              c10::string_view scoring, bool renormalize,
                                              std::optional<int64_t> n_group, std::optional<int64_t> topk_group,
                                              std::optional<at::Tensor> const& e_score_correction_bias,
                                              double routed_scaling_factor) {
  TORCH_CHECK(router_logits.dim() == 2, "moe_gemm.route: router_logits must be [T, E], got ", router_logits.sizes());
  TORCH_CHECK(router_logits.is_cuda(), "moe_gemm.route: router_logits must be a CUDA tensor");
  TORCH_CHECK(n_group.has_value() == topk_group.has_value(), "moe_gemm.route: n_group and topk_group go together");
  int64_t const T = router_logits.size(0), E = router_logits.size(1);
  TORCH_CHECK(E <= moe_gemm::kRoutingMaxExperts && top_k <= moe_gemm::kRoutingMaxTopK,
              "moe_gemm.route: the CUDA kernel takes up to ", moe_gemm::kRoutingMaxExperts, " experts and top_k up to ",
              moe_gemm::kRoutingMaxTopK, ", got E = ", E, ", top_k = ", top_k,
              " (moe_gemm.route falls back to PyTorch ops there)");

  c10::cuda::CUDAGuard device_guard(router_logits.device());
  // The kernel reads rows with unit inner stride.
  at::Tensor const logits = router_logits.stride(1) == 1 ? router_logits : router_logits.contiguous();
  at::Tensor bias;
  if (e_score_correction_bias.has_value()) {
    TORCH_CHECK(e_score_correction_bias->dim() == 1 && e_score_correction_bias->size(0) == E,
                "moe_gemm.route: e_score_correction_bias must be [", E, "], got ", e_score_correction_bias->sizes());
    TORCH_CHECK(e_score_correction_bias->device() == router_logits.device(),
                "moe_gemm.route: e_score_correction_bias must be on the device of router_logits");
    bias = e_score_correction_bias->to(at::kFloat).contiguous();
  }
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));

  moe_gemm::RoutingParams params;
  params.logits = logits.data_ptr();
  params.logits_row_stride = logits.stride(0);
  params.dtype = to_logits_dtype(logits.scalar_type());
  params.e_score_correction_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  params.weights = weights.data_ptr<float>();
  params.ids = ids.data_ptr<int64_t>();
  params.T = T;
  params.E = static_cast<int32_t>(E);
  params.top_k = static_cast<int32_t>(top_k);
  params.scoring = to_scoring(scoring);
  params.renormalize = renormalize;
  params.n_group = static_cast<int32_t>(n_group.value_or(0));
  params.topk_group = static_cast<int32_t>(topk_group.value_or(0));
  params.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  char const* problem = moe_gemm::check_routing(params);
  TORCH_CHECK(problem == nullptr, "moe_gemm.route: ", problem);

  C10_CUDA_CHECK(moe_gemm::run_routing(params, c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

}  // namespace

// The schema is also in moe_gemm/_routing_ops.py (defined there when the extension is absent): keep both equal.
TORCH_LIBRARY_FRAGMENT(moe_gemm, m) {
  m.def(
      "route(Tensor router_logits, int top_k, str scoring, bool renormalize, int? n_group, int? topk_group, "
      "Tensor? e_score_correction_bias, float routed_scaling_factor) -> (Tensor weights, Tensor ids)");
}

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("route", &route_cuda);
}
