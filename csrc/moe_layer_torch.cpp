// The CUDA kernels of the ops moe_gemm::dispatch_pairs, gated_activation, gated_activation_backward, combine_rows,
// _quantize_fp8_kernel and _quantize_fp8_weight_kernel (their schemas and fake kernels are Python, in
// moe_gemm/_ops.py): the MoE layer's small kernels of moe_layer_kernels.cu. The layer calls them only where
// moe_gemm/_ops.py's *_applies (or routers) say they take the arguments; the checks here guard direct calls.
#include <algorithm>
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

#include "moe_layer_kernels.h"
#include "moe_torch_checks.h"

namespace {

// Prefixes the messages of the checks that the three kernels share.
constexpr char const* kOp = "moe_gemm";

// The values of gated_activation's `str act` (moe_gemm._ops.ACTIVATIONS).
using moe_gemm::GatedActivation;
constexpr std::array<std::pair<c10::string_view, GatedActivation>, 3> kActivations{
    {{"silu", GatedActivation::kSilu}, {"gelu", GatedActivation::kGelu}, {"gelu_tanh", GatedActivation::kGeluTanh}}};

void check_cuda_contiguous(at::Tensor const& tensor, char const* name) {
  TORCH_CHECK(tensor.is_cuda() && tensor.is_contiguous(), "moe_gemm: ", name, " must be a contiguous CUDA tensor");
  moe_gemm::check_sm90(tensor.device(), kOp);
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
  // Scratch of the multi-CTA sort, from the caching allocator (no host sync, and CUDA graphs keep it).
  at::Tensor block_counts =
      at::empty({moe_gemm::dispatch_workspace_ints(P, static_cast<int32_t>(num_experts))}, options.dtype(at::kInt));

  moe_gemm::DispatchParams params;
  params.ids = ids.data_ptr<int64_t>();
  params.m_sizes = m_sizes.data_ptr<int64_t>();
  params.expert_of_row = expert_of_row.data_ptr<int64_t>();
  params.pair_of_row = pair_of_row.data_ptr<int64_t>();
  params.token_of_row = token_of_row.data_ptr<int64_t>();
  params.row_of_pair = row_of_pair.data_ptr<int64_t>();
  params.block_counts = block_counts.data_ptr<int32_t>();
  params.P = P;
  params.E = static_cast<int32_t>(num_experts);
  params.top_k = static_cast<int32_t>(std::max<int64_t>(1, ids.size(1)));
  C10_CUDA_CHECK(moe_gemm::run_dispatch(params, c10::cuda::getCurrentCUDAStream()));
  return {m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair};
}

// act(gate) * up of gate_up [rows, 2I].
at::Tensor gated_activation_cuda(at::Tensor const& gate_up, c10::string_view act, bool concatenated) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 16 == 0,
              "moe_gemm: gate_up must be [rows, 2I] with I a multiple of 8, got ", gate_up.sizes());
  check_cuda_contiguous(gate_up, "gate_up");
  c10::cuda::CUDAGuard device_guard(gate_up.device());
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  moe_gemm::GatedActivationParams params;
  params.gate_up = gate_up.data_ptr();
  params.out = out.data_ptr();
  params.rows = gate_up.size(0);
  params.I = gate_up.size(1) / 2;
  params.dtype = moe_gemm::to_dtype(gate_up.scalar_type(), kOp, "gate_up");
  params.act = moe_gemm::from_name(act, kActivations, "moe_gemm.gated_activation", "act");
  params.concatenated = concatenated;
  C10_CUDA_CHECK(moe_gemm::run_gated_activation(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// (grad_gate_up [rows, 2I], weighted_activated [rows, I], grad_row_weights float32 [rows]): see
// GatedActivationBackwardParams.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_activation_backward_cuda(at::Tensor const& grad_activated,
                                                                              at::Tensor const& gate_up,
                                                                              at::Tensor const& row_weights,
                                                                              c10::string_view act, bool concatenated) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 16 == 0,
              "moe_gemm: gate_up must be [rows, 2I] with I a multiple of 8, got ", gate_up.sizes());
  int64_t const rows = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(grad_activated.dim() == 2 && grad_activated.size(0) == rows && grad_activated.size(1) == I &&
                  grad_activated.scalar_type() == gate_up.scalar_type(),
              "moe_gemm: grad_activated must be [rows, I] of gate_up's dtype, got ", grad_activated.sizes(), " ",
              grad_activated.scalar_type(), " for gate_up ", gate_up.sizes());
  TORCH_CHECK(row_weights.dim() == 1 && row_weights.size(0) == rows && row_weights.scalar_type() == at::kFloat,
              "moe_gemm: row_weights must be float32 [rows]");
  for (auto const& [tensor, name] : {std::pair{&grad_activated, "grad_activated"}, std::pair{&gate_up, "gate_up"},
                                     std::pair{&row_weights, "row_weights"}}) {
    check_cuda_contiguous(*tensor, name);
    TORCH_CHECK(tensor->device() == gate_up.device(), "moe_gemm: ", name, " must be on the device of gate_up");
  }
  c10::cuda::CUDAGuard device_guard(gate_up.device());
  at::Tensor grad_gate_up = at::empty_like(gate_up);
  at::Tensor weighted_activated = at::empty_like(grad_activated);
  at::Tensor grad_row_weights = at::empty({rows}, row_weights.options());
  moe_gemm::GatedActivationBackwardParams params;
  params.grad_activated = grad_activated.data_ptr();
  params.gate_up = gate_up.data_ptr();
  params.row_weights = row_weights.data_ptr<float>();
  params.grad_gate_up = grad_gate_up.data_ptr();
  params.weighted_activated = weighted_activated.data_ptr();
  params.grad_row_weights = grad_row_weights.data_ptr<float>();
  params.rows = rows;
  params.I = I;
  params.dtype = moe_gemm::to_dtype(gate_up.scalar_type(), kOp, "gate_up");
  params.act = moe_gemm::from_name(act, kActivations, "moe_gemm.gated_activation_backward", "act");
  params.concatenated = concatenated;
  C10_CUDA_CHECK(moe_gemm::run_gated_activation_backward(params, c10::cuda::getCurrentCUDAStream()));
  return {grad_gate_up, weighted_activated, grad_row_weights};
}

// out [T, H] = the weighted sum of each token's valid rows of y [T * top_k, H].
at::Tensor combine_cuda(at::Tensor const& y, at::Tensor const& row_of_pair, at::Tensor const& weights,
                        at::Tensor const& ids, int64_t num_experts) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "moe_gemm: ids must be int64 [T, top_k]");
  int64_t const T = ids.size(0), top_k = ids.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == T * top_k && y.size(1) % 8 == 0,
              "moe_gemm: y_sorted must be [T * top_k, H] with H a multiple of 8, got ", y.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes(), "moe_gemm: weights must be [T, top_k] like ids");
  TORCH_CHECK(row_of_pair.dim() == 1 && row_of_pair.size(0) == T * top_k && row_of_pair.scalar_type() == at::kLong,
              "moe_gemm: row_of_pair must be int64 [T * top_k]");
  for (auto const& [tensor, name] : {std::pair{&y, "y_sorted"}, std::pair{&row_of_pair, "row_of_pair"},
                                     std::pair{&weights, "weights"}, std::pair{&ids, "ids"}}) {
    check_cuda_contiguous(*tensor, name);
    TORCH_CHECK(tensor->device() == y.device(), "moe_gemm: ", name, " must be on the device of y_sorted");
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
  params.dtype = moe_gemm::to_dtype(y.scalar_type(), kOp, "y_sorted");
  params.weights_dtype = moe_gemm::to_dtype(weights.scalar_type(), kOp, "weights");
  C10_CUDA_CHECK(moe_gemm::run_combine(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// (x_fp8 float8_e4m3fn [M, K], x_scale float32 [M, ceil(K/128)] or [M]) of x [M, K] (bf16, fp16 or float32, inner
// stride 1): quantize_fp8's CUDA kernel (QuantizeFp8Params).
std::tuple<at::Tensor, at::Tensor> quantize_fp8_kernel_cuda(at::Tensor const& x, std::optional<int64_t> group) {
  TORCH_CHECK(x.dim() == 2, "moe_gemm: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(!group.has_value() || *group == 128, "moe_gemm: group must be 128 or None");
  TORCH_CHECK(x.is_cuda() && (x.size(1) <= 1 || x.stride(1) == 1),
              "moe_gemm: x must be a CUDA tensor of inner stride 1");
  moe_gemm::check_sm90(x.device(), kOp);
  c10::cuda::CUDAGuard device_guard(x.device());
  int64_t const M = x.size(0), K = x.size(1);
  at::Tensor x_fp8 = at::empty({M, K}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = group.has_value() ? at::empty({M, (K + 127) / 128}, x.options().dtype(at::kFloat))
                                       : at::empty({M}, x.options().dtype(at::kFloat));
  moe_gemm::QuantizeFp8Params params;
  params.x = x.data_ptr();
  params.ld = M > 1 ? x.stride(0) : K;
  params.x_fp8 = static_cast<uint8_t*>(x_fp8.data_ptr());
  params.scale = scale.data_ptr<float>();
  params.rows = M;
  params.K = K;
  params.group = group.has_value() ? 128 : 0;
  params.dtype = moe_gemm::to_dtype(x.scalar_type(), kOp, "x");
  C10_CUDA_CHECK(moe_gemm::run_quantize_fp8(params, c10::cuda::getCurrentCUDAStream()));
  return {x_fp8, scale};
}

// (values float8_e4m3fn [E, R, C] contiguous, scale float32 [E, ceil(R/128), ceil(C/128)]) of weight [E, R, C]
// (bf16, fp16 or float32, 16-byte aligned) stored as it is (inner stride 1) or as its transpose (stride 1 along R:
// the view of a stored [E, C, R], read in place); R, C and the strides that are not 1 multiples of 8:
// quantize_fp8_weight's CUDA kernel (QuantizeFp8WeightParams).
std::tuple<at::Tensor, at::Tensor> quantize_fp8_weight_kernel_cuda(at::Tensor const& weight) {
  TORCH_CHECK(weight.dim() == 3, "moe_gemm: weight must be [E, R, C], got ", weight.sizes());
  int64_t const E = weight.size(0), R = weight.size(1), C = weight.size(2);
  bool const transposed = weight.stride(2) != 1;
  TORCH_CHECK(weight.is_cuda() && (!transposed || weight.stride(1) == 1),
              "moe_gemm: weight must be a CUDA tensor with one of its last two strides 1, got strides ",
              weight.strides());
  int64_t const stride_a = transposed ? weight.stride(2) : weight.stride(1);
  TORCH_CHECK(C % 8 == 0 && R % 8 == 0 && weight.stride(0) % 8 == 0 && stride_a % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "moe_gemm: the weight's sizes and strides must be multiples of 8 and its data 16-byte aligned, got ",
              weight.sizes(), " with strides ", weight.strides());
  moe_gemm::check_sm90(weight.device(), kOp);
  c10::cuda::CUDAGuard device_guard(weight.device());
  at::Tensor values = at::empty({E, R, C}, weight.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = at::empty({E, (R + 127) / 128, (C + 127) / 128}, weight.options().dtype(at::kFloat));
  moe_gemm::QuantizeFp8WeightParams params;
  params.weight = weight.data_ptr();
  params.stride_e = weight.stride(0);
  params.stride_a = stride_a;
  params.values = static_cast<uint8_t*>(values.data_ptr());
  params.scale = scale.data_ptr<float>();
  params.E = E;
  params.A = transposed ? C : R;
  params.B = transposed ? R : C;
  params.transposed = transposed;
  params.dtype = moe_gemm::to_dtype(weight.scalar_type(), kOp, "weight");
  C10_CUDA_CHECK(moe_gemm::run_quantize_fp8_weight(params, c10::cuda::getCurrentCUDAStream()));
  return {values, scale};
}

}  // namespace

// pull_rows_(out, peer_ptrs, region_offset, src_start, dst_start, counts, max_rows): PullRowsParams, from the device
// array of peer buffer pointers at address peer_ptrs (torch's symmetric memory, buffer_ptrs_dev) into out, a
// contiguous CUDA tensor of rows 16-byte multiples long. src_start, dst_start and counts are int64 [W] on out's
// device; every block must lie inside out and inside the peers' regions (the caller sizes them; not checked here,
// it would read the sizes on the host).
void pull_rows_cuda(at::Tensor out, int64_t peer_ptrs, int64_t region_offset, at::Tensor const& src_start,
                    at::Tensor const& dst_start, at::Tensor const& counts, int64_t max_rows) {
  check_cuda_contiguous(out, "out");
  TORCH_CHECK(out.dim() == 2 && (out.size(1) * out.element_size()) % 16 == 0,
              "moe_gemm: pull_rows_'s out must be [rows, N] with rows of a multiple of 16 bytes, got ", out.sizes());
  int64_t const W = counts.numel();
  for (auto const& [tensor, name] : {std::pair{&src_start, "src_start"}, std::pair{&dst_start, "dst_start"},
                                     std::pair{&counts, "counts"}}) {
    check_cuda_contiguous(*tensor, name);
    TORCH_CHECK(tensor->scalar_type() == at::kLong && tensor->numel() == W && tensor->device() == out.device(),
                "moe_gemm: pull_rows_'s ", name, " must be int64 [W] on out's device");
  }
  TORCH_CHECK(peer_ptrs != 0 && region_offset >= 0 && max_rows >= 0 && W <= 65535,
              "moe_gemm: pull_rows_ needs the peers' pointer array, a region offset >= 0 and max_rows >= 0");
  c10::cuda::CUDAGuard device_guard(out.device());
  moe_gemm::PullRowsParams params;
  params.peer_ptrs = reinterpret_cast<void const* const*>(peer_ptrs);
  params.region_offset = region_offset;
  params.src_start = src_start.data_ptr<int64_t>();
  params.dst_start = dst_start.data_ptr<int64_t>();
  params.counts = counts.data_ptr<int64_t>();
  params.out = out.data_ptr();
  params.row_bytes = out.size(1) * out.element_size();
  params.max_rows = max_rows;
  params.num_sources = static_cast<int32_t>(W);
  C10_CUDA_CHECK(moe_gemm::run_pull_rows(params, c10::cuda::getCurrentCUDAStream()));
}

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("dispatch_pairs", &dispatch_cuda);
  m.impl("gated_activation", &gated_activation_cuda);
  m.impl("gated_activation_backward", &gated_activation_backward_cuda);
  m.impl("combine_rows", &combine_cuda);
  m.impl("_quantize_fp8_kernel", &quantize_fp8_kernel_cuda);
  m.impl("_quantize_fp8_weight_kernel", &quantize_fp8_weight_kernel_cuda);
  m.impl("pull_rows_", &pull_rows_cuda);
}
