// Host side of the weight-gradient kernel: the CUTLASS collective mainloop for (input dtype, output
// dtype), the three TMA descriptors, and the persistent launch. One instantiation per .cu file.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/numeric_types.h"

#include "moe_gemm.h"
#include "sm90_moe_wgrad_kernel.hpp"
#include "sm90_ragged_tma.hpp"

namespace moe_gemm {

template <DType kDType, bool kFloat32Out>
struct Sm90MoeWgradConfig {
  using Element = cute::conditional_t<kDType == DType::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;
  using ElementD = cute::conditional_t<kFloat32Out, float, Element>;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  // Operand A is L^T (P x rows) and B is R (rows x Q in CUTLASS's K x N naming): both contiguous
  // along P and Q, i.e. A column-major and B row-major.
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::ColumnMajor, 8,
      Element, cutlass::layout::RowMajor, 8,
      float, TileShape, cute::Shape<cute::_1, cute::_1, cute::_1>,
      cutlass::gemm::collective::StageCountAutoCarveout<wgrad_epilogue_smem_bytes(128)>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = Sm90MoeWgradKernel<CollectiveMainloop, ElementD>;
};

template <DType kDType, bool kFloat32Out>
cudaError_t run_sm90_moe_wgrad(GroupedWgradParams const& p, cudaStream_t stream) {
  using Config = Sm90MoeWgradConfig<kDType, kFloat32Out>;
  using Kernel = typename Config::Kernel;
  using Element = typename Config::Element;
  using ElementD = typename Config::ElementD;

  typename Kernel::Params params{};
  cudaError_t status =
      detail::encode_ragged<Element>(&params.tma_l, p.l, p.P, p.ldl, Kernel::kBoxCols, Kernel::kTileK);
  if (status == cudaSuccess) {
    status = detail::encode_ragged<Element>(&params.tma_r, p.r, p.Q, p.ldr, Kernel::kBoxCols, Kernel::kTileK);
  }
  if (status == cudaSuccess) {
    uint64_t const dims[3] = {uint64_t(p.Q), uint64_t(p.P), uint64_t(p.E)};
    uint64_t const strides[3] = {1, uint64_t(p.ldd), uint64_t(p.batch_stride_d)};
    uint32_t const box[3] = {uint32_t(Kernel::kEpiN), uint32_t(Kernel::kStoreRows), 1};
    status = detail::encode_tma(&params.tma_d, detail::tma_type<ElementD>(), int(sizeof(ElementD)), p.d, 3, dims,
                                strides, box);
  }
  if (status != cudaSuccess) {
    return status;
  }
  params.P = int32_t(p.P);
  int32_t const tiles_p = int32_t((p.P + Kernel::kTileP - 1) / Kernel::kTileP);
  int32_t const tiles_q = int32_t((p.Q + Kernel::kTileQ - 1) / Kernel::kTileQ);
  params.scheduler = WgradSchedulerParams::make(p.m_sizes, p.m_sizes_int64, p.E, p.M, tiles_p, tiles_q,
                                                std::min(p.group_p > 0 ? p.group_p : 8, tiles_p));
  params.tile_counter = static_cast<int*>(p.workspace);
  params.accumulate = p.accumulate;
  params.overlap_epilogue = p.overlap_epilogue;

  auto* kernel = &cutlass::device_kernel<Kernel>;
  int const smem_bytes = Kernel::SharedStorageSize;
  int device = 0;
  status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }
  static std::atomic<int> sm_counts[64] = {};
  int ctas = sm_counts[device % 64].load(std::memory_order_relaxed);
  if (ctas == 0) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (status != cudaSuccess) {
      return status;
    }
    cudaDeviceGetAttribute(&ctas, cudaDevAttrMultiProcessorCount, device);
    sm_counts[device % 64].store(ctas, std::memory_order_relaxed);
  }
  if (p.sm_count > 0) {
    ctas = std::min(ctas, p.sm_count);
  }
  int64_t const tiles = int64_t(tiles_p) * tiles_q * p.E;
  unsigned const grid = unsigned(std::max<int64_t>(1, std::min<int64_t>(ctas, tiles)));
  kernel<<<grid, Kernel::MaxThreadsPerBlock, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace moe_gemm

#define MOE_GEMM_INSTANTIATE_WGRAD(DTYPE, FLOAT32_OUT)                                            \
  template cudaError_t moe_gemm::run_sm90_moe_wgrad<moe_gemm::DType::DTYPE, FLOAT32_OUT>(         \
      moe_gemm::GroupedWgradParams const&, cudaStream_t);
