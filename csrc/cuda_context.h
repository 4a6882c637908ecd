// Host helper shared by the kernels' dispatch code. Plain C++.
#pragma once

#include <cuda_runtime.h>

namespace moe_gemm {

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

}  // namespace moe_gemm
