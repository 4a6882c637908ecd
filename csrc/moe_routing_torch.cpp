// The CUDA kernel of the op moe_gemm::route (its schema, CPU kernel, fake kernel and autograd are Python, in
// moe_gemm/_ops.py): the fused routing kernel of moe_routing.cu. moe_gemm.route checks its arguments before it calls
// the op, so that users see errors that name them; the checks here guard direct calls of the op.
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "moe_routing.h"
#include "moe_torch_checks.h"

namespace {

constexpr char const* kOp = "moe_gemm.route";

// The values of the schema's `str scoring`, as moe_gemm.routing.SCORINGS spells them.
using moe_gemm::RoutingScoring;
constexpr std::array<std::pair<c10::string_view, RoutingScoring>, 3> kScorings{
    {{"softmax", RoutingScoring::kSoftmax}, {"softmax_topk", RoutingScoring::kSoftmaxTopK},
     {"sigmoid", RoutingScoring::kSigmoid}}};

// (weights float32 [T, top_k], ids int64 [T, top_k]) of router_logits [T, E].
std::tuple<at::Tensor, at::Tensor> route_cuda(at::Tensor const& router_logits, int64_t top_k,
                                              c10::string_view scoring, bool renormalize,
                                              std::optional<int64_t> n_group, std::optional<int64_t> topk_group,
                                              std::optional<at::Tensor> const& e_score_correction_bias,
                                              double routed_scaling_factor) {
  TORCH_CHECK(router_logits.dim() == 2, kOp, ": router_logits must be [T, E], got ", router_logits.sizes());
  TORCH_CHECK(router_logits.is_cuda(), kOp, ": router_logits must be a CUDA tensor");
  moe_gemm::check_sm90(router_logits.device(), kOp);
  int64_t const T = router_logits.size(0), E = router_logits.size(1);
  TORCH_CHECK(E <= moe_gemm::kRoutingMaxExperts && top_k <= moe_gemm::kRoutingMaxTopK, kOp,
              ": the CUDA kernel takes up to ", moe_gemm::kRoutingMaxExperts, " experts and top_k up to ",
              moe_gemm::kRoutingMaxTopK, ", got E = ", E, ", top_k = ", top_k,
              " (moe_gemm.route falls back to PyTorch ops there)");
  TORCH_CHECK(n_group.has_value() == topk_group.has_value(), kOp, ": n_group and topk_group go together");
  if (n_group.has_value()) {
    TORCH_CHECK(*n_group >= 1 && E % *n_group == 0 && *topk_group >= 1 && *topk_group <= *n_group, kOp,
                ": need n_group dividing E = ", E, " and 1 <= topk_group <= n_group, got ", *n_group, ", ",
                *topk_group);
    // Only the experts of the kept groups can be chosen.
    TORCH_CHECK(top_k <= *topk_group * (E / *n_group), kOp, ": top_k = ", top_k, " experts cannot come from ",
                "topk_group = ", *topk_group, " groups of ", E / *n_group, " experts");
  }

  c10::cuda::CUDAGuard device_guard(router_logits.device());
  // The kernel reads rows with unit inner stride.
  at::Tensor const logits = router_logits.stride(1) == 1 ? router_logits : router_logits.contiguous();
  at::Tensor bias;
  if (e_score_correction_bias.has_value()) {
    TORCH_CHECK(e_score_correction_bias->dim() == 1 && e_score_correction_bias->size(0) == E, kOp,
                ": e_score_correction_bias must be [", E, "], got ", e_score_correction_bias->sizes());
    TORCH_CHECK(e_score_correction_bias->device() == router_logits.device(), kOp,
                ": e_score_correction_bias must be on the device of router_logits");
    bias = e_score_correction_bias->to(at::kFloat).contiguous();
  }
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));

  moe_gemm::RoutingParams params;
  params.logits = logits.data_ptr();
  params.logits_row_stride = logits.stride(0);
  params.dtype = moe_gemm::to_dtype(logits.scalar_type(), kOp, "router_logits");
  params.e_score_correction_bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  params.weights = weights.data_ptr<float>();
  params.ids = ids.data_ptr<int64_t>();
  params.T = T;
  params.E = static_cast<int32_t>(E);
  params.top_k = static_cast<int32_t>(top_k);
  params.scoring = moe_gemm::from_name(scoring, kScorings, kOp, "scoring");
  params.renormalize = renormalize;
  // 0: no groups.
  params.n_group = static_cast<int32_t>(n_group.value_or(0));
  params.topk_group = static_cast<int32_t>(topk_group.value_or(0));
  params.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  char const* problem = moe_gemm::check_routing(params);
  TORCH_CHECK(problem == nullptr, kOp, ": ", problem);

  C10_CUDA_CHECK(moe_gemm::run_routing(params, c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("route", &route_cuda);
}
