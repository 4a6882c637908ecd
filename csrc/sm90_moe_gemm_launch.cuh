// Host side of one kernel configuration: builds the CUTLASS collective mainloop for a
// (dtype, weight layout, tile) triple, fills the kernel's Params and launches the persistent grid.
// Each instantiation lives in its own .cu file (csrc/instantiations/) so ninja compiles them in parallel.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/numeric_types.h"

#include "moe_gemm.h"
#include "moe_gemm_workspace.h"
#include "sm90_moe_gemm_kernel.hpp"
#include "sm90_ragged_tma.hpp"

namespace moe_gemm {

template <DType kDType> struct CutlassElement;
template <> struct CutlassElement<DType::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<DType::kFloat16> { using type = cutlass::half_t; };

// Kernel schedule: both consumer warpgroups on each tile unless a configuration says otherwise.
struct CooperativeTraits {
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  static constexpr int kConsumerGroups = 1;
  static constexpr bool kSwapAB = false;  // the tokens are the MMA's A operand
};

template <TileConfig kConfig> struct TileTraits;
// Large experts: 128x256 output tiles, 4 pipeline stages of 48 KB.
template <> struct TileTraits<TileConfig::k128x256> : CooperativeTraits {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kGroupM = 8;
};
// Ping-pong: each consumer warpgroup computes its own 128x128 tile, alternating with the other, so
// the epilogue of one overlaps the MMAs of the other (short K, where the epilogue is a larger share).
template <> struct TileTraits<TileConfig::k128x128Pingpong> {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  static constexpr int kConsumerGroups = 2;
  static constexpr int kGroupM = 8;
  static constexpr bool kSwapAB = false;
};
// Decode: output tiles of 16 rows x 128 columns, computed as their transpose (the MMA tile below is
// 128 weight columns x 16 tokens x 128 of K), so a stage is 32 KB of weights and 4 KB of tokens: 6
// stages, 192 KB of weights in flight per SM, 256 contiguous bytes of each weight row per stage.
// k-blocks of 128 measured 0.6-4% faster than 64 (12 stages of 16 KB) on all 70 decode shapes.
template <> struct TileTraits<TileConfig::k16x128SwapAB> : CooperativeTraits {
  using TileShape = cute::Shape<cute::_128, cute::_16, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kGroupM = 8;
  static constexpr bool kSwapAB = true;
};
// Decode-sized experts of up to 32 rows (about 16 to 32): the same with 32 tokens per tile, 32 KB of
// weights and 8 KB of tokens per stage, so that an expert of 17 to 32 rows streams its weights once.
template <> struct TileTraits<TileConfig::k32x128SwapAB> : CooperativeTraits {
  using TileShape = cute::Shape<cute::_128, cute::_32, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kGroupM = 8;
  static constexpr bool kSwapAB = true;
};
// Long experts: the same tile, two CTAs per cluster on consecutive m-blocks multicasting B (groups of
// 4 cluster m-blocks = 8 CTA m-blocks). Each CTA reads 32 KB per k-block from L2 instead of 48.
template <> struct TileTraits<TileConfig::k128x256Cluster2x1> : CooperativeTraits {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  static constexpr int kGroupM = 4;
};
// The same tile, two CTAs on consecutive n-blocks multicasting A: 40 KB per k-block from L2, and no
// m-block is rounded up to a pair (short experts waste nothing; N rounds up to 512 columns instead).
template <> struct TileTraits<TileConfig::k128x256Cluster1x2> : CooperativeTraits {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
  static constexpr int kGroupM = 8;
};
// Short experts or narrow N: half the columns per tile, so twice the tiles to spread over the SMs.
template <> struct TileTraits<TileConfig::k128x128> : CooperativeTraits {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kGroupM = 8;
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
  using LayoutWeights = cute::conditional_t<kSwapAB != kBNMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using LayoutA = cute::conditional_t<kSwapAB, LayoutWeights, LayoutTokens>;
  using LayoutB = cute::conditional_t<kSwapAB, LayoutTokens, LayoutWeights>;
  // Rows of the output tile, which the epilogue's shared memory holds.
  static constexpr int kTileRows = cute::size<kSwapAB ? 1 : 0>(TileShape{});
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA, 8,
      Element, LayoutB, 8,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<epilogue_smem_bytes<Element>(
          kTileRows, TileTraits<kConfig>::kConsumerGroups)>,
      typename TileTraits<kConfig>::Schedule>::CollectiveOp;
  template <bool kSplitK>
  using Kernel = Sm90MoeGemmKernel<CollectiveMainloop, Element, kSplitK, kSwapAB>;
};

// Split-K has its own kernel, for the decode tiles only (128x128 and the swapped 16x128): the
// heuristic splits problems of few rows per expert, which get those tiles, and one extra
// instantiation per file keeps the build short.
template <TileConfig kConfig>
constexpr bool kHasSplitKKernel = kConfig == TileConfig::k128x128 || TileTraits<kConfig>::kSwapAB;

// `p` comes resolved from run_grouped_gemm: dynamic_schedule is 0 or 1, split_k >= 1 (1 unless
// kHasSplitKKernel), and the workspace, when needed, is laid out as workspace_layout() says.
template <DType kDType, bool kBNMajor, TileConfig kConfig, bool kSplitK>
cudaError_t launch_sm90_moe_gemm(GroupedGemmParams const& p, cudaStream_t stream) {
  using namespace cute;
  using Config = Sm90MoeGemmConfig<kDType, kBNMajor, kConfig>;
  using Kernel = typename Config::template Kernel<kSplitK>;
  using Mainloop = typename Config::CollectiveMainloop;
  using Element = typename Config::Element;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  using InternalA = typename Mainloop::InternalElementA;
  using InternalB = typename Mainloop::InternalElementB;
  constexpr int kTileN = Kernel::kTileN;
  constexpr int kClusterM = Kernel::kClusterM;
  constexpr int kClusterSize = Kernel::kClusterSize;

  // The tokens: (M, K, 1) row-major. The weights: (N, K, E) with either K or N contiguous. They are A
  // and B, or B and A when swapped.
  auto const M = int32_t(p.M), N = int32_t(p.N), K = int32_t(p.K), E = int32_t(p.E);
  constexpr bool kSwapAB = Config::kSwapAB;
  using StrideTokens = cute::conditional_t<kSwapAB, StrideB, StrideA>;
  using StrideWeights = cute::conditional_t<kSwapAB, StrideA, StrideB>;
  StrideTokens const stride_tokens = make_stride(p.lda, Int<1>{}, int64_t(0));
  StrideWeights stride_weights;
  if constexpr (kBNMajor) {
    stride_weights = make_stride(Int<1>{}, p.ldb, p.batch_stride_b);
  } else {
    stride_weights = make_stride(p.ldb, Int<1>{}, p.batch_stride_b);
  }
  static_assert(std::is_same_v<InternalA, InternalB>);
  Tensor tokens = make_tensor(static_cast<InternalA const*>(p.a), make_layout(make_shape(M, K, int32_t(1)), stride_tokens));
  Tensor weights = make_tensor(static_cast<InternalB const*>(p.b), make_layout(make_shape(N, K, E), stride_weights));
  auto const operands = [&] {
    if constexpr (kSwapAB) { return cute::make_tuple(weights, tokens); } else { return cute::make_tuple(tokens, weights); }
  }();
  auto const& tensor_a = get<0>(operands);
  auto const& tensor_b = get<1>(operands);

  typename Kernel::Params params{};
  params.mainloop = {
      make_tma_copy_A_sm90(typename Mainloop::GmemTiledCopyA{}, tensor_a,
                           typename Mainloop::SmemLayoutA{}(_, _, Int<0>{}),
                           typename Config::TileShape{}, typename Config::ClusterShape{}),
      make_tma_copy_B_sm90(typename Mainloop::GmemTiledCopyB{}, tensor_b,
                           typename Mainloop::SmemLayoutB{}(_, _, Int<0>{}),
                           typename Config::TileShape{}, typename Config::ClusterShape{}),
      Mainloop::TmaTransactionBytes, Mainloop::TmaTransactionBytesMK, Mainloop::TmaTransactionBytesNK};
  if constexpr (Kernel::kPartialTokenLoads) {
    params.tma_load_half_tokens =
        make_tma_copy(SM90_TMA_LOAD{}, tensor_a, typename Kernel::SmemLayoutHalfTokens{},
                      make_shape(Int<Kernel::kTileM / 2>{}, Int<Kernel::kTileK>{}), Int<1>{});
  }
  params.partial_token_loads = p.partial_token_loads;
  if (cudaError_t status = detail::encode_ragged<Element>(&params.tma_store_d, p.d, N, p.ldd, Kernel::kEpiN,
                                                          Kernel::kStoreRows);
      status != cudaSuccess) {
    return status;
  }
  params.scheduler.m_sizes = p.m_sizes;
  params.scheduler.m_sizes_int64 = p.m_sizes_int64;
  params.scheduler.num_experts = E;
  params.scheduler.rows_total = p.M;
  params.scheduler.tiles_n = (N + kTileN * Kernel::kClusterN - 1) / (kTileN * Kernel::kClusterN);  // cluster n-blocks
  params.scheduler.group_m = p.group_m > 0 ? p.group_m : TileTraits<kConfig>::kGroupM;
  bool const dynamic = p.dynamic_schedule == 1;
  int const split_k = kSplitK ? p.split_k : 1;
  WorkspaceLayout const layout = workspace_layout(p.M, p.N, p.E, Kernel::kTileM, kTileN, dynamic, split_k);
  if (layout.total_bytes > 0 && p.workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  char* const workspace = static_cast<char*>(p.workspace);
  params.tile_counter = dynamic ? reinterpret_cast<int*>(workspace + layout.tile_counter_offset) : nullptr;
  params.ptr_d = static_cast<Element*>(p.d);
  params.ldd = p.ldd;
  params.N = N;
  params.K = K;
  params.split_k = split_k;
  params.overlap_epilogue = p.overlap_epilogue;
  params.split_k_divmod = cutlass::FastDivmod(split_k);
  int32_t const k_blocks = (K + Kernel::kTileK - 1) / Kernel::kTileK;
  params.k_blocks_per_split = k_blocks / split_k;
  params.k_blocks_remainder = k_blocks % split_k;
  params.partial_rows = int32_t(layout.partial_rows);
  params.tile_arrivals = split_k > 1 ? reinterpret_cast<int*>(workspace + layout.arrivals_offset) : nullptr;
  params.partials = split_k > 1 ? reinterpret_cast<float*>(workspace + layout.partials_offset) : nullptr;

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
  if (p.sm_count > 0) {
    ctas = std::min(ctas, p.sm_count / kClusterSize * kClusterSize);
  }

  // Persistent grid: as many CTAs as are resident at once, fewer when even the most work units the
  // sizes allow cannot fill them. Each expert adds at most one partial m-block of the cluster's
  // kTileM * kClusterM rows: cluster tiles <= (ceil(M / (BM * cM)) + min(E, M)) * cluster n-blocks,
  // each split_k units.
  int64_t const cluster_rows = int64_t(Kernel::kTileM) * kClusterM;
  int64_t const cluster_m_blocks = (p.M + cluster_rows - 1) / cluster_rows + std::min<int64_t>(p.E, p.M);
  int64_t const max_clusters = std::max<int64_t>(1, cluster_m_blocks * params.scheduler.tiles_n * split_k);
  int64_t const clusters = std::min<int64_t>(std::max(ctas / kClusterSize, 1), max_clusters);

  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute cluster = {};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim = {unsigned(kClusterSize), 1, 1};  // 1-D: see the kernel's LaunchClusterShape
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

template <DType kDType, bool kBNMajor, TileConfig kConfig>
cudaError_t run_sm90_moe_gemm(GroupedGemmParams const& p, cudaStream_t stream) {
  if constexpr (kHasSplitKKernel<kConfig>) {
    if (p.split_k > 1) {
      return launch_sm90_moe_gemm<kDType, kBNMajor, kConfig, true>(p, stream);
    }
  }
  return launch_sm90_moe_gemm<kDType, kBNMajor, kConfig, false>(p, stream);
}

}  // namespace moe_gemm

// One explicit instantiation per .cu file.
#define MOE_GEMM_INSTANTIATE(DTYPE, B_N_MAJOR, CONFIG)                                         \
  template cudaError_t moe_gemm::run_sm90_moe_gemm<moe_gemm::DType::DTYPE, B_N_MAJOR,          \
                                                   moe_gemm::TileConfig::CONFIG>(               \
      moe_gemm::GroupedGemmParams const&, cudaStream_t);
