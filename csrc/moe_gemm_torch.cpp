// The grouped GEMMs' binding to torch: the CUDA kernels of the ops moe_gemm::grouped_mm, grouped_mm_gather,
// grouped_mm_gated, _grouped_mm_fp8_kernel, grouped_mm_wgrad, grouped_mm_wgrad_gather and
// grouped_mm_wgrad_accumulate_ (TORCH_LIBRARY_IMPL; their schemas, fake kernels, autograd and CPU path are declared in
// Python, moe_gemm/_ops.py), translating tensors into the torch-free GroupedGemmParams (GroupedWgradParams) and
// planning each call; and the extension module moe_gemm._C, whose
// set_plan_override(), plan_grouped_gemm() and tile_config_names() serve moe_gemm.testing. The routing and layer
// kernels have their own bindings (moe_routing_torch.cpp, moe_layer_torch.cpp).
#include <Python.h>

#include <array>
#include <exception>
#include <mutex>
#include <optional>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe_gemm.h"
#include "moe_layer_kernels.h"
#include "moe_torch_checks.h"

namespace {

// What moe_gemm.testing.plan_override sets: process-wide (autograd runs the backward on other threads),
// read under the lock when a call is planned.
std::mutex plan_override_mutex;
moe_gemm::PlanOverride plan_override;

moe_gemm::PlanOverride current_plan_override() {
  std::lock_guard<std::mutex> lock(plan_override_mutex);
  return plan_override;
}

// The fields both ops' params share: the output, the sizes, the input dtype and the SMs.
template <class Params>
void set_common_fields(Params& params, at::Tensor& out, at::Tensor const& m_sizes, at::ScalarType dtype,
                       char const* op) {
  params.d = out.data_ptr();
  params.m_sizes = m_sizes.data_ptr();
  params.m_sizes_int64 = m_sizes.scalar_type() == at::kLong;
  params.E = static_cast<int32_t>(m_sizes.numel());
  params.dtype = moe_gemm::to_dtype(dtype, op, "inputs");
  TORCH_CHECK(params.dtype != moe_gemm::DType::kFloat32, op, ": the CUDA kernel takes bfloat16 or float16, got ",
              dtype);
  params.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Runs a planned call on the current stream. The plan's workspace comes from the caching allocator, so that the
// call can be captured in a CUDA graph; run (run_grouped_gemm or run_grouped_wgrad) zeroes its counters.
template <class Params, class Plan, class Run>
void run_planned(Params& params, Plan const& plan, Run run, at::TensorOptions options, char const* op) {
  at::Tensor workspace;
  if (plan.workspace.total_bytes > 0) {
    workspace = at::empty({int64_t(plan.workspace.total_bytes)}, options.dtype(at::kByte));
    params.workspace = workspace.data_ptr();
  }
  cudaError_t status = run(params, plan, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
}

// D = grouped GEMM of A with weight [E, N, K] (or [E, K, N] when weight_transposed): A is x [M, K], or with
// gather_rows (int64 [M]) the rows x[gather_rows] of x [T, K], read in place by the kernel. The indices are not
// checked on the device (that would cost a pass over them, or a sync): one outside [0, T) is the caller's bug,
// as with index_select's device assert; the kernel then reads a row of zeros and never memory outside x.
// What a gated call (grouped_mm_gated) adds: the activation, the layout of gate and up, and its outputs.
struct GatedOutputs {
  moe_gemm::GatedActivation act;
  moe_gemm::GateUpLayout layout;
  bool write_pre_activation;
  at::Tensor activated;  // [M, I], filled in by grouped_mm_cuda_impl
};

// The values of grouped_mm_gated's `str act` (moe_gemm._ops.ACTIVATIONS).
constexpr std::array<std::pair<c10::string_view, moe_gemm::GatedActivation>, 3> kGatedActivations{
    {{"silu", moe_gemm::GatedActivation::kSilu},
     {"gelu", moe_gemm::GatedActivation::kGelu},
     {"gelu_tanh", moe_gemm::GatedActivation::kGeluTanh}}};

// The unfused gated call, where no gated-epilogue kernel applies (decode sizes): the plain GEMM's gate_up, then the
// separate activation kernel, which rounds the same way as the fused epilogue.
void run_gated_unfused(moe_gemm::GroupedGemmParams params, at::Tensor& gate_up, GatedOutputs const& gated,
                       at::TensorOptions options, char const* op) {
  params.gate_up_layout = moe_gemm::GateUpLayout::kNone;
  params.activated = nullptr;
  params.d = gate_up.data_ptr();
  params.ldd = gate_up.stride(0);
  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm(params, current_plan_override());
  char const* problem = moe_gemm::check_grouped_gemm_plan(params, plan);
  TORCH_CHECK(problem == nullptr, op, ": ", problem, "; got tile_config ", moe_gemm::tile_config_name(plan.config),
              " (moe_gemm.testing.plan_override)");
  run_planned(params, plan, moe_gemm::run_grouped_gemm, options, op);
  moe_gemm::GatedActivationParams activation;
  activation.gate_up = gate_up.data_ptr();
  activation.out = gated.activated.data_ptr();
  activation.rows = params.M;
  activation.I = params.N / 2;
  activation.dtype = params.dtype;
  activation.act = gated.act;
  activation.concatenated = gated.layout == moe_gemm::GateUpLayout::kConcatenated;
  C10_CUDA_CHECK(moe_gemm::run_gated_activation(activation, at::cuda::getCurrentCUDAStream()));
}

at::Tensor grouped_mm_cuda_impl(at::Tensor const& x, at::Tensor const* gather_rows, at::Tensor const& weight,
                                at::Tensor const& m_sizes, bool weight_transposed, char const* op,
                                GatedOutputs* gated = nullptr) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [", gather_rows ? "T" : "M", ", K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be 3-D, got ", weight.sizes());
  TORCH_CHECK(m_sizes.dim() == 1, op, ": m_sizes must be 1-D [E], got ", m_sizes.sizes());
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() && m_sizes.device() == x.device(), op,
              ": x, weight and m_sizes must be on the same CUDA device");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(m_sizes.scalar_type() == at::kInt || m_sizes.scalar_type() == at::kLong, op,
              ": m_sizes must be int32 or int64, got ", m_sizes.scalar_type());
  TORCH_CHECK(m_sizes.numel() == weight.size(0) && (m_sizes.numel() <= 1 || m_sizes.stride(0) == 1), op,
              ": m_sizes must be a contiguous [E] tensor with E = weight.size(0)");
  if (gather_rows != nullptr) {
    TORCH_CHECK(gather_rows->dim() == 1, op, ": gather_rows must be 1-D [M], got ", gather_rows->sizes());
    TORCH_CHECK(gather_rows->scalar_type() == at::kLong, op, ": gather_rows must be int64, got ",
                gather_rows->scalar_type());
    TORCH_CHECK(gather_rows->device() == x.device(), op, ": gather_rows must be on the device of x (", x.device(),
                "), got ", gather_rows->device());
    TORCH_CHECK(gather_rows->numel() <= 1 || gather_rows->stride(0) == 1, op, ": gather_rows must be contiguous");
  }
  int64_t const M = gather_rows != nullptr ? gather_rows->numel() : x.size(0), K = x.size(1);
  int64_t const N = weight_transposed ? weight.size(2) : weight.size(1);
  int64_t const weight_k = weight_transposed ? weight.size(1) : weight.size(2);
  TORCH_CHECK(weight_k == K, op, ": x has K = ", K, " but weight has K = ", weight_k);
  TORCH_CHECK(x.size(0) == 0 || x.stride(1) == 1, op, ": x must have inner stride 1");
  TORCH_CHECK(weight.numel() == 0 || weight.stride(2) == 1, op, ": weight must have inner stride 1");
  moe_gemm::check_sm90(x.device(), op);

  c10::cuda::CUDAGuard device_guard(x.device());
  if (gated != nullptr) {
    TORCH_CHECK(N % 16 == 0, op, ": the weight's gate and up rows must number 2I with I a multiple of 8, got ", N);
    gated->activated = at::empty({M, N / 2}, x.options());
  }
  // A gated call that does not keep the pre-activation writes none (unless it runs unfused, below).
  bool const writes_out = gated == nullptr || gated->write_pre_activation;
  at::Tensor out = at::empty({writes_out ? M : 0, N}, x.options());
  if (M == 0 || N == 0) {
    return out;
  }

  moe_gemm::GroupedGemmParams params;
  set_common_fields(params, out, m_sizes, x.scalar_type(), op);
  params.a = x.data_ptr();
  params.lda = x.stride(0);
  params.b = weight.data_ptr();
  params.ldb = weight.stride(1);
  params.batch_stride_b = weight.stride(0);
  params.b_n_major = weight_transposed;
  params.d = writes_out ? out.data_ptr() : nullptr;
  params.ldd = writes_out ? out.stride(0) : 0;
  if (gated != nullptr) {
    params.gate_up_layout = gated->layout;
    params.activation = gated->act;
    params.activated = gated->activated.data_ptr();
    params.ld_activated = gated->activated.stride(0);
  }
  params.M = M;
  params.N = N;
  params.K = K;
  if (gather_rows != nullptr) {
    params.gather_rows = gather_rows->data_ptr<int64_t>();
    params.gather_source_rows = x.size(0);
  }
  char const* problem = moe_gemm::check_grouped_gemm(params);
  TORCH_CHECK(problem == nullptr, op, ": ", problem);

  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm(params, current_plan_override());
  if (gated != nullptr && !plan.gated && plan.config != moe_gemm::TileConfig::kAuto) {
    at::Tensor gate_up = writes_out ? out : at::empty({M, N}, x.options());
    run_gated_unfused(params, gate_up, *gated, x.options(), op);
    return out;
  }
  problem = moe_gemm::check_grouped_gemm_plan(params, plan);
  TORCH_CHECK(problem == nullptr, op, ": ", problem, "; got tile_config ", moe_gemm::tile_config_name(plan.config),
              " (moe_gemm.testing.plan_override)");
  run_planned(params, plan, moe_gemm::run_grouped_gemm, x.options(), op);
  return out;
}

// grouped_mm_fp8's CUDA kernel: y = dequantized x @ dequantized W[e].T per expert, bf16, for float8_e4m3fn x [M, K]
// and weight [E, N, K] (K-major). Rowwise: x_scale [M], w_scale [E, N]; blockwise: x_scale [M, ceil(K/128)] or [M],
// w_scale [E, ceil(N/128), ceil(K/128)]; all float32 and contiguous. The Python router (moe_gemm/_ops.py) sends only
// these cases here; the checks below say what else is refused.
at::Tensor grouped_mm_fp8_kernel_cuda(at::Tensor const& x, at::Tensor const& x_scale, at::Tensor const& weight,
                                      at::Tensor const& w_scale, at::Tensor const& m_sizes) {
  char const* op = "moe_gemm._grouped_mm_fp8_kernel";
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && m_sizes.dim() == 1, op, ": x [M, K], weight [E, N, K], m_sizes [E]");
  TORCH_CHECK(x.scalar_type() == at::kFloat8_e4m3fn && weight.scalar_type() == at::kFloat8_e4m3fn, op,
              ": x and weight must be float8_e4m3fn");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && w_scale.scalar_type() == at::kFloat, op,
              ": the scales must be float32");
  int64_t const M = x.size(0), K = x.size(1), E = weight.size(0), N = weight.size(1);
  int64_t const k_groups = (K + 127) / 128, n_groups = (N + 127) / 128;
  TORCH_CHECK(weight.size(2) == K && m_sizes.numel() == E, op, ": x [M, K], weight [E, N, K], m_sizes [E] disagree");
  moe_gemm::Fp8ScaleParams scales;
  if (w_scale.dim() == 2) {
    scales.kind = moe_gemm::Fp8Scales::kRowwise;
    TORCH_CHECK(w_scale.size(0) == E && w_scale.size(1) == N, op, ": per-channel w_scale must be [E, N]");
    TORCH_CHECK(x_scale.dim() == 1, op, ": per-channel w_scale goes with x_scale [M]");
  } else {
    scales.kind = moe_gemm::Fp8Scales::kBlockwise;
    TORCH_CHECK(w_scale.dim() == 3 && w_scale.size(0) == E && w_scale.size(1) == n_groups &&
                    w_scale.size(2) == k_groups,
                op, ": w_scale must be [E, N] or [E, ceil(N/128), ceil(K/128)]");
    TORCH_CHECK(x_scale.dim() == 1 || (x_scale.dim() == 2 && x_scale.size(1) == k_groups), op,
                ": x_scale must be [M] or [M, ceil(K/128)]");
    scales.x_groups = x_scale.dim() == 2 ? int32_t(k_groups) : 0;
  }
  TORCH_CHECK(x_scale.size(0) == M && x_scale.is_contiguous() && w_scale.is_contiguous(), op,
              ": x_scale must have M rows, and both scales must be contiguous");
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() && m_sizes.device() == x.device() &&
                  x_scale.device() == x.device() && w_scale.device() == x.device(),
              op, ": all tensors must be on the same CUDA device");
  TORCH_CHECK(m_sizes.scalar_type() == at::kInt || m_sizes.scalar_type() == at::kLong, op,
              ": m_sizes must be int32 or int64");
  TORCH_CHECK((M == 0 || x.stride(1) == 1) && (weight.numel() == 0 || weight.stride(2) == 1) &&
                  (m_sizes.numel() <= 1 || m_sizes.stride(0) == 1),
              op, ": x, weight and m_sizes must have inner stride 1");
  moe_gemm::check_sm90(x.device(), op);

  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kBFloat16));
  if (out.numel() == 0) {
    return out;
  }
  moe_gemm::GroupedGemmParams params;
  set_common_fields(params, out, m_sizes, at::kBFloat16, op);
  params.a = x.data_ptr();
  params.lda = x.stride(0);
  params.b = weight.data_ptr();
  params.ldb = weight.stride(1);
  params.batch_stride_b = weight.stride(0);
  params.ldd = out.stride(0);
  params.M = M;
  params.N = N;
  params.K = K;
  scales.x_scale = x_scale.data_ptr<float>();
  scales.w_scale = w_scale.data_ptr<float>();
  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm_fp8(params, scales.kind, current_plan_override());
  char const* problem = moe_gemm::check_grouped_gemm_fp8(params, scales, plan);
  TORCH_CHECK(problem == nullptr, op, ": ", problem);
  run_planned(
      params, plan,
      [scales](moe_gemm::GroupedGemmParams const& p, moe_gemm::GroupedGemmPlan const& pl, cudaStream_t stream) {
        return moe_gemm::run_grouped_gemm_fp8(p, scales, pl, stream);
      },
      x.options(), op);
  return out;
}

at::Tensor grouped_mm_cuda(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& m_sizes,
                           bool weight_transposed) {
  return grouped_mm_cuda_impl(x, nullptr, weight, m_sizes, weight_transposed, "moe_gemm.grouped_mm");
}

// y[r] = x[gather_rows[r]] @ W[e]^T for the rows r of expert e: grouped_mm of x.index_select(0, gather_rows)
// without the copy.
at::Tensor grouped_mm_gather_cuda(at::Tensor const& x, at::Tensor const& gather_rows, at::Tensor const& weight,
                                  at::Tensor const& m_sizes, bool weight_transposed) {
  return grouped_mm_cuda_impl(x, &gather_rows, weight, m_sizes, weight_transposed, "moe_gemm.grouped_mm_gather");
}

// The row indices of a gathered operand (`name`: x_rows or grad_y_rows) of `source`: an int64 [M] on its device.
void check_row_indices(at::Tensor const& rows, at::Tensor const& source, char const* name, char const* op) {
  TORCH_CHECK(rows.dim() == 1, op, ": ", name, " must be 1-D [M], got ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", rows.scalar_type());
  TORCH_CHECK(rows.device() == source.device(), op, ": ", name, " must be on the device of its operand (",
              source.device(), "), got ", rows.device());
  TORCH_CHECK(rows.numel() <= 1 || rows.stride(0) == 1, op, ": ", name, " must be contiguous");
}

// (activated = act(gate) * up [M, I], gate_up [M, 2I] or None): the up-projection with the gated activation in its
// epilogue (grouped_mm, or grouped_mm_gather with gather_rows, then gated_activation, in one kernel where the plan has
// a gated one: see GroupedGemmPlan::gated).
std::tuple<at::Tensor, std::optional<at::Tensor>> grouped_mm_gated_cuda(
    at::Tensor const& x, std::optional<at::Tensor> const& gather_rows, at::Tensor const& weight,
    at::Tensor const& m_sizes, bool weight_transposed, c10::string_view act, bool concatenated,
    bool write_pre_activation) {
  char const* op = "moe_gemm.grouped_mm_gated";
  GatedOutputs gated{moe_gemm::from_name(act, kGatedActivations, op, "act"),
                     concatenated ? moe_gemm::GateUpLayout::kConcatenated : moe_gemm::GateUpLayout::kInterleaved,
                     write_pre_activation, at::Tensor()};
  at::Tensor gate_up = grouped_mm_cuda_impl(x, gather_rows.has_value() ? &*gather_rows : nullptr, weight, m_sizes,
                                            weight_transposed, op, &gated);
  std::optional<at::Tensor> pre_activation;
  if (write_pre_activation) {
    pre_activation = gate_up;
  }
  return {gated.activated, pre_activation};
}

// The expert GEMM's weight gradient, grouped along the rows: grad_W[e] = grad_y_e^T @ x_e ([E, N, K]), or
// x_e^T @ grad_y_e ([E, K, N]) for the transposed layout. Written to `out` (float32 when accumulating). With
// x_rows (grad_y_rows), row i of x (grad_y) is row x_rows[i] of x (grad_y[grad_y_rows[i]]), read in place by the
// kernel; one of the two at most. The indices are not checked on the device (see grouped_mm_cuda_impl).
void grouped_wgrad_into(at::Tensor& out, at::Tensor const& x, at::Tensor const* x_rows, at::Tensor const& grad_y,
                        at::Tensor const* grad_y_rows, at::Tensor const& m_sizes, bool weight_transposed,
                        bool accumulate, char const* op) {
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2, op, ": x [M, K] and grad_y [M, N] must be 2-D, got ", x.sizes(),
              " and ", grad_y.sizes());
  if (x_rows != nullptr) {
    check_row_indices(*x_rows, x, "x_rows", op);
  }
  if (grad_y_rows != nullptr) {
    check_row_indices(*grad_y_rows, grad_y, "grad_y_rows", op);
  }
  TORCH_CHECK(x_rows == nullptr || grad_y_rows == nullptr, op,
              ": the CUDA kernel gathers one of x and grad_y per call, got both x_rows and grad_y_rows (gather one "
              "with index_select)");
  int64_t const x_rows_used = x_rows != nullptr ? x_rows->numel() : x.size(0);
  int64_t const grad_y_rows_used = grad_y_rows != nullptr ? grad_y_rows->numel() : grad_y.size(0);
  TORCH_CHECK(x_rows_used == grad_y_rows_used, op, ": x [M, K] and grad_y [M, N] must have the same rows (M = ",
              x_rows != nullptr ? "x_rows.numel()" : "x.size(0)", " = ", x_rows_used, ", ",
              grad_y_rows != nullptr ? "grad_y_rows.numel()" : "grad_y.size(0)", " = ", grad_y_rows_used, "), got ",
              x.sizes(), " and ", grad_y.sizes());
  TORCH_CHECK(m_sizes.dim() == 1, op, ": m_sizes must be 1-D [E], got ", m_sizes.sizes());
  TORCH_CHECK(x.is_cuda() && grad_y.device() == x.device() && m_sizes.device() == x.device() &&
                  out.device() == x.device(),
              op, ": all tensors must be on the same CUDA device");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(m_sizes.scalar_type() == at::kInt || m_sizes.scalar_type() == at::kLong, op,
              ": m_sizes must be int32 or int64, got ", m_sizes.scalar_type());
  TORCH_CHECK(m_sizes.numel() <= 1 || m_sizes.stride(0) == 1, op, ": m_sizes must be contiguous");
  moe_gemm::check_sm90(x.device(), op);
  int64_t const M = x_rows_used, K = x.size(1), N = grad_y.size(1), E = m_sizes.numel();
  int64_t const P = weight_transposed ? K : N, Q = weight_transposed ? N : K;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == E && out.size(1) == P && out.size(2) == Q, op,
              ": the gradient must be [E, ", P, ", ", Q, "], got ", out.sizes());
  // A gathered operand's source must have rows to gather from (its TMA descriptor) when there are rows to gather.
  TORCH_CHECK(M == 0 || ((x_rows == nullptr || x.size(0) > 0) && (grad_y_rows == nullptr || grad_y.size(0) > 0)), op,
              ": a gathered operand needs source rows, got x ", x.sizes(), " and grad_y ", grad_y.sizes());
  TORCH_CHECK(M == 0 || (x.stride(1) == 1 && grad_y.stride(1) == 1), op, ": x and grad_y must have inner stride 1");
  TORCH_CHECK(out.numel() == 0 || out.stride(2) == 1, op, ": the gradient must have inner stride 1");
  if (out.numel() == 0) {
    return;
  }
  at::Tensor const& left = weight_transposed ? x : grad_y;
  at::Tensor const& right = weight_transposed ? grad_y : x;
  moe_gemm::GroupedWgradParams params;
  set_common_fields(params, out, m_sizes, x.scalar_type(), op);
  params.l = left.data_ptr();
  params.ldl = left.stride(0);
  params.r = right.data_ptr();
  params.ldr = right.stride(0);
  params.ldd = out.stride(1);
  params.batch_stride_d = out.stride(0);
  params.d_float32 = out.scalar_type() == at::kFloat;
  params.accumulate = accumulate;
  params.M = M;
  params.P = P;
  params.Q = Q;
  // x is L when transposed, else R; grad_y the other.
  int64_t const* x_index = x_rows != nullptr ? x_rows->data_ptr<int64_t>() : nullptr;
  int64_t const* grad_y_index = grad_y_rows != nullptr ? grad_y_rows->data_ptr<int64_t>() : nullptr;
  params.l_rows = weight_transposed ? x_index : grad_y_index;
  params.l_source_rows = left.size(0);
  params.r_rows = weight_transposed ? grad_y_index : x_index;
  params.r_source_rows = right.size(0);
  char const* problem = moe_gemm::check_grouped_wgrad(params);
  TORCH_CHECK(problem == nullptr, op, ": ", problem);

  run_planned(params, moe_gemm::plan_grouped_wgrad(params), moe_gemm::run_grouped_wgrad, x.options(), op);
}

at::Tensor grouped_mm_wgrad_cuda(at::Tensor const& x, at::Tensor const& grad_y, at::Tensor const& m_sizes,
                                 bool weight_transposed) {
  // The guard needs a CUDA device: check first, so that a CPU tensor gets this op's message.
  TORCH_CHECK(x.is_cuda(), "moe_gemm.grouped_mm_wgrad: x must be a CUDA tensor");
  c10::cuda::CUDAGuard device_guard(x.device());
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2, "moe_gemm.grouped_mm_wgrad: x and grad_y must be 2-D");
  int64_t const P = weight_transposed ? x.size(1) : grad_y.size(1);
  int64_t const Q = weight_transposed ? grad_y.size(1) : x.size(1);
  at::Tensor out = at::empty({m_sizes.numel(), P, Q}, x.options());
  grouped_wgrad_into(out, x, nullptr, grad_y, nullptr, m_sizes, weight_transposed, /*accumulate=*/false,
                     "moe_gemm.grouped_mm_wgrad");
  return out;
}

// grouped_mm_wgrad of x[x_rows] (when given) and grad_y[grad_y_rows] (when given) without the copies: the MoE
// layer's weight gradients from hidden[token_of_row] and grad_out[token_of_row]. One of the two at most.
at::Tensor grouped_mm_wgrad_gather_cuda(at::Tensor const& x, at::Tensor const& grad_y, at::Tensor const& m_sizes,
                                        bool weight_transposed, std::optional<at::Tensor> const& x_rows,
                                        std::optional<at::Tensor> const& grad_y_rows) {
  char const* const op = "moe_gemm.grouped_mm_wgrad_gather";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  c10::cuda::CUDAGuard device_guard(x.device());
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2, op, ": x and grad_y must be 2-D");
  int64_t const P = weight_transposed ? x.size(1) : grad_y.size(1);
  int64_t const Q = weight_transposed ? grad_y.size(1) : x.size(1);
  at::Tensor out = at::empty({m_sizes.numel(), P, Q}, x.options());
  grouped_wgrad_into(out, x, x_rows.has_value() ? &*x_rows : nullptr, grad_y,
                     grad_y_rows.has_value() ? &*grad_y_rows : nullptr, m_sizes, weight_transposed,
                     /*accumulate=*/false, op);
  return out;
}

void grouped_mm_wgrad_accumulate_cuda(at::Tensor main_grad, at::Tensor const& x, at::Tensor const& grad_y,
                                      at::Tensor const& m_sizes, bool weight_transposed) {
  TORCH_CHECK(x.is_cuda(), "moe_gemm.grouped_mm_wgrad_accumulate_: x must be a CUDA tensor");
  c10::cuda::CUDAGuard device_guard(x.device());
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat,
              "moe_gemm.grouped_mm_wgrad_accumulate_: main_grad must be float32, got ", main_grad.scalar_type());
  grouped_wgrad_into(main_grad, x, nullptr, grad_y, nullptr, m_sizes, weight_transposed, /*accumulate=*/true,
                     "moe_gemm.grouped_mm_wgrad_accumulate_");
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("_grouped_mm_fp8_kernel", &grouped_mm_fp8_kernel_cuda);
  m.impl("grouped_mm_gather", &grouped_mm_gather_cuda);
  m.impl("grouped_mm_gated", &grouped_mm_gated_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
  m.impl("grouped_mm_wgrad_gather", &grouped_mm_wgrad_gather_cuda);
  m.impl("grouped_mm_wgrad_accumulate_", &grouped_mm_wgrad_accumulate_cuda);
}

namespace {

// moe_gemm._C.set_plan_override(tile_config: str, split_k: int, dynamic_schedule: int) -> None: what every
// later call plans with, in all threads, until the next call ("auto", 0, -1: the heuristics). Raises
// ValueError for an unknown configuration name or what check_plan_override refuses (a negative split, a
// split for a configuration without a split-K kernel, a schedule other than -1, 0, 1), leaving the override
// as it was.
PyObject* set_plan_override(PyObject* /*module*/, PyObject* args) {
  char const* name = nullptr;
  int split_k = 0;
  int dynamic_schedule = -1;
  if (!PyArg_ParseTuple(args, "sii:set_plan_override", &name, &split_k, &dynamic_schedule)) {
    return nullptr;
  }
  moe_gemm::PlanOverride value;
  if (!moe_gemm::parse_tile_config(name, &value.config)) {
    PyErr_Format(PyExc_ValueError, "unknown tile configuration %R", PyTuple_GET_ITEM(args, 0));
    return nullptr;
  }
  value.split_k = split_k;
  value.dynamic_schedule = dynamic_schedule;
  if (char const* problem = moe_gemm::check_plan_override(value); problem != nullptr) {
    PyErr_Format(PyExc_ValueError, "%s; got tile_config=%R, split_k=%d, dynamic_schedule=%d", problem,
                 PyTuple_GET_ITEM(args, 0), split_k, dynamic_schedule);
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(plan_override_mutex);
  plan_override = value;
  Py_RETURN_NONE;
}

// The params a planning query plans for: the sizes (ValueError when negative), whether the call gathers (only
// that reaches the plan, not where from) and the current device's SM count (RuntimeError without CUDA). False with
// the Python error set.
bool planning_params(long long M, long long N, long long K, int E, bool gather,
                     moe_gemm::GroupedGemmParams& params) {
  if (M < 0 || N < 0 || K < 0 || E < 0) {
    PyErr_Format(PyExc_ValueError, "sizes must be non-negative, got M=%lld, N=%lld, K=%lld, E=%d", M, N, K, E);
    return false;
  }
  params.M = M;
  params.N = N;
  params.K = K;
  params.E = E;
  static int64_t const gather_marker = 0;
  params.gather_rows = gather ? &gather_marker : nullptr;
  try {
    params.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  } catch (std::exception const& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return false;
  }
  return true;
}

// moe_gemm._C.plan_grouped_gemm(M: int, N: int, K: int, E: int, gather: bool = False) -> tuple[str, int, bool]:
// the tile configuration, split-K factor and dynamic schedule that a grouped_mm call (grouped_mm_gather with
// gather) of these sizes would run with now, on the current device (its SM count) and under the current
// override. ("auto", 1, False) when there is nothing to multiply. Raises ValueError for negative sizes,
// RuntimeError when CUDA is unavailable.
PyObject* plan_grouped_gemm(PyObject* /*module*/, PyObject* args) {
  long long M = 0, N = 0, K = 0;
  int E = 0;
  int gather = 0;
  moe_gemm::GroupedGemmParams params;
  if (!PyArg_ParseTuple(args, "LLLi|p:plan_grouped_gemm", &M, &N, &K, &E, &gather) ||
      !planning_params(M, N, K, E, gather != 0, params)) {
    return nullptr;
  }
  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm(params, current_plan_override());
  return Py_BuildValue("(siO)", moe_gemm::tile_config_name(plan.config), plan.split_k,
                       plan.dynamic_schedule ? Py_True : Py_False);
}

// moe_gemm._C.plan_gated(M: int, N: int, K: int, E: int, concatenated: bool, gather: bool) -> tuple[str, bool]: the
// tile configuration of a grouped_mm_gated call of these sizes now (as plan_grouped_gemm), and whether it runs the
// gated epilogue (else the GEMM, then the separate activation kernel).
PyObject* plan_gated(PyObject* /*module*/, PyObject* args) {
  long long M = 0, N = 0, K = 0;
  int E = 0;
  int concatenated = 0;
  int gather = 0;
  moe_gemm::GroupedGemmParams params;
  if (!PyArg_ParseTuple(args, "LLLipp:plan_gated", &M, &N, &K, &E, &concatenated, &gather) ||
      !planning_params(M, N, K, E, gather != 0, params)) {
    return nullptr;
  }
  params.gate_up_layout = concatenated ? moe_gemm::GateUpLayout::kConcatenated : moe_gemm::GateUpLayout::kInterleaved;
  moe_gemm::GroupedGemmPlan const plan = moe_gemm::plan_grouped_gemm(params, current_plan_override());
  return Py_BuildValue("(sO)", moe_gemm::tile_config_name(plan.config), plan.gated ? Py_True : Py_False);
}

// moe_gemm._C.tile_config_names() -> tuple[str, ...]: the table's names (csrc/moe_tile_configs.h), in order.
PyObject* tile_config_names(PyObject* /*module*/, PyObject* /*unused*/) {
  PyObject* names = PyTuple_New(moe_gemm::kNumTileConfigs);
  if (names == nullptr) {
    return nullptr;
  }
  for (int i = 0; i < moe_gemm::kNumTileConfigs; ++i) {
    PyObject* name = PyUnicode_FromString(moe_gemm::kTileConfigs[i].name);
    if (name == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyTuple_SET_ITEM(names, i, name);
  }
  return names;
}

PyMethodDef module_methods[] = {
    {"set_plan_override", set_plan_override, METH_VARARGS,
     "set_plan_override(tile_config: str, split_k: int, dynamic_schedule: int) -> None\n"
     "The plan every later grouped GEMM call uses instead of the heuristics (\"auto\", 0, -1: none); "
     "use moe_gemm.testing.plan_override."},
    {"plan_grouped_gemm", plan_grouped_gemm, METH_VARARGS,
     "plan_grouped_gemm(M: int, N: int, K: int, E: int, gather: bool = False) -> tuple[str, int, bool]\n"
     "The (tile_config, split_k, dynamic_schedule) a grouped_mm (gather: grouped_mm_gather) call of these sizes "
     "would run with now; use moe_gemm.testing.resolved_plan."},
    {"plan_gated", plan_gated, METH_VARARGS,
     "plan_gated(M: int, N: int, K: int, E: int, concatenated: bool, gather: bool) -> tuple[str, bool]\n"
     "The tile_config a grouped_mm_gated call of these sizes would run with now, and whether the activation runs "
     "in its epilogue; use moe_gemm.testing.resolved_gated_plan."},
    {"tile_config_names", tile_config_names, METH_NOARGS,
     "tile_config_names() -> tuple[str, ...]\nThe names of the kernel's tile configurations."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import moe_gemm._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_gemm CUDA kernels", -1, module_methods,
                                  nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
