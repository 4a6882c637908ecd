// The torch binding of the fused routing kernel: moe_gemm::_route_kernel (a fragment of the library that
// moe_gemm_torch.cpp opens), CUDA only. The public op moe_gemm::route is defined in Python
// (moe_gemm/_routing_ops.py), whose CUDA kernel checks every argument and then calls this one; its CPU
// kernel, fake kernel and autograd live there too. The checks below repeat those as a last guard.
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "moe_routing.h"

namespace {

// 0 softmax, 1 softmax_topk, 2 sigmoid: the order of moe_gemm.routing.SCORINGS.
moe_gemm::RoutingScoring to_scoring(int64_t scoring) {
  TORCH_CHECK(scoring >= 0 && scoring <= 2, "moe_gemm.route: unknown scoring code ", scoring);
  return scoring == 0 ? moe_gemm::RoutingScoring::kSoftmax
         : scoring == 1 ? moe_gemm::RoutingScoring::kSoftmaxTopK
                        : moe_gemm::RoutingScoring::kSigmoid;
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
      break;
  }
  TORCH_CHECK(false, "moe_gemm.route: the CUDA kernel takes float32, bfloat16 or float16 logits, got ", type);
  return moe_gemm::RoutingLogitsDType::kFloat32;  // not reached: the check throws
}

// (weights float32 [T, top_k], ids int64 [T, top_k]) of router_logits [T, E].
// n_group = topk_group = 0: no groups.
std::tuple<at::Tensor, at::Tensor> route_cuda(at::Tensor const& router_logits, int64_t top_k, int64_t scoring,
                                              bool renormalize, int64_t n_group, int64_t topk_group,
                                              std::optional<at::Tensor> const& e_score_correction_bias,
                                              double routed_scaling_factor) {
  TORCH_CHECK(router_logits.dim() == 2, "moe_gemm.route: router_logits must be [T, E], got ", router_logits.sizes());
  TORCH_CHECK(router_logits.is_cuda(), "moe_gemm.route: router_logits must be a CUDA tensor");
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
  params.n_group = static_cast<int32_t>(n_group);
  params.topk_group = static_cast<int32_t>(topk_group);
  params.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  char const* problem = moe_gemm::check_routing(params);
  TORCH_CHECK(problem == nullptr, "moe_gemm.route: ", problem);

  C10_CUDA_CHECK(moe_gemm::run_routing(params, c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_gemm, m) {
  m.def(
      "_route_kernel(Tensor router_logits, int top_k, int scoring, bool renormalize, int n_group, int topk_group, "
      "Tensor? e_score_correction_bias, float routed_scaling_factor) -> (Tensor weights, Tensor ids)");
}

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("_route_kernel", &route_cuda);
}
