// The forward kernel on FP8 operands, bf16 output, with rowwise scales (applied while the tile is packed to 16 bits,
// pack_tile's scale, or as a swapped decode tile is stored, store_tile_transposed's) or blockwise ones (applied to
// each k-block, mma_blockwise). K-major operands only (8-bit WGMMA reads K-major shared memory): [E, N, K] weights,
// which are K-major as WGMMA's A operand (the swapped tiles) and as its B. 128-byte k-blocks: 128 e4m3 columns
// (docs/design.md, "FP8").
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"

#include "moe_gemm.h"
#include "sm90_moe_gemm_kernel.hpp"
#include "sm90_moe_gemm_launch.cuh"
#include "sm90_persistent_launch.cuh"

namespace moe_gemm {

template <TileConfig kConfig, Fp8Scales kScales>
struct Sm90MoeFp8GemmConfig {
  static constexpr bool kSwapAB = TileTraits<kConfig>::kSwapAB;
  static_assert(!kSwapAB || kScales == Fp8Scales::kRowwise, "FP8 decode tiles: rowwise scales");
  using ElementIn = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  static constexpr TileConfigInfo kInfo = TileTraits<kConfig>::kInfo;
  // The MMA's tile: the output tile, or its transpose for the swapped decode tiles (weight columns x tokens x k).
  using TileShape = cute::Shape<cute::Int<kSwapAB ? kInfo.tile_n : kInfo.tile_m>,
                                cute::Int<kSwapAB ? kInfo.tile_m : kInfo.tile_n>, cute::_128>;
  static constexpr int kTileRows = cute::size<kSwapAB ? 1 : 0>(TileShape{});
  static constexpr int kEpiBuffers = kScales == Fp8Scales::kBlockwise ? 1 : 2;  // Sm90MoeGemmKernel::kEpiBuffers
  // Blockwise: each stage's scales (Sm90MoeGemmKernel::BlockScaleStorage), for as many stages as could fit.
  static constexpr int kBlockScaleCarveout = kScales == Fp8Scales::kBlockwise ? 8 * (kTileRows + 4) * 4 : 0;
  using ClusterShape = typename TileTraits<kConfig>::ClusterShape;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementIn, cutlass::layout::RowMajor, 16,
      ElementIn, cutlass::layout::ColumnMajor, 16,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem_bytes<ElementD>(kTileRows, kEpiBuffers) +
                                                        kBlockScaleCarveout>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum>::CollectiveOp;
  using Kernel = Sm90MoeGemmKernel<CollectiveMainloop, ElementD, false, kSwapAB, false, kScales>;
  static_assert(Kernel::kEpiBuffers == kEpiBuffers, "the stage count was computed for the kernel's epilogue buffers");
};

// p.a: fp8 [M, K] rows; p.b: fp8 [E, N, K]; p.d: bf16 [M, N]; the scales as Fp8ScaleParams says.
template <TileConfig kConfig, Fp8Scales kScales>
cudaError_t run_sm90_moe_gemm_fp8(GroupedGemmParams const& p, Fp8ScaleParams const& scales,
                                  GroupedGemmPlan const& plan, cudaStream_t stream) {
  using Kernel = typename Sm90MoeFp8GemmConfig<kConfig, kScales>::Kernel;
  typename Kernel::Arguments const args{p.a, p.lda, p.b, p.ldb, p.batch_stride_b, p.d, p.ldd, p.m_sizes,
                                        p.m_sizes_int64, p.M, int32_t(p.N), int32_t(p.K), p.E,
                                        TileTraits<kConfig>::kGroupM, 1, plan.dynamic_schedule, p.workspace,
                                        plan.workspace, nullptr, 0, scales.x_scale, scales.w_scale,
                                        scales.x_groups};
  typename Kernel::Params params{};
  if (cudaError_t status = Kernel::to_underlying_arguments(args, params); status != cudaSuccess) {
    return status;
  }
  return launch_persistent<Kernel>(params, plan.max_units, plan.sm_count, stream);
}

}  // namespace moe_gemm

#define MOE_GEMM_INSTANTIATE_FP8(CONFIG, SCALES)                                                            \
  template cudaError_t moe_gemm::run_sm90_moe_gemm_fp8<moe_gemm::TileConfig::CONFIG, moe_gemm::Fp8Scales::SCALES>( \
      moe_gemm::GroupedGemmParams const&, moe_gemm::Fp8ScaleParams const&, moe_gemm::GroupedGemmPlan const&,   \
      cudaStream_t);
