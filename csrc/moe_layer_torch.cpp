// The torch bindings of the MoE layer's small kernels (moe_layer_kernels.cu), CUDA only, as private ops of
// the library that moe_gemm_torch.cpp opens: moe_gemm::_dispatch_kernel, _gated_activation_kernel and
// _combine_kernel. moe_gemm/_layer_ops.py decides when they apply and checks the arguments first; the checks
// below repeat that as a last guard.
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "moe_layer_kernels.h"

namespace {

moe_gemm::LayerDType to_layer_dtype(at::ScalarType type, char const* what) {
  switch (type) {
    case at::kFloat:
      return moe_gemm::LayerDType::kFloat32;
    case at::kBFloat16:
      return moe_gemm::LayerDType::kBFloat16;
    case at::kHalf:
      return moe_gemm::LayerDType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "moe_gemm: the layer kernels take float32, bfloat16 or float16 ", what, ", got ", type);
  return moe_gemm::LayerDType::kFloat32;  // not reached: the check throws
}

void check_cuda_contiguous(at::Tensor const& tensor, char const* name) {
  TORCH_CHECK(tensor.is_cuda() && tensor.is_contiguous(), "moe_gemm: ", name, " must be a contiguous CUDA tensor");
}

// (m_sizes [E], expert_of_row [P], pair_of_row [P], token_of_row [P], row_of_pair [P]) of ids [T, top_k].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_cuda(at::Tensor const& ids,
                                                                                     int64_t num_experts) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "moe_gemm: ids must be int64 [T, top_k]");
  check_cuda_contiguous(ids, "ids");
  TORCH_CHECK(num_experts >= 0 && num_experts <= moe_gemm::kDispatchMaxExperts,
              "moe_gemm: the dispatch kernel takes up to ", moe_gemm::kDispatchMaxExperts, " experts, got ",
              num_experts);
  TORCH_CHECK(ids.numel() <= INT32_MAX, "moe_gemm: the dispatch kernel takes fewer than 2^31 pairs");
  TORCH_CHECK(ids.size(1) >= 1 || ids.size(0) == 0, "moe_gemm: top_k must be at least 1");
  c10::cuda::CUDAGuard device_guard(ids.device());
  int64_t const P = ids.numel();
  auto const options = ids.options();
  at::Tensor m_sizes = at::empty({num_experts}, options);
  at::Tensor expert_of_row = at::empty({P}, options);
  at::Tensor pair_of_row = at::empty({P}, options);
  at::Tensor token_of_row = at::empty({P}, options);
  at::Tensor row_of_pair = at::empty({P}, options);

  moe_gemm::DispatchParams params;
  params.ids = ids.data_ptr<int64_t>();
  params.m_sizes = m_sizes.data_ptr<int64_t>();
  params.expert_of_row = expert_of_row.data_ptr<int64_t>();
  params.pair_of_row = pair_of_row.data_ptr<int64_t>();
  params.token_of_row = token_of_row.data_ptr<int64_t>();
  params.row_of_pair = row_of_pair.data_ptr<int64_t>();
  params.P = P;
  params.E = static_cast<int32_t>(num_experts);
  params.top_k = static_cast<int32_t>(std::max<int64_t>(1, ids.size(1)));
  C10_CUDA_CHECK(moe_gemm::run_dispatch(params, c10::cuda::getCurrentCUDAStream()));
  return {m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair};
}

// act(gate) * up of gate_up [rows, 2I]: act 0 silu, 1 gelu, 2 gelu_tanh (moe_gemm/_layer_ops.py's codes).
at::Tensor gated_activation_cuda(at::Tensor const& gate_up, int64_t act, bool concatenated) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 16 == 0,
              "moe_gemm: gate_up must be [rows, 2I] with I a multiple of 8, got ", gate_up.sizes());
  check_cuda_contiguous(gate_up, "gate_up");
  TORCH_CHECK(act >= 0 && act <= 2, "moe_gemm: unknown activation code ", act);
  c10::cuda::CUDAGuard device_guard(gate_up.device());
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  moe_gemm::GatedActivationParams params;
  params.gate_up = gate_up.data_ptr();
  params.out = out.data_ptr();
  params.rows = gate_up.size(0);
  params.I = gate_up.size(1) / 2;
  params.dtype = to_layer_dtype(gate_up.scalar_type(), "gate_up");
  params.act = static_cast<moe_gemm::GatedActivation>(act);
  params.concatenated = concatenated;
  C10_CUDA_CHECK(moe_gemm::run_gated_activation(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// out [T, H] = the weighted sum of each token's valid rows of y [T * top_k, H].
at::Tensor combine_cuda(at::Tensor const& y, at::Tensor const& row_of_pair, at::Tensor const& weights,
                        at::Tensor const& ids, int64_t num_experts) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "moe_gemm: ids must be int64 [T, top_k]");
  int64_t const T = ids.size(0), top_k = ids.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == T * top_k && y.size(1) % 8 == 0,
              "moe_gemm: y must be [T * top_k, H] with H a multiple of 8, got ", y.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes(), "moe_gemm: weights must be [T, top_k] like ids");
  TORCH_CHECK(row_of_pair.dim() == 1 && row_of_pair.size(0) == T * top_k && row_of_pair.scalar_type() == at::kLong,
              "moe_gemm: row_of_pair must be int64 [T * top_k]");
  for (auto const& [tensor, name] : {std::pair{&y, "y"}, std::pair{&row_of_pair, "row_of_pair"},
                                     std::pair{&weights, "weights"}, std::pair{&ids, "ids"}}) {
    check_cuda_contiguous(*tensor, name);
    TORCH_CHECK(tensor->device() == y.device(), "moe_gemm: ", name, " must be on the device of y");
  }
  TORCH_CHECK(T <= INT32_MAX, "moe_gemm: the combine kernel takes fewer than 2^31 tokens");
  c10::cuda::CUDAGuard device_guard(y.device());
  at::Tensor out = at::empty({T, y.size(1)}, y.options());
  moe_gemm::CombineParams params;
  params.y = y.data_ptr();
  params.row_of_pair = row_of_pair.data_ptr<int64_t>();
  params.weights = weights.data_ptr();
  params.ids = ids.data_ptr<int64_t>();
  params.out = out.data_ptr();
  params.T = T;
  params.H = y.size(1);
  params.top_k = static_cast<int32_t>(std::max<int64_t>(1, top_k));
  params.E = static_cast<int32_t>(num_experts);
  params.dtype = to_layer_dtype(y.scalar_type(), "y");
  params.weights_dtype = to_layer_dtype(weights.scalar_type(), "weights");
  C10_CUDA_CHECK(moe_gemm::run_combine(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_gemm, m) {
  m.def(
      "_dispatch_kernel(Tensor ids, int num_experts) -> (Tensor m_sizes, Tensor expert_of_row, Tensor pair_of_row, "
      "Tensor token_of_row, Tensor row_of_pair)");
  m.def("_gated_activation_kernel(Tensor gate_up, int act, bool concatenated) -> Tensor");
  m.def("_combine_kernel(Tensor y, Tensor row_of_pair, Tensor weights, Tensor ids, int num_experts) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("_dispatch_kernel", &dispatch_cuda);
  m.impl("_gated_activation_kernel", &gated_activation_cuda);
  m.impl("_combine_kernel", &combine_cuda);
}
