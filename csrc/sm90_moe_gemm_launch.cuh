// Host side of one kernel configuration: the CUTLASS collective mainloop for a (dtype, weight layout,
// tile) triple, derived from the configuration's row of csrc/moe_tile_configs.h, and its launch as the
// call's plan says. Each instantiation (and each configuration's gathering one, where its row has one) lives
// in its own .cu file (csrc/instantiations/, written by csrc/generate_instantiations.py) so that the build
// compiles them in parallel.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"

#include "moe_gemm.h"
#include "sm90_moe_gemm_kernel.hpp"
#include "sm90_persistent_launch.cuh"

namespace moe_gemm {

// The CuTe shapes of a configuration, from its row of the table. The MMA's tile is the output tile, or
// its transpose when the operands are swapped (weight columns x tokens x k). Why each configuration's
// sizes (stages, k-blocks of 128 for the swapped tiles): docs/design.md, "Tile configurations".
template <TileConfig kConfig>
struct TileTraits {
  static constexpr TileConfigInfo kInfo = tile_config_info(kConfig);
  static_assert(kConfig != TileConfig::kAuto && kInfo.config == kConfig, "a configuration of the table");
  static constexpr bool kSwapAB = kInfo.swap_ab;
  static constexpr bool kHasSplitK = kInfo.split_k;
  static constexpr bool kHasGatherA = kInfo.gather_a;
  static constexpr int kGroupM = kInfo.group_m;
  using TileShape = cute::Shape<cute::Int<kSwapAB ? kInfo.tile_n : kInfo.tile_m>,
                                cute::Int<kSwapAB ? kInfo.tile_m : kInfo.tile_n>, cute::Int<kInfo.tile_k>>;
  using ClusterShape = cute::Shape<cute::Int<kInfo.cluster_m>, cute::Int<kInfo.cluster_n>, cute::_1>;
};

template <DType kDType, bool kBNMajor, TileConfig kConfig>
struct Sm90MoeGemmConfig {
  using Element = typename CutlassElement<kDType>::type;
  using TileShape = typename TileTraits<kConfig>::TileShape;
  using ClusterShape = typename TileTraits<kConfig>::ClusterShape;
  static constexpr bool kSwapAB = TileTraits<kConfig>::kSwapAB;
  // CUTLASS names A as an M x K matrix and B as K x N. The tokens are K-contiguous: RowMajor as A,
  // ColumnMajor as B. The [E, N, K] weight is K-contiguous too, the [E, K, N] one (kBNMajor) is not.
  using LayoutTokens = cute::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutWeights =
      cute::conditional_t<kSwapAB != kBNMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using LayoutA = cute::conditional_t<kSwapAB, LayoutWeights, LayoutTokens>;
  using LayoutB = cute::conditional_t<kSwapAB, LayoutTokens, LayoutWeights>;
  // Rows of the output tile, which the epilogue's shared memory holds.
  static constexpr int kTileRows = cute::size<kSwapAB ? 1 : 0>(TileShape{});
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA, 8,
      Element, LayoutB, 8,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem_bytes<Element>(kTileRows)>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  template <bool kSplitK, bool kGatherA, GateUpLayout kGateUp = GateUpLayout::kNone>
  using Kernel = Sm90MoeGemmKernel<CollectiveMainloop, Element, kSplitK, kSwapAB, kGatherA, Fp8Scales::kNone, kGateUp>;
};

template <DType kDType, bool kBNMajor, TileConfig kConfig, bool kGatherA, bool kSplitK,
          GateUpLayout kGateUp = GateUpLayout::kNone>
cudaError_t launch_sm90_moe_gemm(GroupedGemmParams const& p, GroupedGemmPlan const& plan, cudaStream_t stream) {
  using Kernel = typename Sm90MoeGemmConfig<kDType, kBNMajor, kConfig>::template Kernel<kSplitK, kGatherA, kGateUp>;
  typename Kernel::Arguments args{p.a,
                                        p.lda,
                                        p.b,
                                        p.ldb,
                                        p.batch_stride_b,
                                        p.d,
                                        p.ldd,
                                        p.m_sizes,
                                        p.m_sizes_int64,
                                        p.M,
                                        int32_t(p.N),
                                        int32_t(p.K),
                                        p.E,
                                        TileTraits<kConfig>::kGroupM,
                                        kSplitK ? plan.split_k : 1,
                                        plan.dynamic_schedule,
                                        p.workspace,
                                        plan.workspace,
                                        p.gather_rows,
                                        p.gather_source_rows};
  args.activated = p.activated;
  args.ld_activated = p.ld_activated;
  args.act = p.activation;
  typename Kernel::Params params{};
  if (cudaError_t status = Kernel::to_underlying_arguments(args, params); status != cudaSuccess) {
    return status;
  }
  return launch_persistent<Kernel>(params, plan.max_units, plan.sm_count, stream);
}

// Split-K has its own kernel, for the configurations whose row says so (the heuristic splits problems
// of few rows per expert, which get those tiles; one extra instantiation per file keeps the build short).
// kGatherA (rows of A gathered through params.gather_rows) is a separate instantiation, of the configurations
// whose row has one.
template <DType kDType, bool kBNMajor, TileConfig kConfig, bool kGatherA>
cudaError_t run_sm90_moe_gemm(GroupedGemmParams const& p, GroupedGemmPlan const& plan, cudaStream_t stream) {
  static_assert(!kGatherA || TileTraits<kConfig>::kHasGatherA, "a configuration with a gathering kernel");
  if constexpr (TileTraits<kConfig>::kHasSplitK) {
    if (plan.split_k > 1) {
      return launch_sm90_moe_gemm<kDType, kBNMajor, kConfig, kGatherA, true>(p, plan, stream);
    }
  }
  return launch_sm90_moe_gemm<kDType, kBNMajor, kConfig, kGatherA, false>(p, plan, stream);
}

// The gated epilogue (kGateUp: interleaved or concatenated gate and up), gathering or not, for the configurations
// whose row has one: no split-K (the plan runs these unsplit).
template <DType kDType, bool kBNMajor, TileConfig kConfig, bool kGatherA, GateUpLayout kGateUp>
cudaError_t run_sm90_moe_gemm_gated(GroupedGemmParams const& p, GroupedGemmPlan const& plan, cudaStream_t stream) {
  static_assert(TileTraits<kConfig>::kInfo.gated && kGateUp != GateUpLayout::kNone,
                "a configuration with gated kernels");
  return launch_sm90_moe_gemm<kDType, kBNMajor, kConfig, kGatherA, false, kGateUp>(p, plan, stream);
}

}  // namespace moe_gemm

// One explicit instantiation per .cu file: a configuration's kernel, or (GATHER_A true) its gathering one.
#define MOE_GEMM_INSTANTIATE(DTYPE, B_N_MAJOR, CONFIG, GATHER_A)                               \
  template cudaError_t moe_gemm::run_sm90_moe_gemm<moe_gemm::DType::DTYPE, B_N_MAJOR,          \
                                                   moe_gemm::TileConfig::CONFIG, GATHER_A>(     \
      moe_gemm::GroupedGemmParams const&, moe_gemm::GroupedGemmPlan const&, cudaStream_t);

// The gated epilogue's instantiation of a configuration: LAYOUT kInterleaved or kConcatenated.
#define MOE_GEMM_INSTANTIATE_GATED(DTYPE, B_N_MAJOR, CONFIG, GATHER_A, LAYOUT)                        \
  template cudaError_t moe_gemm::run_sm90_moe_gemm_gated<moe_gemm::DType::DTYPE, B_N_MAJOR,          \
                                                         moe_gemm::TileConfig::CONFIG, GATHER_A,      \
                                                         moe_gemm::GateUpLayout::LAYOUT>(             \
      moe_gemm::GroupedGemmParams const&, moe_gemm::GroupedGemmPlan const&, cudaStream_t);
