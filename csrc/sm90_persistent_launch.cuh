// Host side shared by both kernels' launchers: the CUTLASS element of a DType, and the launch of a
// persistent kernel (grid, clusters, shared memory).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/device_kernel.h"
#include "cutlass/numeric_types.h"

#include "moe_dtype.h"

namespace moe_gemm {

template <DType kDType> struct CutlassElement;
template <> struct CutlassElement<DType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<DType::kFloat16> { using type = cutlass::half_t; };

// Launches Kernel as a persistent grid on the current device: as many CTAs as are resident at once,
// at most sm_count SMs' worth (0: no limit), and no more clusters of Kernel::kClusterSize CTAs (1-D, see
// the forward kernel's LaunchClusterShape) than max_clusters, the most work units the sizes allow.
// Internal linkage (static) on purpose: the static local below would otherwise be one object for the whole process
// (GCC makes a static local of an inline function STB_GNU_UNIQUE), shared with another build of the same kernels
// loaded beside this one (scripts/build_baseline.sh), whose launches would then skip their own shared-memory opt-in
// and fail with "invalid argument".
template <class Kernel>
static cudaError_t launch_persistent(typename Kernel::Params const& params, int64_t max_clusters, int sm_count,
                                     cudaStream_t stream) {
  constexpr int kClusterSize = Kernel::kClusterSize;
  auto* kernel = &cutlass::device_kernel<Kernel>;
  int const smem_bytes = Kernel::SharedStorageSize;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }

  // Once per device: opt in to more than 48 KB of shared memory, and count the SMs (or, for
  // clusters, how many clusters fit at once: GPCs of odd SM counts leave SMs out).
  static std::atomic<int> resident_ctas[64] = {};
  int ctas = resident_ctas[device % 64].load(std::memory_order_relaxed);
  if (ctas == 0) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (status != cudaSuccess) {
      return status;
    }
    cudaDeviceGetAttribute(&ctas, cudaDevAttrMultiProcessorCount, device);
    if constexpr (kClusterSize > 1) {
      cudaLaunchConfig_t config = {};
      cudaLaunchAttribute cluster = {};
      cluster.id = cudaLaunchAttributeClusterDimension;
      cluster.val.clusterDim = {unsigned(kClusterSize), 1, 1};
      config.gridDim = dim3(unsigned(ctas / kClusterSize * kClusterSize));
      config.blockDim = dim3(Kernel::MaxThreadsPerBlock);
      config.dynamicSmemBytes = smem_bytes;
      config.attrs = &cluster;
      config.numAttrs = 1;
      int clusters = 0;
      status = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
      if (status != cudaSuccess || clusters <= 0) {
        return status != cudaSuccess ? status : cudaErrorInvalidConfiguration;
      }
      ctas = clusters * kClusterSize;
    }
    resident_ctas[device % 64].store(ctas, std::memory_order_relaxed);
  }
  if (sm_count > 0) {
    ctas = std::min(ctas, sm_count / kClusterSize * kClusterSize);
  }
  int64_t const clusters = std::min<int64_t>(std::max(ctas / kClusterSize, 1), std::max<int64_t>(max_clusters, 1));

  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute cluster = {};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim = {unsigned(kClusterSize), 1, 1};
  config.gridDim = dim3(unsigned(clusters * kClusterSize));
  config.blockDim = dim3(Kernel::MaxThreadsPerBlock);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = kClusterSize > 1 ? 1 : 0;
  status = cudaLaunchKernelEx(&config, kernel, params);
  if (status != cudaSuccess) {
    return status;
  }
  return cudaGetLastError();
}

}  // namespace moe_gemm
