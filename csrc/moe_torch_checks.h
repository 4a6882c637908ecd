// What the torch bindings of the routing and layer kernels (moe_routing_torch.cpp, moe_layer_torch.cpp) check
// alike: the element type a kernel takes, the enum a string argument names, and the GPU it would run on.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/string_view.h>
#include <cuda_runtime.h>

#include "moe_dtype.h"

namespace moe_gemm {

// The DType of a float32, bfloat16 or float16 tensor; any other type fails the check, naming `op` and `what`.
inline DType to_dtype(at::ScalarType type, char const* op, char const* what) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": the CUDA kernel takes float32, bfloat16 or float16 ", what, ", got ", type);
  return DType::kFloat32;  // not reached: the check throws
}

// The enum value that `name` names in `names` (the strings of an op's schema); any other name fails the check.
template <typename Enum, std::size_t N>
Enum from_name(c10::string_view name, std::array<std::pair<c10::string_view, Enum>, N> const& names, char const* op,
               char const* what) {
  for (auto const& [candidate, value] : names) {
    if (name == candidate) {
      return value;
    }
  }
  std::string choices;
  for (auto const& [candidate, value] : names) {
    choices += (choices.empty() ? "" : ", ") + std::string(candidate);
  }
  TORCH_CHECK(false, op, ": ", what, " must be one of ", choices, "; got ", name);
  return names[0].second;  // not reached: the check throws
}

// The kernels are compiled for sm_90a only, which no other GPU can run: refuse any other device before a launch.
// The Python entry points never hand one over (moe_gemm._ops.kernels_available sends them to the PyTorch path);
// this guards direct calls of the ops. Each device's compute capability is read once, then cached.
inline void check_sm90(at::Device device, char const* op) {
  // major * 10 + minor per device index; 0 until read.
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> capabilities{};
  int const index = device.index();
  TORCH_CHECK(device.is_cuda() && index >= 0 && index < C10_COMPILE_TIME_MAX_GPUS, op, ": expected a CUDA device, got ",
              device);
  int capability = capabilities[index].load(std::memory_order_relaxed);
  if (capability == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index));
    capability = major * 10 + minor;
    capabilities[index].store(capability, std::memory_order_relaxed);
  }
  if (capability == 90) {
    return;
  }
  cudaDeviceProp properties{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&properties, index));
  TORCH_CHECK(false, op, ": the CUDA kernels are built for sm_90a (compute capability 9.0: H100, H200, GH200); ",
              device, " is ", properties.name, ", compute capability ", capability / 10, ".", capability % 10);
}

}  // namespace moe_gemm
