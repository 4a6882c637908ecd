// The only file that knows torch: op schemas (TORCH_LIBRARY) and their CUDA kernels
// (TORCH_LIBRARY_IMPL), translating tensors into the torch-free GroupedGemmParams.
// Fake (meta) kernels, autograd and the CPU path are registered in Python (moe_gemm/_ops.py).
#include <Python.h>

#include <cstdlib>

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
  // MOE_GEMM_TILE_CONFIG=128x256|128x128|128x256c2 overrides the heuristic (for tuning and tests).
  if (char const* forced = std::getenv("MOE_GEMM_TILE_CONFIG")) {
    TORCH_CHECK(moe_gemm::parse_tile_config(forced, &params.config),
                "moe_gemm.grouped_mm: MOE_GEMM_TILE_CONFIG must be auto, 128x256, 128x128 or 128x256c2, got ", forced);
  }
  // MOE_GEMM_GROUP_M=n: m-blocks per raster group, for tuning L2 locality.
  if (char const* group_m = std::getenv("MOE_GEMM_GROUP_M")) {
    params.group_m = std::atoi(group_m);
  }
  // MOE_GEMM_DYNAMIC=0|1 forces static or dynamic tile scheduling (default: by problem size).
  if (char const* dynamic = std::getenv("MOE_GEMM_DYNAMIC")) {
    params.dynamic_schedule = std::atoi(dynamic) != 0;
  }
  char const* problem = moe_gemm::check_grouped_gemm(params);
  TORCH_CHECK(problem == nullptr, "moe_gemm.grouped_mm: ", problem);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // The tile counter of dynamic scheduling: 4 bytes from the caching allocator, zeroed in stream order.
  at::Tensor workspace;
  if (size_t const workspace_bytes = moe_gemm::grouped_gemm_workspace_bytes(params)) {
    workspace = at::empty({int64_t(workspace_bytes)}, x.options().dtype(at::kByte));
    C10_CUDA_CHECK(cudaMemsetAsync(workspace.data_ptr(), 0, workspace_bytes, stream));
    params.workspace = workspace.data_ptr();
  }
  cudaError_t status = moe_gemm::run_grouped_gemm(params, stream);
  TORCH_CHECK(status == cudaSuccess, "moe_gemm.grouped_mm: kernel launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY(moe_gemm, m) {
  m.def("grouped_mm(Tensor x, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_cuda);
}

// `import moe_gemm._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_gemm CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
