// Host side of one kernel configuration: builds the CUTLASS collective mainloop for a
// (dtype, weight layout, tile) triple, fills the kernel's Params and launches the persistent grid.
// Each instantiation lives in its own .cu file (csrc/instantiations/) so ninja compiles them in parallel.
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
#include "sm90_moe_gemm_kernel.hpp"

namespace moe_gemm {

template <DType kDType> struct CutlassElement;
template <> struct CutlassElement<DType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<DType::kFloat16> { using type = cutlass::half_t; };

template <TileConfig kConfig> struct TileTraits;
// Large experts: 128x256 output tiles, 4 pipeline stages of 48 KB.
template <> struct TileTraits<TileConfig::k128x256> {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  static constexpr int kGroupM = 8;
};
// Short experts or narrow N: half the columns per tile, so twice the tiles to spread over the SMs.
template <> struct TileTraits<TileConfig::k128x128> {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  static constexpr int kGroupM = 8;
};

template <DType kDType, bool kBNMajor, TileConfig kConfig>
struct Sm90MoeGemmConfig {
  using Element = typename CutlassElement<kDType>::type;
  using TileShape = typename TileTraits<kConfig>::TileShape;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  // CUTLASS names B's layout as a K x N matrix: ColumnMajor = K contiguous = the [E, N, K] weight.
  using LayoutB = cute::conditional_t<kBNMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, 8,
      Element, LayoutB, 8,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem_bytes<Element>(cute::size<0>(TileShape{}))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = Sm90MoeGemmKernel<CollectiveMainloop, Element, TileTraits<kConfig>::kGroupM>;
};

template <DType kDType, bool kBNMajor, TileConfig kConfig>
cudaError_t run_sm90_moe_gemm(GroupedGemmParams const& p, cudaStream_t stream) {
  using namespace cute;
  using Config = Sm90MoeGemmConfig<kDType, kBNMajor, kConfig>;
  using Kernel = typename Config::Kernel;
  using Mainloop = typename Config::CollectiveMainloop;
  using Element = typename Config::Element;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using InternalA = typename Mainloop::InternalElementA;
  using InternalB = typename Mainloop::InternalElementB;
  constexpr int kTileN = Kernel::kTileN;

  // A: (M, K, 1) row-major. B: (N, K, E) with either K or N contiguous.
  auto const M = int32_t(p.M), N = int32_t(p.N), K = int32_t(p.K), E = int32_t(p.E);
  StrideA const stride_a = make_stride(p.lda, Int<1>{}, int64_t(0));
  StrideB stride_b;
  if constexpr (kBNMajor) {
    stride_b = make_stride(Int<1>{}, p.ldb, p.batch_stride_b);
  } else {
    stride_b = make_stride(p.ldb, Int<1>{}, p.batch_stride_b);
  }
  Tensor tensor_a = make_tensor(static_cast<InternalA const*>(p.a), make_layout(make_shape(M, K, int32_t(1)), stride_a));
  Tensor tensor_b = make_tensor(static_cast<InternalB const*>(p.b), make_layout(make_shape(N, K, E), stride_b));

  typename Kernel::Params params{};
  params.mainloop = {
      make_tma_copy_A_sm90(typename Mainloop::GmemTiledCopyA{}, tensor_a,
                           typename Mainloop::SmemLayoutA{}(_, _, Int<0>{}),
                           typename Config::TileShape{}, typename Config::ClusterShape{}),
      make_tma_copy_B_sm90(typename Mainloop::GmemTiledCopyB{}, tensor_b,
                           typename Mainloop::SmemLayoutB{}(_, _, Int<0>{}),
                           typename Config::TileShape{}, typename Config::ClusterShape{}),
      Mainloop::TmaTransactionBytes, Mainloop::TmaTransactionBytesMK, Mainloop::TmaTransactionBytesNK};
  params.tma_store_d = Kernel::make_tma_store_d(static_cast<Element*>(p.d), M, N, p.ldd);
  params.scheduler.m_sizes = p.m_sizes;
  params.scheduler.m_sizes_int64 = p.m_sizes_int64;
  params.scheduler.num_experts = E;
  params.scheduler.rows_total = p.M;
  params.scheduler.tiles_n = (N + kTileN - 1) / kTileN;
  params.ptr_d = static_cast<Element*>(p.d);
  params.ldd = p.ldd;
  params.N = N;
  params.K = K;

  // Persistent grid: one CTA per SM, fewer when even the most tiles the sizes allow cannot fill
  // them. Each expert adds at most one partial m-block: tiles <= (ceil(M / BM) + min(E, M)) * tiles_n.
  int sm_count = p.sm_count;
  if (sm_count <= 0) {
    int current = 0;
    cudaGetDevice(&current);
    cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, current);
  }
  int64_t const max_m_blocks = (p.M + Kernel::kTileM - 1) / Kernel::kTileM + std::min<int64_t>(p.E, p.M);
  int64_t const max_tiles = std::max<int64_t>(1, max_m_blocks * params.scheduler.tiles_n);
  dim3 const grid(static_cast<unsigned>(std::min<int64_t>(sm_count, max_tiles)));
  dim3 const block(Kernel::MaxThreadsPerBlock);
  int const smem_bytes = Kernel::SharedStorageSize;

  auto* kernel = &cutlass::device_kernel<Kernel>;
  // More than 48 KB of dynamic shared memory needs an opt-in, once per device.
  static std::atomic<uint64_t> smem_configured_devices{0};
  int device = 0;
  cudaGetDevice(&device);
  uint64_t const device_bit = uint64_t(1) << (device % 64);
  if (!(smem_configured_devices.load(std::memory_order_relaxed) & device_bit)) {
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (status != cudaSuccess) {
      return status;
    }
    smem_configured_devices.fetch_or(device_bit);
  }
  kernel<<<grid, block, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace moe_gemm

// One explicit instantiation per .cu file.
#define MOE_GEMM_INSTANTIATE(DTYPE, B_N_MAJOR, CONFIG)                                         \
  template cudaError_t moe_gemm::run_sm90_moe_gemm<moe_gemm::DType::DTYPE, B_N_MAJOR,          \
                                                   moe_gemm::TileConfig::CONFIG>(               \
      moe_gemm::GroupedGemmParams const&, cudaStream_t);
