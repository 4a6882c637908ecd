// The only file that knows torch (besides the routing binding): op schemas (TORCH_LIBRARY) and their CUDA kernels
// (TORCH_LIBRARY_IMPL), translating tensors into the torch-free GroupedGemmParams.
// Fake (meta) kernels, autograd and the CPU path are registered in Python (moe_gemm/_ops.py).
#include <Python.h>

#include <cstdlib>
#include <string>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe_gemm.h"

namespace {

moe_gemm::DType to_dtype(at::ScalarType type) {
  TORCH_CHECK(type == at::kBFloat16 || type == at::kHalf,
              "moe_gemm.grouped_mm: the CUDA kernel takes bfloat16 or float16, got ", type);
  return type == at::kBFloat16 ? moe_gemm::DType::kBFloat16 : moe_gemm::DType::kFloat16;
}

// D = grouped GEMM of x [M, K] with weight [E, N, K] (or [E, K, N] when weight_transposed).
// MOE_GEMM_OVERLAP_EPILOGUE=0 stores each 16-bit tile right after its MMAs instead of under the next
// tile's (both kernels; for A/B measurements). Anything else, or unset: overlapped.
bool overlap_epilogue_enabled() {
  char const* value = std::getenv("MOE_GEMM_OVERLAP_EPILOGUE");
  return value == nullptr || std::string(value) != "0";
}

// MOE_GEMM_PARTIAL_TOKEN_LOADS=0 loads the whole token tile for an expert's tail of <= 64 rows too
// (for A/B measurements). Anything else, or unset: only the rows the tail multiplies.
bool partial_token_loads_enabled() {
  char const* value = std::getenv("MOE_GEMM_PARTIAL_TOKEN_LOADS");
  return value == nullptr || std::string(value) != "0";
}

at::Tensor grouped_mm_cuda(at::Tensor const& x, at::Tensor const& weight, at::Tensor const& m_sizes,
                           bool weight_transposed) {
  TORCH_CHECK(x.dim() == 2, "moe_gemm.grouped_mm: x must be 2-D [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "moe_gemm.grouped_mm: weight must be 3-D, got ", weight.sizes());
  TORCH_CHECK(m_sizes.dim() == 1, "moe_gemm.grouped_mm: m_sizes must be 1-D [E], got ", m_sizes.sizes());
  TORCH_CHECK(x.is_cuda() && weight.device() == x.device() && m_sizes.device() == x.device(),
              "moe_gemm.grouped_mm: x, weight and m_sizes must be on the same CUDA device");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "moe_gemm.grouped_mm: weight dtype ",
              weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(m_sizes.scalar_type() == at::kInt || m_sizes.scalar_type() == at::kLong,
              "moe_gemm.grouped_mm: m_sizes must be int32 or int64, got ", m_sizes.scalar_type());
  TORCH_CHECK(m_sizes.numel() == weight.size(0) && (m_sizes.numel() <= 1 || m_sizes.stride(0) == 1),
              "moe_gemm.grouped_mm: m_sizes must be a contiguous [E] tensor with E = weight.size(0)");
  int64_t const M = x.size(0), K = x.size(1);
  int64_t const N = weight_transposed ? weight.size(2) : weight.size(1);
  int64_t const weight_k = weight_transposed ? weight.size(1) : weight.size(2);
  TORCH_CHECK(weight_k == K, "moe_gemm.grouped_mm: x has K = ", K, " but weight has K = ", weight_k);
  TORCH_CHECK(M == 0 || x.stride(1) == 1, "moe_gemm.grouped_mm: x must have inner stride 1");
  TORCH_CHECK(weight.numel() == 0 || weight.stride(2) == 1, "moe_gemm.grouped_mm: weight must have inner stride 1");

  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) {
    return out;
  }

  moe_gemm::GroupedGemmParams params;
  params.a = x.data_ptr();
  params.b = weight.data_ptr();
  params.d = out.data_ptr();
  params.m_sizes = m_sizes.data_ptr();
  params.m_sizes_int64 = m_sizes.scalar_type() == at::kLong;
  params.b_n_major = weight_transposed;
  params.dtype = to_dtype(x.scalar_type());
  params.M = M;
  params.N = N;
  params.K = K;
  params.E = static_cast<int32_t>(weight.size(0));
  params.lda = x.stride(0);
  params.ldb = weight.stride(1);
  params.batch_stride_b = weight.stride(0);
  params.ldd = out.stride(0);
  params.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // MOE_GEMM_TILE_CONFIG=128x256|128x128|128x256c2x1|128x256c1x2|128x128pp|16x128s|32x128s overrides the heuristic (for tuning and tests).
  if (char const* forced = std::getenv("MOE_GEMM_TILE_CONFIG")) {
    TORCH_CHECK(moe_gemm::parse_tile_config(forced, &params.config),
                "moe_gemm.grouped_mm: MOE_GEMM_TILE_CONFIG must be auto, 128x256, 128x128, 128x256c2x1, 128x256c1x2, 128x128pp, 16x128s or 32x128s, got ", forced);
  }
  // MOE_GEMM_GROUP_M=n: m-blocks per raster group, for tuning L2 locality.
  if (char const* group_m = std::getenv("MOE_GEMM_GROUP_M")) {
    params.group_m = std::atoi(group_m);
  }
  // MOE_GEMM_DYNAMIC=0|1 forces static or dynamic tile scheduling (default: by problem size).
  if (char const* dynamic = std::getenv("MOE_GEMM_DYNAMIC")) {
    params.dynamic_schedule = std::atoi(dynamic) != 0;
  }
  // MOE_GEMM_SPLIT_K=n splits each tile's K loop n ways (1: never; 0: the heuristic, the default).
  if (char const* split_k = std::getenv("MOE_GEMM_SPLIT_K")) {
    params.split_k = std::atoi(split_k);
    TORCH_CHECK(params.split_k >= 0, "moe_gemm.grouped_mm: MOE_GEMM_SPLIT_K must be >= 0, got ", split_k);
  }
  params.overlap_epilogue = overlap_epilogue_enabled();
  params.partial_token_loads = partial_token_loads_enabled();
  char const* problem = moe_gemm::check_grouped_gemm(params);
  TORCH_CHECK(problem == nullptr, "moe_gemm.grouped_mm: ", problem);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The tile counter of dynamic scheduling and split-K's counters and partial tiles, from the caching
  // allocator (so CUDA-graph capturable); only the counters at its start are zeroed, in stream order.
  at::Tensor workspace;
  if (size_t const workspace_bytes = moe_gemm::grouped_gemm_workspace_bytes(params)) {
    workspace = at::empty({int64_t(workspace_bytes)}, x.options().dtype(at::kByte));
    if (size_t const zeroed_bytes = moe_gemm::grouped_gemm_workspace_zeroed_bytes(params)) {
      C10_CUDA_CHECK(cudaMemsetAsync(workspace.data_ptr(), 0, zeroed_bytes, stream));
    }
    params.workspace = workspace.data_ptr();
  }
  cudaError_t status = moe_gemm::run_grouped_gemm(params, stream);
  TORCH_CHECK(status == cudaSuccess, "moe_gemm.grouped_mm: kernel launch failed: ", cudaGetErrorString(status));
  return out;
}

// The expert GEMM's weight gradient, grouped along the rows: grad_W[e] = grad_y_e^T @ x_e ([E, N, K]), or
// x_e^T @ grad_y_e ([E, K, N]) for the transposed layout. Written to `out` (float32 when accumulating).
void grouped_wgrad_into(at::Tensor& out, at::Tensor const& x, at::Tensor const& grad_y, at::Tensor const& m_sizes,
                        bool weight_transposed, bool accumulate, char const* op) {
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2 && x.size(0) == grad_y.size(0), op,
              ": x [M, K] and grad_y [M, N] must be 2-D with the same rows, got ", x.sizes(), " and ", grad_y.sizes());
  TORCH_CHECK(m_sizes.dim() == 1, op, ": m_sizes must be 1-D [E], got ", m_sizes.sizes());
  TORCH_CHECK(x.is_cuda() && grad_y.device() == x.device() && m_sizes.device() == x.device() &&
                  out.device() == x.device(),
              op, ": all tensors must be on the same CUDA device");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(m_sizes.scalar_type() == at::kInt || m_sizes.scalar_type() == at::kLong, op,
              ": m_sizes must be int32 or int64, got ", m_sizes.scalar_type());
  TORCH_CHECK(m_sizes.numel() <= 1 || m_sizes.stride(0) == 1, op, ": m_sizes must be contiguous");
  int64_t const M = x.size(0), K = x.size(1), N = grad_y.size(1), E = m_sizes.numel();
  int64_t const P = weight_transposed ? K : N, Q = weight_transposed ? N : K;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == E && out.size(1) == P && out.size(2) == Q, op,
              ": the gradient must be [E, ", P, ", ", Q, "], got ", out.sizes());
  TORCH_CHECK(M == 0 || (x.stride(1) == 1 && grad_y.stride(1) == 1), op, ": x and grad_y must have inner stride 1");
  TORCH_CHECK(out.numel() == 0 || out.stride(2) == 1, op, ": the gradient must have inner stride 1");
  if (out.numel() == 0) {
    return;
  }
  at::Tensor const& left = weight_transposed ? x : grad_y;
  at::Tensor const& right = weight_transposed ? grad_y : x;
  moe_gemm::GroupedWgradParams params;
  params.l = left.data_ptr();
  params.r = right.data_ptr();
  params.d = out.data_ptr();
  params.m_sizes = m_sizes.data_ptr();
  params.m_sizes_int64 = m_sizes.scalar_type() == at::kLong;
  params.dtype = to_dtype(x.scalar_type());
  params.d_float32 = out.scalar_type() == at::kFloat;
  params.accumulate = accumulate;
  params.M = M;
  params.P = P;
  params.Q = Q;
  params.E = static_cast<int32_t>(E);
  params.ldl = left.stride(0);
  params.ldr = right.stride(0);
  params.ldd = out.stride(1);
  params.batch_stride_d = out.stride(0);
  params.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // MOE_GEMM_GROUP_P=n: 128-row blocks of the gradient per raster group, for tuning L2 locality.
  if (char const* group_p = std::getenv("MOE_GEMM_GROUP_P")) {
    params.group_p = std::atoi(group_p);
  }
  params.overlap_epilogue = overlap_epilogue_enabled();
  char const* problem = moe_gemm::check_grouped_wgrad(params);
  TORCH_CHECK(problem == nullptr, op, ": ", problem);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor workspace;
  if (size_t const workspace_bytes = moe_gemm::grouped_wgrad_workspace_bytes(params)) {
    workspace = at::empty({int64_t(workspace_bytes)}, x.options().dtype(at::kByte));
    C10_CUDA_CHECK(cudaMemsetAsync(workspace.data_ptr(), 0, workspace_bytes, stream));
    params.workspace = workspace.data_ptr();
  }
  cudaError_t status = moe_gemm::run_grouped_wgrad(params, stream);
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor grouped_mm_wgrad_cuda(at::Tensor const& x, at::Tensor const& grad_y, at::Tensor const& m_sizes,
                                 bool weight_transposed) {
  c10::cuda::CUDAGuard device_guard(x.device());
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2, "moe_gemm.grouped_mm_wgrad: x and grad_y must be 2-D");
  int64_t const P = weight_transposed ? x.size(1) : grad_y.size(1);
  int64_t const Q = weight_transposed ? grad_y.size(1) : x.size(1);
  at::Tensor out = at::empty({m_sizes.numel(), P, Q}, x.options());
  grouped_wgrad_into(out, x, grad_y, m_sizes, weight_transposed, /*accumulate=*/false, "moe_gemm.grouped_mm_wgrad");
  return out;
}

void grouped_mm_wgrad_accumulate_cuda(at::Tensor main_grad, at::Tensor const& x, at::Tensor const& grad_y,
                                      at::Tensor const& m_sizes, bool weight_transposed) {
  c10::cuda::CUDAGuard device_guard(x.device());
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat,
              "moe_gemm.grouped_mm_wgrad_accumulate_: main_grad must be float32, got ", main_grad.scalar_type());
  grouped_wgrad_into(main_grad, x, grad_y, m_sizes, weight_transposed, /*accumulate=*/true,
                     "moe_gemm.grouped_mm_wgrad_accumulate_");
}

}  // namespace

TORCH_LIBRARY(moe_gemm, m) {
  m.def("grouped_mm(Tensor x, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor");
  m.def("grouped_mm_wgrad(Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> Tensor");
  m.def("grouped_mm_wgrad_accumulate_(Tensor(a!) main_grad, Tensor x, Tensor grad_y, Tensor m_sizes, "
        "bool weight_transposed=False) -> ()");
}

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cuda);
  m.impl("grouped_mm_wgrad_accumulate_", &grouped_mm_wgrad_accumulate_cuda);
}

// `import moe_gemm._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_gemm CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
