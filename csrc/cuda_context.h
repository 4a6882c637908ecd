// Host helpers shared by the kernels' dispatch code. Plain C++.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "moe_dtype.h"
#include "moe_gemm_workspace.h"

namespace moe_gemm {

// Whether `ptr` is 16-byte aligned, as TMA needs of every tensor's start.
inline bool aligned16(void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The current device's SM count (0 when CUDA cannot say): the persistent grids' size when a caller passes none.
inline int current_sm_count() {
  int device = 0, sm_count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return sm_count;
}

// Encoding TMA descriptors calls the driver API, which needs a current context in this thread. A fresh
// thread (PyTorch's autograd workers) may have none yet: cudaSetDevice makes the current device's primary
// context current, once per thread and device.
inline cudaError_t make_device_context_current() {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }
  thread_local int context_device = -1;
  if (context_device != device) {
    status = cudaSetDevice(device);
    if (status != cudaSuccess) {
      return status;
    }
    context_device = device;
  }
  return cudaSuccess;
}

// The switch onto explicit instantiations: f(dtype, flag) with both as compile-time constants
// (std::integral_constant), for a 16-bit dtype; kFloat32 has no instantiation.
template <class F>
cudaError_t with_16bit_dtype_and_flag(DType dtype, bool flag, F&& f) {
  using BFloat16 = std::integral_constant<DType, DType::kBFloat16>;
  using Float16 = std::integral_constant<DType, DType::kFloat16>;
  switch (dtype) {
    case DType::kBFloat16:
      return flag ? f(BFloat16{}, std::true_type{}) : f(BFloat16{}, std::false_type{});
    case DType::kFloat16:
      return flag ? f(Float16{}, std::true_type{}) : f(Float16{}, std::false_type{});
    default:
      return cudaErrorInvalidValue;
  }
}

// What both run_* functions do before a kernel launch: the context for the TMA descriptors, a check that the
// caller passed the plan's workspace, and its counters zeroed on `stream`.
inline cudaError_t prepare_launch(WorkspaceLayout const& layout, void* workspace, cudaStream_t stream) {
  if (layout.total_bytes > 0 && workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (cudaError_t status = make_device_context_current(); status != cudaSuccess) {
    return status;
  }
  return zero_workspace_counters(layout, workspace, stream);
}

}  // namespace moe_gemm
