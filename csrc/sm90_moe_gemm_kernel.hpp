// The sm90 MoE grouped GEMM kernel: persistent, warp-specialized, cooperative (two consumer warpgroups
// share each tile: a TiledMma of 256 threads), TMA loads and WGMMA through CUTLASS's sm90 collective
// mainloop. How it works, with the figures behind each choice: docs/design.md.
//
// What is MoE-specific here (the rest is CUTLASS):
//   - the tile scheduler (sm90_moe_tile_scheduler.hpp) reads the per-expert row counts on the GPU;
//     tiles are handed out statically (CTA b takes b, b + grid, ...) or, for problems of several
//     waves, dynamically from a global counter, so that CTAs sharing a weight tile start it together.
//     The TMA warp decodes each one and hands it to the MMA warpgroups (DecodedUnit);
//   - clusters of two CTAs, along M (they share, and multicast, the B tile) or along N (the A tile);
//     with dynamic scheduling the cluster's rank-0 producer takes each unit from the counter and
//     broadcasts it to the other CTA's shared memory (ClusterUnitSlots, sm90_moe_tile_scheduler.hpp);
//   - one TMA descriptor serves every expert: A is the whole [M, K] tensor, addressed at the
//     expert's first row through a coordinate offset; B is a 3-D [N, K, E] tensor indexed by e;
//   - the epilogue: tiles go out through shared memory and asynchronous TMA stores (64 columns at
//     a time, double-buffered, so the next tile's MMAs start while the store drains; blockwise FP8 has
//     one buffer, kEpiBuffers); 16-bit tiles wait
//     in registers and are stored under the next tile's MMAs (sm90_moe_mainloop.hpp). D's descriptor
//     is ragged (sm90_ragged_tma.hpp): the store of an expert's last, partial m-block drops the rows
//     past the expert's end, which the MMA computed from the next expert's A rows and which must never
//     be written. Finally the CTAs zero the rows
//     of D that no expert covers (sm90_moe_epilogue.hpp);
//   - an expert's tail of at most 64 rows is multiplied by one warpgroup (idle_warp_group), at the
//     full rate of the tensor cores, instead of by both at half rate each, and loads only those 64
//     token rows (kPartialTokenLoads: such a tile is bound by its loads, not its MMAs);
//   - decode tiles with the operands swapped (kSwapAB): the weights are WGMMA's A operand and a few
//     tokens its B, so the stages hold weights rather than 128 token rows of which one is used; the
//     tile is stored transposed from registers (sm90_moe_epilogue.hpp);
//   - split-K (kSplitK, a separate instantiation) for problems of few tiles (decode): the work unit
//     is (tile, split), each unit runs the mainloop over its share of the k-blocks, writes its fp32
//     partial tile to the workspace and counts itself on the tile's arrival counter; the unit that
//     arrives last sums the partials in split order (deterministic) and stores D
//     (sm90_moe_epilogue.hpp). Without kSplitK none of it is compiled in;
//   - gathered token rows (kGatherA, a separate instantiation, cooperative tiles without clusters): row r of
//     A is row gather_rows[r] of a source tensor [T, K], so that the MoE layer multiplies hidden[token_of_row]
//     without materialising it. The producer warpgroup's 128 threads copy the token tile's rows with cp.async,
//     eight threads per 128-byte row, into the 128-byte swizzle the whole tile's TMA box would have written
//     (GatheredTokenRows). Without kGatherA none of it is compiled in;
//   - the gated activation of the up-projection (kGateUp, a separate instantiation, cooperative tiles without
//     clusters, with or without kGatherA): the tile of gate_up leaves as act(gate) * up, [rows, I], and when the
//     caller asks for it as gate_up too (sm90_moe_gated_epilogue.hpp). Gate and up of an output column meet in
//     one thread's registers: interleaved weight rows give them as neighbouring columns; with concatenated
//     [gate; up] rows the producer loads each B tile as half a tile of gate rows over the matching half of up
//     rows (GateUpHalves). Without kGateUp none of it is compiled in.
#pragma once

#include <cuda.h>

#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/atom/copy_traits_sm90_tma.hpp"
#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"
#include "cutlass/cutlass.h"
#include "cutlass/fast_math.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/pipeline/pipeline.hpp"

#include "moe_dtype.h"
#include "moe_gemm_workspace.h"
#include "moe_activation.h"
#include "sm90_moe_epilogue.hpp"
#include "sm90_moe_gated_epilogue.hpp"
#include "sm90_moe_mainloop.hpp"
#include "sm90_moe_tile_scheduler.hpp"
#include "sm90_ragged_tma.hpp"

namespace moe_gemm {

// Shared memory of the TMA-store epilogue: `buffers` buffers of kTileM x 64 outputs (Sm90MoeGemmKernel::kEpiBuffers).
template <class ElementD>
constexpr int epilogue_smem_bytes(int tile_m, int buffers = 2) {
  return buffers * tile_m * 64 * int(sizeof(ElementD));
}

// The token tile's first kRows rows (of a K-major A): their shared-memory layout, the prefix of each
// stage of the mainloop's SmemLayoutA (tile_to_shape fills M first), and a TMA load of such boxes.
template <bool kEnabled, class Mainloop, int kRows, int kCols>
struct HalfTokenTiles {
  using SmemLayout = decltype(cute::tile_to_shape(typename Mainloop::SmemLayoutAtomA{},
                                                  cute::make_shape(cute::Int<kRows>{}, cute::Int<kCols>{}),
                                                  cute::Step<cute::_1, cute::_2>{}));
  using Element = typename Mainloop::InternalElementA;
  using Stride = typename Mainloop::StrideA;
  using Tma = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(static_cast<Element const*>(nullptr), cute::repeat_like(Stride{}, int32_t(0)), Stride{}),
      SmemLayout{}, cute::make_shape(cute::Int<kRows>{}, cute::Int<kCols>{}), cute::_1{}));
};
template <class Mainloop, int kRows, int kCols>
struct HalfTokenTiles<false, Mainloop, kRows, kCols> {
  using SmemLayout = void;
  struct Tma {};
};

// kGatherA: where the token rows come from, and why cp.async. Hopper's TMA has no row gather; one-row boxes (128
// bytes) issued by the producer warpgroup were bitwise right but ran at 0.42-0.9x copy + grouped_mm on the H200:
// about 23 cycles per box per SM, so a 128x64 tile took ~3000 cycles of TMA issue against ~1400 of MMAs.
// cp.async moves the same tile as 1024 16-byte copies, 8 per thread, in 4 warp instructions of fully used 128-byte
// rows. Each copy lands where TMA's 128-byte swizzle would put it (bits 4-6 of the shared-memory address XOR
// bits 7-9), so the WGMMA descriptors read the stage unchanged.
template <bool kEnabled>
struct GatheredTokenRows {
  void const* tokens;        // the source [T, K], rows row_bytes apart (less than 4 GiB: moe_gemm.cpp checks)
  uint32_t row_bytes;
  int64_t source_rows;       // T
  int64_t const* rows;       // [M]: row r of A is row rows[r] of the source
};
template <>
struct GatheredTokenRows<false> {};

// Whether the token tile's row r of stage s is the kCols elements at ((s * kRows) + r) * kCols of the stages,
// before the swizzle: then a one-row box has its own 128 bytes, at that row's address. (Checked at a few
// columns of every row of stage 1; the layout is affine within a stage.)
template <class SmemLayout, int kRows, int kCols>
constexpr bool token_rows_are_contiguous() {
  auto const layout = cute::get_nonswizzle_portion(SmemLayout{});
  for (int r = 0; r < kRows; ++r) {
    for (int c : {0, 1, kCols - 1}) {
      if (layout(r, c, 1) != (kRows + r) * kCols + c) {
        return false;
      }
    }
  }
  return true;
}

// The float32 scales of FP8 operands (Fp8Scales in moe_gemm.h).
// kRowwise: one per row of A (x_scale [M]) and per output column of each expert's weight (w_scale [E, N]); the
// accumulators are multiplied by both before the store (D = x_scale[r] * w_scale[e, c] * sum_k a[r, k] b[c, k]),
// since the scales do not vary along K.
// kBlockwise: w_scale [E, ceil(N / 128), ceil(K / 128)], one per 128 x 128 block of each expert's weight, and
// x_scale [M, x_groups] with x_groups = ceil(K / 128) (one per row and 128 columns) or [M] (x_groups = 0). They vary
// along K, so each 128-deep k-block is multiplied apart and added in, times its scales (mma_blockwise).
template <Fp8Scales kScales>
struct ScaleParams {
  float const* x_scale;
  float const* w_scale;
  int64_t x_row_stride;  // kBlockwise: x_scale's elements between rows (x_groups, or 1 for [M])
  int32_t x_k_stride;    // kBlockwise: between a row's k-blocks (1, or 0 for [M])
  int32_t k_groups;      // kBlockwise: ceil(K / 128)
  int32_t n_groups;      // kBlockwise: ceil(N / 128)
};
template <>
struct ScaleParams<Fp8Scales::kNone> {};

// kGateUp, concatenated [gate; up] weight rows: the weights seen as (N', K, E) with row n' = r + kHalf h + kTileN b
// (r < kHalf = kTileN / 2, h = 0 gate or 1 up, b the n-block) at weight row r + kHalf b + I h. One TMA box of this
// hierarchical view loads n-block b's gate rows over its up rows, the tile the MMA then sees; the plain view's
// box (kTileN consecutive rows) lands in the same shared memory, row after row. I must be a multiple of kHalf.
template <int kHalf>
struct GateUpHalves {
  // Weights [E, N, K] (N-major false: K contiguous) or [E, K, N] (true), N = 2 I.
  template <bool kNMajor, class Element>
  static auto tensor(Element const* weights, int32_t N, int32_t K, int32_t E, int64_t ld, int64_t batch_stride) {
    using namespace cute;
    int32_t const I = N / 2;
    auto const shape = make_shape(make_shape(Int<kHalf>{}, Int<2>{}, I / kHalf), K, E);
    if constexpr (kNMajor) {
      return make_tensor(weights, make_layout(shape, make_stride(make_stride(Int<1>{}, int64_t(I), int64_t(kHalf)),
                                                                 ld, batch_stride)));
    } else {
      return make_tensor(weights, make_layout(shape, make_stride(make_stride(ld, ld * I, ld * kHalf), Int<1>{},
                                                                 batch_stride)));
    }
  }
  // The shape of the TMA's coordinate tensor, as the view's.
  CUTE_HOST_DEVICE static auto shape(int32_t N, int32_t K, int32_t E) {
    using namespace cute;
    return make_shape(make_shape(Int<kHalf>{}, Int<2>{}, N / 2 / kHalf), K, E);
  }
};

// The type of GateUpHalves' TMA load for a mainloop (its B operand's copy, layout and tile); int when unused.
template <bool kEnabled, class Mainloop, int kHalf>
struct GateUpHalvesTma {
  static constexpr bool kNMajor = cute::is_static<decltype(cute::get<0>(typename Mainloop::StrideB{}))>::value;
  using type = decltype(cute::make_tma_copy_B_sm90(
      typename Mainloop::GmemTiledCopyB{},
      GateUpHalves<kHalf>::template tensor<kNMajor>(static_cast<typename Mainloop::InternalElementB const*>(nullptr),
                                                    0, 0, 0, 0, 0),
      typename Mainloop::SmemLayoutB{}(cute::_, cute::_, cute::Int<0>{}), typename Mainloop::TileShape{},
      typename Mainloop::DispatchPolicy::ClusterShape{}));
};
template <class Mainloop, int kHalf>
struct GateUpHalvesTma<false, Mainloop, kHalf> {
  using type = int;
};

// kGateUp: the B descriptor of concatenated rows, the activated output's store descriptor and the call's activation.
template <GateUpLayout kLayout, class TmaWeightHalves>
struct GatedEpilogueParams {
  TmaWeightHalves tma_load_weight_halves;  // concatenated only
  CUtensorMap tma_store_activated;         // ragged view of activated [M, I], boxes of kEpiN columns x kStoreRows
  void* activated;
  int64_t ld_activated;
  int32_t I;
  GatedActivation act;
  bool write_pre_activation;  // D (ptr_d, tma_store_d) is gate_up; otherwise ptr_d is null
};
template <class TmaWeightHalves>
struct GatedEpilogueParams<GateUpLayout::kNone, TmaWeightHalves> {};

template <class CollectiveMainloop_, class ElementD_, bool kSplitK_ = false, bool kSwapAB_ = false,
          bool kGatherA_ = false, Fp8Scales kScales_ = Fp8Scales::kNone, GateUpLayout kGateUp_ = GateUpLayout::kNone>
class Sm90MoeGemmKernel {
 public:
  using CollectiveMainloop = CollectiveMainloop_;
  using ElementD = ElementD_;
  using TileShape = typename CollectiveMainloop::TileShape;
  using TiledMma = typename CollectiveMainloop::TiledMma;
  using MainloopParams = typename CollectiveMainloop::Params;
  using MainloopPipeline = typename CollectiveMainloop::MainloopPipeline;
  using PipelineState = typename CollectiveMainloop::PipelineState;

  using ClusterShape = typename CollectiveMainloop::DispatchPolicy::ClusterShape;
  // The output tile is kTileM rows (an expert's tokens) by kTileN columns. Normally the tokens are the
  // MMA's A operand and the tile is the MMA's. Swapped (kSwapAB, for decode) the weights are A: the
  // MMA computes the kTileN x kTileM transpose, with the tokens along WGMMA's N, which may be as
  // small as 8, so that a stage holds a few token rows instead of 128 rows of which 1 is used.
  static constexpr bool kSwapAB = kSwapAB_;
  static constexpr int kTileM = cute::size<kSwapAB ? 1 : 0>(TileShape{});
  static constexpr int kTileN = cute::size<kSwapAB ? 0 : 1>(TileShape{});
  static constexpr int kTileK = cute::size<2>(TileShape{});
  // A cluster of kClusterM x kClusterN CTAs takes kClusterM consecutive m-blocks of one expert and
  // kClusterN consecutive n-blocks: the CTAs of one n-block load 1/kClusterM of its B tile each and
  // multicast it to the others, those of one m-block share A the same way. The scheduler counts
  // cluster tiles (kTileM * kClusterM rows by kTileN * kClusterN columns). CTA rank r in the cluster
  // is (m = r % kClusterM, n = r / kClusterM), CuTe's order; the cluster is launched as 1-D.
  static constexpr int kClusterM = cute::size<0>(ClusterShape{});
  static constexpr int kClusterN = cute::size<1>(ClusterShape{});
  static constexpr int kClusterSize = kClusterM * kClusterN;
  static_assert(cute::size<2>(ClusterShape{}) == 1);
  // The mainloop pipeline sees the 1-D launch shape: consumers release every CTA of the cluster,
  // all of which multicast into them when the cluster is 2x1 or 1x2.
  static_assert(kClusterSize <= 2, "clusters of more than two CTAs would need the 2-D pipeline shape");
  using LaunchClusterShape = cute::Shape<cute::Int<kClusterSize>, cute::_1, cute::_1>;
  using Scheduler = Sm90MoeTileScheduler<kTileM * kClusterM>;
  // Split-K needs static or dynamic scheduling of single CTAs: both CTAs of a cluster would have to
  // take the same split.
  static constexpr bool kSplitK = kSplitK_;
  static_assert(!kSplitK || kClusterSize == 1, "split-K runs without clusters");

  // The threads that compute one tile: both consumer warpgroups.
  static constexpr uint32_t kNumMmaThreads = cute::size(TiledMma{});
  static_assert(kNumMmaThreads == 2 * cutlass::NumThreadsPerWarpGroup, "cooperative kernel: two consumer warpgroups");
  static constexpr uint32_t kNumConsumerThreads = kNumMmaThreads;
  static constexpr uint32_t MaxThreadsPerBlock = kNumConsumerThreads + cutlass::NumThreadsPerWarpGroup;
  // Swapped tiles are stored from registers (transposed, with the row predicate); no clusters.
  static_assert(!kSwapAB || kClusterSize == 1, "swapped tiles run without clusters");
  static constexpr uint32_t MinBlocksPerMultiprocessor = 1;

  // Epilogue chunks: kTileM x 64 outputs = 128-byte rows, the widest TMA swizzle (no bank conflicts).
  static constexpr int kEpiN = 64;
  // Blockwise FP8 gives one buffer to its stages' scales: with two, a 128x128 tile's six stages do not fit.
  static constexpr int kEpiBuffers = kScales_ == Fp8Scales::kBlockwise ? 1 : 2;
  // Rows of D's TMA store box: those of one warpgroup (64 of a 128-row tile).
  static constexpr int kStoreRows = kSwapAB ? kTileM : kRowsPerWarpGroup<TiledMma, kTileM>;
  static_assert(kTileN % kEpiN == 0);
  static constexpr int kChunks = kTileN / kEpiN;
  // 16-bit tiles are stored under the next tile's MMAs (consume()); the swapped and split-K tiles store
  // from registers or partials, and blockwise FP8 tiles at once: their registers hold two more accumulators
  // instead (mma_blockwise).
  static constexpr bool kDeferStore =
      !kSwapAB && !kSplitK && sizeof(ElementD) == 2 && kScales_ != Fp8Scales::kBlockwise;
  using SmemLayoutD = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<ElementD>{},
      cute::make_shape(cute::Int<kTileM>{}, cute::Int<kEpiN>{}, cute::Int<kEpiBuffers>{})));
  static constexpr int kSmemDElements = cute::cosize_v<SmemLayoutD>;

  // An expert's tail of at most kTileM / 2 rows is multiplied by the first warpgroup alone
  // (idle_warp_group), which reads only the first half of the token tile: the producer loads just that
  // half, a sixth of a 128x256 stage's bytes (a quarter of a 128x128 one's), since a tail is bound by its
  // loads rather than its MMAs. In a 1x2 cluster that half is rank 0's multicast share of the token tile,
  // so rank 1 skips its own; otherwise a second descriptor loads half-tile boxes. A cluster CTA past the
  // expert's last m-block (2x1) loads no tokens at all. The stage's barrier still expects the whole
  // tile; the producer completes the bytes it did not load by hand (mbarrier complete_tx).
  // (A gathering kernel loads only the expert's rows of every tile anyway: GatheredTokenRows.)
  static constexpr bool kGatherA = kGatherA_;
  static constexpr bool kPartialTokenLoads = !kSwapAB && kTileM == 128 && !kGatherA;
  static constexpr uint32_t kTokenTileBytes =
      uint32_t(kTileM * kTileK * sizeof(typename CollectiveMainloop::InternalElementA));
  using HalfTokens = HalfTokenTiles<kPartialTokenLoads, CollectiveMainloop, kTileM / 2, kTileK>;
  using SmemLayoutHalfTokens = typename HalfTokens::SmemLayout;
  using TmaHalfTokens = typename HalfTokens::Tma;

  // kGatherA: the producer warpgroup's 128 threads copy the token tiles (warp 0's lanes in produce(), warps 1-3
  // in load_gathered_rows()): warp w the rows [32w, 32w + 32), eight lanes per row, a 16-byte chunk each, so
  // that a warp instruction copies four whole 128-byte rows. Rows at or past the expert's end, an index outside
  // the source and columns past K are zero-filled without a read. Each thread's copies into a stage arrive on its
  // barrier when they land (GatheredTile::load).
  static constexpr uint32_t kTokenRowBytes = uint32_t(kTileK * sizeof(typename CollectiveMainloop::InternalElementA));
  static_assert(!kGatherA || (kClusterSize == 1 && !kSwapAB && kTileM == int(cutlass::NumThreadsPerWarpGroup)),
                "gathered rows: cooperative 128-row tiles without clusters");
  using GatherParams = GatheredTokenRows<kGatherA>;
  static constexpr Fp8Scales kScales = kScales_;
  static constexpr bool kRowwiseScales = kScales == Fp8Scales::kRowwise;
  static constexpr bool kBlockwiseScales = kScales == Fp8Scales::kBlockwise;
  static_assert(kScales == Fp8Scales::kNone ||
                    (!kSplitK && !kGatherA && sizeof(ElementD) == 2 && (!kSwapAB || kScales == Fp8Scales::kRowwise)),
                "FP8 scales: unsplit tiles of a 16-bit output, the swapped decode tiles with rowwise scales only "
                "(applied while packed, PendingTile, or as stored, store_tile_transposed)");
  static_assert(!kBlockwiseScales || ((kTileN == 128 || kTileN == 256) && kTileK == 128 && kClusterSize == 1),
                "blockwise FP8 scales: 128 x 128 or 128 x 256 tiles of 128-deep k-blocks, one or two weight scale "
                "blocks each");
  // kBlockwiseScales: the producer warpgroup's warps 1-3 copy each k-block's scales into its stage
  // (load_block_scales: x_scale of the tile's 128 rows and the weight blocks' scales), so that the MMA warps read them
  // from shared memory instead of loading them from global memory in their k-loop.
  static constexpr bool kAssistingWarps = kGatherA || kBlockwiseScales;
  static constexpr int kStages = CollectiveMainloop::DispatchPolicy::Stages;
  static constexpr int kWeightBlocks = kTileN / 128;  // blockwise: the weight scale blocks a tile spans
  static constexpr int kStageScales = kTileM + 4;  // a stage's scales: the rows', then the weight blocks'
  struct BlockScaleStorage {
    alignas(16) float scales[kStages][kStageScales];
  };
  struct NoBlockScaleStorage {};
  // The threads that read the decoded units: the MMA warpgroups, and the producer's warps 1-3 when they load.
  static constexpr uint32_t kTileSlotReaders =
      kNumConsumerThreads + (kAssistingWarps ? cutlass::NumThreadsPerWarpGroup - cutlass::NumThreadsPerWarp : 0);

  // kGateUp: the tile of gate_up (N = 2 I columns) leaves as act(gate) * up (kTileN / 2 columns of [M, I]),
  // held in registers as a deferred 16-bit tile is, and, when written, as itself, stored at once (PendingGatedTile).
  static constexpr GateUpLayout kGateUp = kGateUp_;
  static constexpr bool kGated = kGateUp != GateUpLayout::kNone;
  static constexpr bool kConcatenated = kGateUp == GateUpLayout::kConcatenated;
  static_assert(!kGated || (kClusterSize == 1 && !kSwapAB && !kSplitK && sizeof(ElementD) == 2 && kTileM == 128),
                "the gated epilogue: cooperative 16-bit 128-row tiles without clusters, split-K or swapped operands");
  static constexpr int kGateUpHalf = kTileN / 2;
  using WeightHalves = GateUpHalves<kGateUpHalf>;
  using TmaWeightHalves = typename GateUpHalvesTma<kConcatenated, CollectiveMainloop, kGateUpHalf>::type;
  using GatedParams = GatedEpilogueParams<kGateUp, TmaWeightHalves>;
  // The chunk stores a held tile takes, one per k-block of the next tile (mma_with_hook).
  static constexpr int kPendingSteps = kGated ? kChunks / 2 : kChunks;

  // Split-K: work unit u is split u % split_k of tile u / split_k, and runs k-blocks [begin, begin + count).
  struct KBlockRange {
    int32_t split;
    int32_t begin;
    int32_t count;
  };
  // The producer warp decodes each work unit (whatever the schedule) and hands it to the MMA warpgroups
  // through this small pipeline, so that they go from one tile's MMAs to the next without a decode in
  // between. An invalid `work` tells them to stop; its row_start is then the rows covered by all experts.
  struct DecodedUnit {
    MoeWorkTile work;
    KBlockRange k_blocks;
    int64_t tile;  // the scheduler's tile (split-K: of the arrival counter and the partials)
  };
  static constexpr int kTileSlots = 4;
  using TilePipeline = cutlass::PipelineAsync<kTileSlots>;
  using TilePipelineState = typename TilePipeline::PipelineState;
  // Dynamic scheduling in a cluster: rank 0's producer warp broadcasts each unit (sm90_moe_tile_scheduler.hpp).
  using UnitSlots = ClusterUnitSlots<kTileSlots>;
  using UnitSlotState = typename UnitSlots::State;

  struct SharedStorage {
    typename CollectiveMainloop::TensorStorage tensors;
    alignas(1024) cute::array_aligned<ElementD, kSmemDElements, 1024> smem_d;
    alignas(16) typename CollectiveMainloop::PipelineStorage pipeline;
    alignas(16) typename TilePipeline::SharedStorage tile_pipeline;
    DecodedUnit tile_slots[kTileSlots];
    alignas(16) UnitSlots cluster_units;
    int split_k_last_arrival;  // split-K: thread 0 tells the MMA warpgroups whether they reduce the tile
    cute::conditional_t<kBlockwiseScales, BlockScaleStorage, NoBlockScaleStorage> block_scales;
  };
  static constexpr int SharedStorageSize = sizeof(SharedStorage);
  static_assert(SharedStorageSize <= 232448, "more shared memory than an H100 SM has");

  struct Params {
    MainloopParams mainloop;
    CUtensorMap tma_store_d;  // ragged view of D, boxes of kEpiN columns x kTileM rows
    MoeSchedulerParams scheduler;
    // Zeroed before the launch; null for static striding (unit = first + i * num_clusters). With a
    // counter, CTA b starts with unit b and then takes gridDim + atomicAdd(counter, 1): units start in
    // order of time, so the CTAs that share a weight tile load it from L2 together.
    int* tile_counter;
    ElementD* ptr_d;
    int64_t ldd;
    int32_t N;
    int32_t K;
    // Split-K (kSplitK only; split_k >= 2). Unit u is split u % split_k of tile
    // u / split_k: the splits of a tile are neighbours in the unit sequence, so they run in the same
    // wave on different SMs, each streaming its own slice of the weight tile, and the partials are
    // read back from L2 soon after they were written. Units are counted in 32 bits (the host splits
    // only problems of fewer than 2^30 units); the producer warp has 40 registers, so the division
    // is precomputed: k-blocks per split = base, the first `remainder` splits one more.
    int32_t split_k;
    cutlass::FastDivmod split_k_divmod;
    int32_t k_blocks_per_split;
    int32_t k_blocks_remainder;
    int32_t partial_rows;  // rows of each partial tile in the workspace: min(kTileM, M)
    TmaHalfTokens tma_load_half_tokens;  // kPartialTokenLoads without A multicast: boxes of kTileM / 2 rows
    int* tile_arrivals;    // [tile slots] splits done per tile, zeroed before the launch
    float* partials;       // [tile slots][split_k][partial_rows][kTileN] fp32 partial sums
    GatherParams gather;   // kGatherA only
    ScaleParams<kScales> scales;  // FP8 only
    GatedParams gated;     // kGateUp only
  };

  // The host's side of a launch, in plain values: the call's tensors and the plan's choices. The kernel
  // turns them into its Params (the TMA descriptors, the scheduler's table, the precomputed divisions).
  struct Arguments {
    void const* tokens;            // [M, K], rows ld_tokens elements apart, inner stride 1
    int64_t ld_tokens;
    void const* weights;           // [E, N, K] or [E, K, N]: the mainloop's layout of the weights says which
    int64_t ld_weights;            // elements between rows of one expert's weights
    int64_t batch_stride_weights;  // elements between experts
    void* d;                       // [M, N], rows ldd elements apart
    int64_t ldd;
    void const* m_sizes;           // [E] int32 or int64, device memory
    bool m_sizes_int64;
    int64_t M;
    int32_t N, K, E;
    int32_t group_m;               // cluster m-blocks per raster group
    int32_t split_k;               // >= 2 with kSplitK, else 1
    bool dynamic_schedule;         // a tile counter in the workspace, else static striding
    void* workspace;               // laid out as workspace_layout says (moe_gemm_workspace.h)
    WorkspaceLayout workspace_layout;
    // kGatherA: row r of A is row gather_rows[r] (< gather_source_rows, not checked) of `tokens`, which then has
    // gather_source_rows rows instead of M.
    int64_t const* gather_rows;    // [M], device memory
    int64_t gather_source_rows;
    // FP8 (ScaleParams): x_scale [M] or [M, x_groups], w_scale [E, N] or [E, ceil(N / 128), ceil(K / 128)],
    // float32, device memory.
    float const* x_scale = nullptr;
    float const* w_scale = nullptr;
    int32_t x_groups = 0;
    // kGateUp: N = 2 I; `d` is gate_up, or null when only the activation is written.
    void* activated = nullptr;     // [M, I], rows ld_activated elements apart
    int64_t ld_activated = 0;
    GatedActivation act = GatedActivation::kSilu;
  };

  // Host code: fills `params` from `args`; fails only when a TMA descriptor cannot be encoded.
  static cudaError_t to_underlying_arguments(Arguments const& args, Params& params) {
    using namespace cute;
    using Mainloop = CollectiveMainloop;
    using Internal = typename Mainloop::InternalElementA;
    static_assert(cute::is_same_v<Internal, typename Mainloop::InternalElementB>);
    // The tokens are (M, K, 1) with K contiguous, the weights (N, K, E) with K or N contiguous (the
    // stride that is the static 1). They are A and B, or B and A when swapped.
    using StrideTokens = cute::conditional_t<kSwapAB, typename Mainloop::StrideB, typename Mainloop::StrideA>;
    using StrideWeights = cute::conditional_t<kSwapAB, typename Mainloop::StrideA, typename Mainloop::StrideB>;
    constexpr bool kWeightsNMajor = cute::is_static<decltype(get<0>(StrideWeights{}))>::value;
    int32_t const M = int32_t(args.M), N = args.N, K = args.K, E = args.E;
    // Gathering, the mainloop's token descriptor (prefetched, never loaded from) covers the source rows.
    int32_t const token_rows = kGatherA ? int32_t(args.gather_source_rows) : M;
    StrideTokens const stride_tokens = make_stride(args.ld_tokens, Int<1>{}, int64_t(0));
    StrideWeights stride_weights;
    if constexpr (kWeightsNMajor) {
      stride_weights = make_stride(Int<1>{}, args.ld_weights, args.batch_stride_weights);
    } else {
      stride_weights = make_stride(args.ld_weights, Int<1>{}, args.batch_stride_weights);
    }
    Tensor tokens = make_tensor(static_cast<Internal const*>(args.tokens),
                                make_layout(make_shape(token_rows, K, int32_t(1)), stride_tokens));
    Tensor weights = make_tensor(static_cast<Internal const*>(args.weights),
                                 make_layout(make_shape(N, K, E), stride_weights));
    auto const operands = [&] {
      if constexpr (kSwapAB) {
        return cute::make_tuple(weights, tokens);
      } else {
        return cute::make_tuple(tokens, weights);
      }
    }();
    auto const& tensor_a = get<0>(operands);
    auto const& tensor_b = get<1>(operands);

    params = Params{};
    params.mainloop = {
        make_tma_copy_A_sm90(typename Mainloop::GmemTiledCopyA{}, tensor_a,
                             typename Mainloop::SmemLayoutA{}(_, _, Int<0>{}), TileShape{}, ClusterShape{}),
        make_tma_copy_B_sm90(typename Mainloop::GmemTiledCopyB{}, tensor_b,
                             typename Mainloop::SmemLayoutB{}(_, _, Int<0>{}), TileShape{}, ClusterShape{}),
        Mainloop::TmaTransactionBytes, Mainloop::TmaTransactionBytesMK, Mainloop::TmaTransactionBytesNK};
    if constexpr (kPartialTokenLoads) {
      params.tma_load_half_tokens = make_tma_copy(SM90_TMA_LOAD{}, tensor_a, SmemLayoutHalfTokens{},
                                                  make_shape(Int<kTileM / 2>{}, Int<kTileK>{}), Int<1>{});
    }
    if constexpr (kGated) {
      int32_t const I = N / 2;
      params.gated.I = I;
      params.gated.act = args.act;
      params.gated.activated = args.activated;
      params.gated.ld_activated = args.ld_activated;
      params.gated.write_pre_activation = args.d != nullptr;
      if (cudaError_t status = detail::encode_ragged<ElementD>(&params.gated.tma_store_activated, args.activated, I,
                                                               args.ld_activated, kEpiN, kStoreRows);
          status != cudaSuccess) {
        return status;
      }
      if constexpr (kConcatenated) {
        params.gated.tma_load_weight_halves = make_tma_copy_B_sm90(
            typename Mainloop::GmemTiledCopyB{},
            WeightHalves::template tensor<kWeightsNMajor>(static_cast<Internal const*>(args.weights), N, K, E,
                                                          args.ld_weights, args.batch_stride_weights),
            typename Mainloop::SmemLayoutB{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
      }
    }
    // (Gated without the pre-activation, D's descriptor views the activation: valid, never stored through.)
    bool const d_is_activated = kGated && args.d == nullptr;
    if (cudaError_t status = detail::encode_ragged<ElementD>(
            &params.tma_store_d, d_is_activated ? args.activated : args.d, d_is_activated ? N / 2 : N,
            d_is_activated ? args.ld_activated : args.ldd, kEpiN, kStoreRows);
        status != cudaSuccess) {
      return status;
    }
    if constexpr (kScales != Fp8Scales::kNone) {
      params.scales = {args.x_scale, args.w_scale, args.x_groups > 0 ? int64_t(args.x_groups) : 1,
                       args.x_groups > 0 ? 1 : 0, (args.K + 127) / 128, (args.N + 127) / 128};
    }
    if constexpr (kGatherA) {
      params.gather = {args.tokens, uint32_t(args.ld_tokens * int64_t(sizeof(typename CollectiveMainloop::InternalElementA))),
                       args.gather_source_rows, args.gather_rows};
      // The token tiles come by cp.async: the stage's barrier expects only the weight tile's bytes.
      params.mainloop.tma_transaction_bytes = Mainloop::TmaTransactionBytesNK;
    }
    params.scheduler.experts = ExpertRows{args.m_sizes, args.m_sizes_int64, E, args.M};
    params.scheduler.tiles_n = (N + kTileN * kClusterN - 1) / (kTileN * kClusterN);  // cluster n-blocks
    params.scheduler.group_m = args.group_m;
    char* const workspace = static_cast<char*>(args.workspace);
    WorkspaceLayout const& layout = args.workspace_layout;
    int const split_k = args.split_k;
    params.tile_counter =
        args.dynamic_schedule ? reinterpret_cast<int*>(workspace + layout.tile_counter_offset) : nullptr;
    params.ptr_d = static_cast<ElementD*>(args.d);
    params.ldd = args.ldd;
    params.N = N;
    params.K = K;
    params.split_k = split_k;
    params.split_k_divmod = cutlass::FastDivmod(split_k);
    int32_t const k_blocks = (K + kTileK - 1) / kTileK;
    params.k_blocks_per_split = k_blocks / split_k;
    params.k_blocks_remainder = k_blocks % split_k;
    params.partial_rows = int32_t(layout.partial_rows);
    params.tile_arrivals = split_k > 1 ? reinterpret_cast<int*>(workspace + layout.arrivals_offset) : nullptr;
    params.partials = split_k > 1 ? reinterpret_cast<float*>(workspace + layout.partials_offset) : nullptr;
    return cudaSuccess;
  }

  CUTLASS_DEVICE void operator()(Params const& params, char* smem_buf) {
    run_sm90_kernel<Sm90MoeGemmKernel>(params, smem_buf);
  }

  // The kernel's body (sm_90a only, see run_sm90_kernel).
  CUTLASS_DEVICE static void run(Params const& params, SharedStorage& shared_storage, WarpRoles const& roles) {
    int const lane_predicate = cute::elect_one_sync();

    if (roles.warp_idx == 0 && lane_predicate) {
      CollectiveMainloop::prefetch_tma_descriptors(params.mainloop);
      cute::prefetch_tma_descriptor(&params.tma_store_d);
      if constexpr (kGated) {
        cute::prefetch_tma_descriptor(&params.gated.tma_store_activated);
        if constexpr (kConcatenated) {
          cute::prefetch_tma_descriptor(params.gated.tma_load_weight_halves.get_tma_descriptor());
        }
      }
    }

    // Pipelines from the TMA warp (producer; gathering, the whole producer warpgroup; blockwise FP8, warps 1-3 too,
    // with the scales) to the two MMA warpgroups (consumers): the stages, and the decoded units (both warpgroups read
    // every unit; gathering or blockwise, warps 1-3 of the producer warpgroup too).
    MainloopPipeline pipeline = make_mainloop_pipeline<MainloopPipeline>(
        shared_storage.pipeline, roles, kNumMmaThreads, params.mainloop.tma_transaction_bytes, LaunchClusterShape{},
        kAssistingWarps,
        kGatherA           ? 1 + cutlass::NumThreadsPerWarpGroup
        : kBlockwiseScales ? 1 + cutlass::NumThreadsPerWarpGroup - cutlass::NumThreadsPerWarp
                           : 1);
    TilePipeline tile_pipeline =
        make_tile_pipeline<TilePipeline>(shared_storage.tile_pipeline, roles, kTileSlotReaders, kAssistingWarps);
    // Barrier init must be visible to every warp, and to the peer CTAs that multicast into this one,
    // before the first wait or copy.
    if constexpr (kClusterSize > 1) {
      if (roles.thread_idx == 0) {
        shared_storage.cluster_units.init(kClusterSize);
      }
      cute::cluster_arrive_relaxed();
      cute::cluster_wait();
    } else {
      __syncthreads();
    }

    run_warp_groups(
        roles, [&] { produce(params, pipeline, tile_pipeline, shared_storage); },
        [&] {
          if constexpr (kGatherA) {
            load_gathered_rows(params, pipeline, tile_pipeline, shared_storage, roles.thread_idx);
          } else if constexpr (kBlockwiseScales) {
            load_block_scales(params, pipeline, tile_pipeline, shared_storage,
                              roles.thread_idx - int(cutlass::NumThreadsPerWarp));
          }
        },
        [&]() __attribute__((always_inline)) {  // a call would split the WGMMA pipeline (ptxas C7510)
          consume(params, pipeline, tile_pipeline, shared_storage, roles.mma_thread_idx,
                  roles.thread_idx - int(cutlass::NumThreadsPerWarpGroup));
        });
  }

 private:
  // The CTA's own tile within the cluster's.
  CUTLASS_DEVICE static MoeWorkTile next_tile(Scheduler& scheduler, int64_t cluster_tile) {
    MoeWorkTile work = scheduler.get_work_tile(cluster_tile);
    if constexpr (kClusterSize > 1) {
      int const rank = int(cute::block_rank_in_cluster());
      work.m_block = work.m_block * kClusterM + rank % kClusterM;
      work.n_block = work.n_block * kClusterN + rank / kClusterM;
    }
    return work;
  }

  CUTLASS_DEVICE static int64_t first_cluster_tile() { return blockIdx.x / kClusterSize; }
  CUTLASS_DEVICE static int64_t num_clusters() { return gridDim.x / kClusterSize; }

  // Work unit `unit` is split unit % split_k of the scheduler's tile unit / split_k.
  CUTLASS_DEVICE static int64_t unit_tile(Params const& params, int64_t unit) {
    if constexpr (!kSplitK) {
      return unit;
    } else {
      return params.split_k_divmod.div(int(unit));
    }
  }

  // The k-blocks are dealt evenly (the host keeps split_k <= k-blocks, so none is empty). Computed
  // after the scheduler's call, so that fewer values live across it in the 40-register producer.
  CUTLASS_DEVICE static KBlockRange k_block_range(Params const& params, int64_t unit, int64_t tile, int32_t k_tiles) {
    if constexpr (!kSplitK) {
      return {0, 0, k_tiles};
    } else {
      int32_t const split = int32_t(unit) - int32_t(tile) * params.split_k;
      return {split, split * params.k_blocks_per_split + min(split, params.k_blocks_remainder),
              params.k_blocks_per_split + (split < params.k_blocks_remainder ? 1 : 0)};
    }
  }

  // TMA warp: for each tile, K-blocks of A (the expert's rows) and of B[e] into the smem stages.
  CUTLASS_DEVICE
  static void produce(Params const& params, MainloopPipeline& pipeline, TilePipeline& tile_pipeline,
                      SharedStorage& shared_storage) {
    using namespace cute;
    Scheduler scheduler(params.scheduler);
    auto const& tma_a = params.mainloop.tma_load_a;
    // Concatenated gate and up rows: each B tile is half a tile of gate rows over the same half of up rows.
    auto const& tma_b = [&]() -> auto const& {
      if constexpr (kConcatenated) {
        return params.gated.tma_load_weight_halves;
      } else {
        return params.mainloop.tma_load_b;
      }
    }();
    int32_t const num_experts = params.scheduler.experts.num_experts;
    // Coordinate tensors of the TMA descriptors: the tokens are (M, K, 1), the weights (N, K, E); A is
    // the tokens and B the weights, or the other way round when swapped.
    auto const tokens_shape = make_shape(int32_t(params.scheduler.experts.rows_total), params.K, 1);
    auto const weights_shape = make_shape(params.N, params.K, num_experts);
    Tensor mA = tma_a.get_tma_tensor(kSwapAB ? weights_shape : tokens_shape);
    Tensor mB = [&] {
      if constexpr (kConcatenated) {
        return tma_b.get_tma_tensor(WeightHalves::shape(params.N, params.K, num_experts));
      } else {
        return tma_b.get_tma_tensor(kSwapAB ? tokens_shape : weights_shape);
      }
    }();
    Tensor sA = make_tensor(make_smem_ptr(shared_storage.tensors.smem_A.data()),
                            typename CollectiveMainloop::SmemLayoutA{});  // (BLK_M, BLK_K, PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_storage.tensors.smem_B.data()),
                            typename CollectiveMainloop::SmemLayoutB{});  // (BLK_N, BLK_K, PIPE)
    int const rank = int(cute::block_rank_in_cluster());
    int const rank_m = rank % kClusterM, rank_n = rank / kClusterM;
    auto cta_tma_a = tma_a.get_slice(rank_n);  // this CTA's 1/kClusterN of each A tile
    auto cta_tma_b = tma_b.get_slice(rank_m);  // and 1/kClusterM of each B tile
    // A goes to the CTAs of the same m rank, B to those of the same n rank.
    uint16_t mcast_mask_a = 0;
    CUTLASS_PRAGMA_UNROLL
    for (int n = 0; n < kClusterN; ++n) {
      mcast_mask_a |= uint16_t(1u << (rank_m + n * kClusterM));
    }
    uint16_t const mcast_mask_b = uint16_t(((1u << kClusterM) - 1) << (rank_n * kClusterM));
    Tensor tAsA = cta_tma_a.partition_D(sA);
    Tensor tBsB = cta_tma_b.partition_D(sB);
    int const k_tiles = (params.K + kTileK - 1) / kTileK;

    // The whole warp walks the tiles (the scheduler is warp-collective); one lane issues the copies.
    bool const is_leader = cute::elect_one_sync();
    int const leader_lane = __ffs(__ballot_sync(0xffffffff, is_leader)) - 1;
    bool const dynamic = params.tile_counter != nullptr;
    bool const claims = dynamic && rank == 0;  // in a cluster, rank 0 takes the units for all (see below)
    PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
    TilePipelineState tile_write = cutlass::make_producer_start_state<TilePipeline>();
    UnitSlotState unit_state;
    for (int64_t unit = first_cluster_tile();;) {
      if constexpr (kClusterSize > 1) {
        if (dynamic) {  // rank 0 took the unit from the counter (an invalid one stops the cluster)
          if (rank == 0) {
            shared_storage.cluster_units.template publish<kClusterSize>(unit_state, unit, is_leader);
          } else {
            unit = shared_storage.cluster_units.receive(unit_state);
          }
          ++unit_state;
        }
      }
      int64_t const tile = unit_tile(params, unit);
      MoeWorkTile work = next_tile(scheduler, tile);
      KBlockRange const k_blocks = work.valid ? k_block_range(params, unit, tile, k_tiles) : KBlockRange{};
      if (!work.valid) {
        work.row_start = scheduler.rows_covered();
      }
      tile_pipeline.producer_acquire(tile_write);
      if (is_leader) {
        shared_storage.tile_slots[tile_write.index()] = DecodedUnit{work, k_blocks, tile};
        tile_pipeline.producer_commit(tile_write);
      }
      ++tile_write;
      if (!work.valid) {
        break;
      }
      // The expert's rows start at an arbitrary row, not a multiple of the tile: offset the
      // coordinates, not the descriptor.
      int32_t const row0 = int32_t(work.row_start) + work.m_block * kTileM;
      auto token_tiles = [&](auto const& m) {  // (kTileM, BLK_K, k)
        return local_tile(domain_offset(make_coord(row0, 0), m(_, _, 0)), make_shape(Int<kTileM>{}, Int<kTileK>{}),
                          make_coord(0, _));
      };
      auto weight_tiles = [&](auto const& m) {  // (kTileN, BLK_K, k)
        return local_tile(m(_, _, work.expert), make_shape(Int<kTileN>{}, Int<kTileK>{}), make_coord(work.n_block, _));
      };
      Tensor gA = [&] {
        if constexpr (kSwapAB) { return weight_tiles(mA); } else { return token_tiles(mA); }
      }();
      Tensor gB = [&] {
        if constexpr (kSwapAB) { return token_tiles(mB); } else { return weight_tiles(mB); }
      }();
      Tensor tAgA = cta_tma_a.partition_S(gA);
      Tensor tBgB = cta_tma_b.partition_S(gB);
      // Token rows of the expert in this CTA's m-block (<= 0 for a 2x1 cluster's CTA past its end).
      int32_t const token_rows = kPartialTokenLoads ? work.rows - work.m_block * kTileM : int32_t(kTileM);
      // The next unit is claimed from the counter as the tile's last k-block is about to be loaded: its
      // round trip then passes while the producer waits for that stage. Not earlier: a CTA claims work only
      // when it is about to start on it, which balances the last wave (claiming at the start of the tile,
      // as the weight gradient does, made Mixtral's 2048-token GEMMs up to 7% slower; one k-block ahead
      // instead of after the last load was 0.7% faster at 16k tokens, docs/design.md).
      int next = 0;
      if constexpr (kGatherA) {
        // Every lane waits for each stage and copies its chunks of the token tile's rows 0-31 (warps 1-3 copy
        // the others, load_gathered_rows); thread 0 arms the barrier with the weight tile's bytes
        // (producer_acquire) and the leader loads it first: one TMA instruction that then runs beside the copies.
        GatheredTile tile(params, work, int(threadIdx.x), shared_storage);
        PipelineState state = write_state;
        for (int k = 0; k < k_blocks.count; ++k) {
          if (is_leader && claims && k == k_blocks.count - 1) {
            next = atomicAdd(params.tile_counter, 1);
          }
          pipeline.producer_acquire(state);
          uint64_t* const barrier = pipeline.producer_get_barrier(state);
          int const k_block = k_blocks.begin + k;
          if (is_leader) {
            copy(tma_b.with(*barrier, mcast_mask_b), tBgB(_, _, _, k_block), tBsB(_, _, _, state.index()));
          }
          tile.load(params, k_block, state.index(), shared_storage, barrier);
          ++state;
        }
        if (is_leader && claims && k_blocks.count == 0) {
          next = atomicAdd(params.tile_counter, 1);
        }
      } else if (is_leader) {
        PipelineState state = write_state;
        for (int k = 0; k < k_blocks.count; ++k) {
          if (claims && k == k_blocks.count - 1) {
            next = atomicAdd(params.tile_counter, 1);
          }
          pipeline.producer_acquire(state);
          auto* barrier = pipeline.producer_get_barrier(state);
          int const k_block = k_blocks.begin + k;
          if (token_rows > kTileM / 2) {
            copy(tma_a.with(*barrier, mcast_mask_a), tAgA(_, _, _, k_block), tAsA(_, _, _, state.index()));
          } else if constexpr (kPartialTokenLoads) {
            load_token_rows(params, token_rows, *barrier, tAgA, tAsA, row0, k_block, state.index(), rank,
                            mcast_mask_a, shared_storage);
          }
          copy(tma_b.with(*barrier, mcast_mask_b), tBgB(_, _, _, k_block), tBsB(_, _, _, state.index()));
          ++state;
        }
        if (claims && k_blocks.count == 0) {
          next = atomicAdd(params.tile_counter, 1);
        }
      }
      write_state.advance(k_blocks.count);
      // In a cluster, rank 0 claims the unit for all (the others receive it at the top of the loop).
      if (dynamic) {
        unit = int64_t(__shfl_sync(0xffffffff, next, leader_lane)) + num_clusters();
      } else {
        unit += num_clusters();
      }
    }
    if constexpr (kClusterSize > 1) {
      if (dynamic && rank == 0) {
        shared_storage.cluster_units.tail(unit_state, is_leader);
      }
    }
    // Do not exit while TMA writes to this CTA's shared memory are still in flight.
    if constexpr (kGatherA) {
      wait_for_copies();
    }
    if (is_leader) {
      pipeline.producer_tail(write_state);
    }
  }

  // The token tile of a k-block whose m-block has at most kTileM / 2 of the expert's rows (see
  // kPartialTokenLoads): its first half, or nothing; the bytes not loaded are completed by hand on every
  // barrier that expects them. Rank 1 of a 1x2 cluster may complete them on rank 0's barrier before rank
  // 0's producer has armed it: the transaction count may run negative until then, as with multicast
  // data that arrives early.
  template <class TensorGA, class TensorSA>
  CUTLASS_DEVICE static void load_token_rows(Params const& params, int32_t token_rows, uint64_t& barrier,
                                             TensorGA const& tAgA, TensorSA const& tAsA, int32_t row0,
                                             int k_block, int stage, int rank, uint16_t mcast_mask_a,
                                             SharedStorage& shared_storage) {
    using namespace cute;
    using cutlass::arch::ClusterTransactionBarrier;
    constexpr uint32_t kHalfBytes = kTokenTileBytes / 2;
    if constexpr (kClusterN == 2) {
      // Rank 0's share of the multicast token tile is its first half: load that, skip rank 1's.
      static_assert(kClusterM == 1);
      if (rank == 0) {
        copy(params.mainloop.tma_load_a.with(barrier, mcast_mask_a), tAgA(_, _, _, k_block), tAsA(_, _, _, stage));
      } else {
        ClusterTransactionBarrier::complete_transaction(&barrier, 0, kHalfBytes);
        ClusterTransactionBarrier::complete_transaction(&barrier, 1, kHalfBytes);
      }
    } else if (token_rows > 0) {
      auto const& tma = params.tma_load_half_tokens;
      Tensor mA = tma.get_tma_tensor(make_shape(int32_t(params.scheduler.experts.rows_total), params.K, 1));
      Tensor gA = local_tile(domain_offset(make_coord(row0, 0), mA(_, _, 0)),
                             make_shape(Int<kTileM / 2>{}, Int<kTileK>{}), make_coord(0, k_block));
      Tensor sA = make_tensor(make_smem_ptr(shared_storage.tensors.smem_A.data() + stage * (kTileM * kTileK)),
                              SmemLayoutHalfTokens{});
      auto cta_tma = tma.get_slice(0);
      copy(tma.with(barrier), cta_tma.partition_S(gA), cta_tma.partition_D(sA));
      ClusterTransactionBarrier::complete_transaction(&barrier, uint32_t(rank), kHalfBytes);
    } else {
      ClusterTransactionBarrier::complete_transaction(&barrier, uint32_t(rank), kTokenTileBytes);
    }
  }

  // kGatherA: one producer thread's share of a token tile: 16-byte chunk `lane % 8` of the tile's rows
  // 32 * warp + 4 * i + lane / 8, i = 0..7 (four whole rows per warp instruction). Its copies into a stage arrive
  // on the stage's barrier when they land (cp.async.mbarrier.arrive.noinc: the barrier counts this arrival among
  // the 1 + 128 it expects), so the thread never waits for its own loads and keeps every stage in flight. The
  // consumers fence the proxies after the wait (mma_with_hook's kProxyFence): cp.async writes through the generic
  // proxy, WGMMA reads through the async proxy.
  struct GatheredTile {
    using Element = typename CollectiveMainloop::InternalElementA;
    using SmemLayoutA = typename CollectiveMainloop::SmemLayoutA;
    static_assert(kTokenRowBytes == 128 &&
                      cute::is_same_v<decltype(cute::get_swizzle_portion(SmemLayoutA{})), cute::Swizzle<3, 4, 3>> &&
                      token_rows_are_contiguous<SmemLayoutA, kTileM, kTileK>(),
                  "gathered rows: 128-byte rows under the 128-byte swizzle, one after another in each stage");
    static constexpr int kRowsPerThread = kTileM * 8 / int(cutlass::NumThreadsPerWarpGroup);  // 8
    static constexpr int kRowStep = int(cutlass::NumThreadsPerWarp) / 8;                        // 4
    static constexpr uint32_t kStageBytes = uint32_t(kTileM * kTileK * sizeof(Element));
    static_assert(kRowsPerThread * kRowStep * 4 == kTileM && kStageBytes % 1024 == 0,
                  "four warps of four rows an instruction; every stage at the same phase of the 1024-byte swizzle");
    // What stays the same over the tile's k-blocks, so that a copy costs one multiply-add for its source address
    // besides the copy itself: deriving every address from the row index each k-block kept the producer too busy to
    // refill a freed stage in time (docs/design.md, "Gathered token rows"). The producer warpgroup has 40 registers
    // a thread.
    uint32_t rows[kRowsPerThread];  // source rows, 0 where nothing is read
    uint32_t reads;                 // bit i: row i is read (in the expert, its index in [0, T))
    uint32_t smem_offset[2];        // the chunk's place in the stage, swizzled, in the thread's rows of even / odd i
    uint32_t column_bytes;          // the chunk's first byte within a k-block of the row

    // The source row of an index outside [0, T) is not read: the row is zero-filled, as TMA's bounds check did.
    // Such an index is the caller's bug all the same (the PyTorch path raises for it); the kernel does not report it.
    // The swizzle: TMA's 128-byte swizzle XORs the 16-byte chunk index (address bits 4-6) with address bits 7-9,
    // i.e. with (the stage's 128-byte line + the row) mod 8. Every stage starts at the same phase of it (stages are
    // multiples of 1024 bytes), and rows 4i apart differ by 4 (i odd) or 0 (i even) mod 8: two offsets serve all
    // eight rows. E.g. lane 9 of warp 0 (row 1, chunk 1) with the stages 1024-aligned: rows 1, 9, 17, ... put it at
    // chunk 1 ^ 1 = 0, rows 5, 13, 21, ... at chunk 1 ^ 5 = 4.
    CUTLASS_DEVICE GatheredTile(Params const& params, MoeWorkTile const& work, int producer_thread,
                                SharedStorage& shared_storage) {
      int const lane = producer_thread % cutlass::NumThreadsPerWarp;
      int const first_row = (producer_thread / cutlass::NumThreadsPerWarp) * 32 + lane / 8;
      uint32_t const chunk = uint32_t(lane % 8);
      column_bytes = chunk * 16;
      uint32_t const phase = (cute::cast_smem_ptr_to_uint(shared_storage.tensors.smem_A.data()) >> 7) + first_row;
      CUTLASS_PRAGMA_UNROLL
      for (int odd = 0; odd < 2; ++odd) {
        smem_offset[odd] = uint32_t(first_row + odd * kRowStep) * kTokenRowBytes +
                           ((chunk ^ ((phase + uint32_t(odd * kRowStep)) & 7u)) << 4);
      }
      int32_t const rows_in_tile = work.rows - work.m_block * kTileM;
      int64_t const first = work.row_start + int64_t(work.m_block) * kTileM;
      reads = 0;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) {
        int const tile_row = first_row + i * kRowStep;
        int64_t const source = tile_row < rows_in_tile ? params.gather.rows[first + tile_row] : -1;
        bool const valid = source >= 0 && source < params.gather.source_rows;
        rows[i] = valid ? uint32_t(source) : 0u;
        reads |= uint32_t(valid) << i;
      }
    }

    // k-block `k_block` of the thread's chunks into stage `stage`, and their arrival on its barrier.
    CUTLASS_DEVICE void load(Params const& params, int k_block, int stage, SharedStorage& shared_storage,
                             uint64_t* barrier) {
      uint32_t const stage_base =
          cute::cast_smem_ptr_to_uint(shared_storage.tensors.smem_A.data()) + uint32_t(stage) * kStageBytes;
      int32_t const col = k_block * kTileK + int32_t(column_bytes / sizeof(Element));
      uint32_t const mask = col < params.K ? reads : 0u;
      char const* const k_block_start = static_cast<char const*>(params.gather.tokens) +
                                        int64_t(k_block) * kTokenRowBytes + column_bytes;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) {
        uint32_t const address = stage_base + smem_offset[i % 2] + uint32_t((i / 2) * 2 * kRowStep) * kTokenRowBytes;
        char const* const source = k_block_start + uint64_t(rows[i]) * params.gather.row_bytes;
        copy_16_bytes_or_zeros(address, source, (mask >> i) & 1u);
      }
      arrive_when_copies_land(barrier);
    }

  };

  // kGatherA, the producer warpgroup's warps 1-3: their share of every token tile (GatheredTile), following the
  // units that warp 0 decodes, into the stages that thread 0 arms (produce()).
  CUTLASS_DEVICE static void load_gathered_rows(Params const& params, MainloopPipeline& pipeline,
                                                TilePipeline& tile_pipeline, SharedStorage& shared_storage,
                                                int producer_thread) {
    TilePipelineState tile_read;
    PipelineState state = cutlass::make_producer_start_state<MainloopPipeline>();
    while (true) {
      DecodedUnit const unit = take_tile_slot(tile_pipeline, tile_read, shared_storage.tile_slots);
      if (!unit.work.valid) {
        wait_for_copies();
        return;
      }
      GatheredTile tile(params, unit.work, producer_thread, shared_storage);
      for (int k = 0; k < unit.k_blocks.count; ++k) {
        pipeline.producer_acquire(state);  // waits: thread 0 alone arms the barrier
        tile.load(params, unit.k_blocks.begin + k, state.index(), shared_storage, pipeline.producer_get_barrier(state));
        ++state;
      }
    }
  }

  // kBlockwiseScales, the producer warpgroup's warps 1-3 (thread 0-95): the scales of every k-block of every tile
  // into its stage, following the units that warp 0 decodes: x_scale of tile row `thread` (and of row 96 + thread
  // for threads 0-31; rows past the expert's read its last row's), and thread b < kWeightBlocks the tile's b-th
  // weight block's, at [kTileM + b]. Each thread's copies arrive on the stage's barrier when they land (the barrier
  // expects 1 + 96).
  CUTLASS_DEVICE static void load_block_scales(Params const& params, MainloopPipeline& pipeline,
                                               TilePipeline& tile_pipeline, SharedStorage& shared_storage,
                                               int thread) {
    constexpr int kThreads = int(cutlass::NumThreadsPerWarpGroup - cutlass::NumThreadsPerWarp);
    TilePipelineState tile_read;
    PipelineState state = cutlass::make_producer_start_state<MainloopPipeline>();
    uint32_t const smem = cute::cast_smem_ptr_to_uint(&shared_storage.block_scales.scales[0][0]);
    bool const second = thread + kThreads < kTileM;
    while (true) {
      DecodedUnit const unit = take_tile_slot(tile_pipeline, tile_read, shared_storage.tile_slots);
      if (!unit.work.valid) {
        wait_for_copies();
        return;
      }
      MoeWorkTile const& work = unit.work;
      int64_t const row0 = work.row_start + int64_t(work.m_block) * kTileM;
      int32_t const last = work.rows - work.m_block * kTileM - 1;
      float const* const x0 = params.scales.x_scale + (row0 + cute::min(thread, last)) * params.scales.x_row_stride;
      float const* const x1 =
          params.scales.x_scale + (row0 + cute::min(thread + kThreads, last)) * params.scales.x_row_stride;
      // The tile's weight blocks: n_block's, or 2 n_block's and the next's (the first again past N: those columns are
      // zero and never stored).
      int32_t const first_block = kWeightBlocks * work.n_block;
      float const* const w = params.scales.w_scale +
                             (int64_t(work.expert) * params.scales.n_groups + first_block) * params.scales.k_groups;
      int32_t const w_second = first_block + 1 < params.scales.n_groups ? params.scales.k_groups : 0;
      for (int k = 0; k < unit.k_blocks.count; ++k) {
        pipeline.producer_acquire(state);  // waits: thread 0 of warp 0 alone arms the barrier
        int const k_block = unit.k_blocks.begin + k;
        uint32_t const stage = smem + uint32_t(state.index() * kStageScales) * 4u;
        copy_4_bytes(stage + uint32_t(thread) * 4u, x0 + k_block * params.scales.x_k_stride);
        if (second) {
          copy_4_bytes(stage + uint32_t(thread + kThreads) * 4u, x1 + k_block * params.scales.x_k_stride);
        }
        if (thread < kWeightBlocks) {
          copy_4_bytes(stage + uint32_t(kTileM + thread) * 4u, w + (thread == 0 ? 0 : w_second) + k_block);
        }
        arrive_when_copies_land(pipeline.producer_get_barrier(state));
        ++state;
      }
    }
  }

  // MMA warpgroups: accumulate a tile, then store it with the expert's row predicate.
  CUTLASS_DEVICE
  static void consume(Params const& params, MainloopPipeline& pipeline, TilePipeline& tile_pipeline,
                      SharedStorage& shared_storage, int mma_thread_idx, int consumer_thread_idx) {
    using namespace cute;
    CollectiveMainloop collective_mainloop;
    TiledMma tiled_mma;
    PipelineState read_state;
    int store_count = 0;  // TMA-store chunks issued: picks the epilogue buffer
    Tensor sD = make_tensor(make_smem_ptr(shared_storage.smem_d.data()), SmemLayoutD{});  // (BLK_M, EPI_N, BUF)
    // Each consumer warpgroup stores its own rows, behind its own barrier (sm90_moe_epilogue.hpp).
    cutlass::arch::NamedBarrier const epilogue_barrier(cutlass::NumThreadsPerWarpGroup,
                                                       uint32_t(consumer_thread_idx) / cutlass::NumThreadsPerWarpGroup);

    using Accumulators = decltype(partition_fragment_C(tiled_mma, take<0, 2>(TileShape{})));
    // kDeferStore: the finished tile waits in registers, packed to 16 bits, and is stored a chunk per
    // k-block under the next tile's MMAs (sm90_moe_mainloop.hpp). Every path through a tile below stores
    // what is pending before the tile's own output becomes pending.
    // kGateUp: the tile's activation, held until its chunks are stored (the pre-activation goes at once).
    cute::conditional_t<kGated,
                        PendingGatedTile<kGateUp, kTileN, kEpiN, kEpiBuffers, ElementD, Accumulators, StoreTarget>,
                        MaybePendingTile<kDeferStore, kTileN, kEpiN, kEpiBuffers, ElementD, Accumulators, StoreTarget>>
        pending;
    auto const store_pending = [&](int first_chunk, int last_chunk) __attribute__((always_inline)) {
      pending.store(first_chunk, last_chunk, sD, tiled_mma, mma_thread_idx, epilogue_barrier, store_count,
                    [&](StoreTarget const& target) {
                      if constexpr (kGated) {
                        return issue_gated_store<true>(params, target);
                      } else {
                        return issue_store(params, target);
                      }
                    });
    };

    TilePipelineState tile_read;
    int64_t rows_covered = 0;
    while (true) {
      DecodedUnit const unit = take_tile_slot(tile_pipeline, tile_read, shared_storage.tile_slots);
      MoeWorkTile const& work = unit.work;
      KBlockRange const& k_blocks = unit.k_blocks;
      if (!work.valid) {
        rows_covered = work.row_start;
        break;
      }
      Accumulators accumulators = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));
      if (idle_warp_group(work, mma_thread_idx)) {
        // Its rows are past the expert: the epilogues below store none of them.
        release_stages(pipeline, read_state, k_blocks.count);
        read_state.advance(k_blocks.count);
        clear(accumulators);
        store_pending(0, kPendingSteps);
      } else {
        if constexpr (kBlockwiseScales && kWeightBlocks == 2) {
          mma_blockwise_halves<CollectiveMainloop>(pipeline, read_state, accumulators, k_blocks.count,
                                                   mma_thread_idx, shared_storage.tensors,
                                                   StageScalesOf(shared_storage, tiled_mma, mma_thread_idx));
        } else if constexpr (kBlockwiseScales) {
          mma_blockwise<CollectiveMainloop>(pipeline, read_state, accumulators, k_blocks.count, mma_thread_idx,
                                            shared_storage.tensors,
                                            StageScalesOf(shared_storage, tiled_mma, mma_thread_idx));
        } else if constexpr (kDeferStore) {
          mma_with_hook<kPendingSteps, CollectiveMainloop, kGatherA>(pipeline, read_state, accumulators,
                                                                     k_blocks.count, mma_thread_idx,
                                                                     shared_storage.tensors,
                                                                     [&](int k) { store_pending(k, k + 1); });
          store_pending(k_blocks.count, kPendingSteps);  // the chunks fewer k-blocks than chunks left over
        } else if constexpr (kGatherA) {  // CUTLASS's mma() has no proxy fence for stages written by cp.async
          mma_with_hook<0, CollectiveMainloop, true>(pipeline, read_state, accumulators, k_blocks.count,
                                                     mma_thread_idx, shared_storage.tensors, [](int) {});
        } else {
          collective_mainloop.mma(pipeline, read_state, accumulators, k_blocks.count, mma_thread_idx,
                                  shared_storage.tensors, params.mainloop);
          collective_mainloop.mma_tail(pipeline, read_state, k_blocks.count);
        }
        read_state.advance(k_blocks.count);
      }
      if constexpr (kSplitK) {
        store_split_and_reduce(params, work, unit.tile, k_blocks.split, accumulators, tiled_mma, mma_thread_idx,
                               shared_storage);
      } else if constexpr (kSwapAB && kRowwiseScales) {
        store_tile_transposed<TileShape>(output_tile(params, work), accumulators, tiled_mma, mma_thread_idx,
                                         TileRowwiseScaleOf(params, work));
      } else if constexpr (kSwapAB) {
        store_tile_transposed<TileShape>(output_tile(params, work), accumulators, tiled_mma, mma_thread_idx);
      } else if (work.m_block * kTileM < work.rows && work.n_block * kTileN < params.N &&
                 !idle_warp_group(work, mma_thread_idx)) {
        // (In a cluster, a CTA past the expert's last m-block or past N loads its share of the peers'
        // tiles, but has no output; nor has a warpgroup whose rows are all past the expert.)
        StoreTarget const target{int32_t(work.row_start) + work.m_block * kTileM, work.rows - work.m_block * kTileM,
                                 work.n_block * kTileN, true};
        if constexpr (kRowwiseScales) {
          // Scaled while packed, so that the accumulators and the held tile's registers are not all live with the
          // scales (scaling the accumulators first spilled 304 bytes at 128x256); a tile of too few k-blocks to
          // hide its stores under the next one's MMAs is stored at once.
          pending.hold(accumulators, target, RowwiseScaleOf(params, work, tiled_mma, mma_thread_idx));
          if (k_blocks.count < kChunks) {
            store_pending(0, kChunks);
          }
        } else if constexpr (kGated) {
          pending.hold(accumulators, target, params.gated.write_pre_activation, params.gated.act, sD, tiled_mma,
                       mma_thread_idx, epilogue_barrier, store_count,
                       [&](StoreTarget const& target) { return issue_gated_store<false>(params, target); });
        } else if (kDeferStore && k_blocks.count >= kChunks) {
          pending.hold(accumulators, target);
        } else {
          // Not deferred, or too few k-blocks to cover the stores under the next tile's MMAs (deferring
          // such tiles too looked slower in the weight gradient; docs/design.md).
          store_tile_tma(params, target, accumulators, tiled_mma, mma_thread_idx, sD, epilogue_barrier,
                         store_count);
        }
      }
    }
    store_pending(0, kPendingSteps);
    zero_uncovered_rows(params, rows_covered, consumer_thread_idx);
    // Shared memory must outlive the TMA stores that read it (each warpgroup's leader issued its own).
    if (mma_thread_idx % cutlass::NumThreadsPerWarpGroup == 0) {
      tma_store_wait<0>();
    }
  }

  // FP8: the rows of A (global indices) of this thread's accumulators, row half h, clamped into the expert (rows
  // past it read its last row's scale; they are not stored), and the thread's first column of the tile.
  struct ThreadRows {
    int64_t row[2];
    int32_t col;
    CUTLASS_DEVICE ThreadRows(MoeWorkTile const& work, TiledMma const& tiled_mma, int mma_thread_idx) {
      using namespace cute;
      static_assert(kTileM / kRowsPerWarpGroup<TiledMma, kTileM> == 2 && kRowsPerWarpGroup<TiledMma, kTileM> == 64,
                    "one 64-row block per warpgroup: two rows per thread");
      Tensor coords =
          tiled_mma.get_thread_slice(mma_thread_idx).partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
      int64_t const row0 = work.row_start + int64_t(work.m_block) * kTileM;
      int32_t const last_row = work.rows - work.m_block * kTileM - 1;
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        row[h] = row0 + cute::min(int32_t(get<0>(coords(2 * h))), last_row);
      }
      col = int32_t(get<1>(coords(0)));
    }
  };

  // kRowwiseScales, as pack_tile's scale: the factor of accumulator (pair element c, row half h, column group g) of
  // row block m (one 64-row block per warpgroup here).
  struct RowwiseScaleOf {
    float row_scale[2];
    float const* w_scale;  // the expert's, at this thread's first column
    int32_t last_col;      // columns from w_scale on that exist (clamped: those past N are not stored)
    CUTLASS_DEVICE RowwiseScaleOf(Params const& params, MoeWorkTile const& work, TiledMma const& tiled_mma,
                                  int mma_thread_idx) {
      ThreadRows const rows(work, tiled_mma, mma_thread_idx);
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        row_scale[h] = __ldg(params.scales.x_scale + rows.row[h]);
      }
      int32_t const col = work.n_block * kTileN + rows.col;
      w_scale = params.scales.w_scale + int64_t(work.expert) * params.N + col;
      last_col = params.N - 1 - col;
    }
    CUTLASS_DEVICE float operator()(int h, int group, int c, int) const {  // row block 0: ThreadRows' assert
      return row_scale[h] * __ldg(w_scale + cute::min(8 * group + c, last_col));
    }
  };

  // kRowwiseScales on the swapped decode tiles, store_tile_transposed's scale: x_scale[row] * w_scale[expert, col]
  // of the tile's row and column, the factor RowwiseScaleOf gives the other tiles.
  struct TileRowwiseScaleOf {
    float const* x_scale;  // at the tile's first row
    float const* w_scale;  // the expert's, at the tile's first column
    CUTLASS_DEVICE TileRowwiseScaleOf(Params const& params, MoeWorkTile const& work)
        : x_scale(params.scales.x_scale + work.row_start + int64_t(work.m_block) * kTileM),
          w_scale(params.scales.w_scale + int64_t(work.expert) * params.N + work.n_block * kTileN) {}
    CUTLASS_DEVICE float operator()(int row, int col) const { return __ldg(x_scale + row) * __ldg(w_scale + col); }
  };

  // kBlockwiseScales, the scales of mma_blockwise and mma_blockwise_halves: load(stage) gives the BlockScales of the
  // k-block in `stage`, which load_block_scales put there: x_scale of this thread's two tile rows and the weight
  // blocks' scales. Called once the stage's barrier has been waited for: the compiler barrier keeps the reads after
  // that wait (its asm does not tell the compiler it touches memory).
  struct StageScalesOf {
    float const* scales;  // block_scales.scales[0]
    int rows[2];          // this thread's rows of the tile
    CUTLASS_DEVICE StageScalesOf(SharedStorage& shared_storage, TiledMma const& tiled_mma, int mma_thread_idx)
        : scales(&shared_storage.block_scales.scales[0][0]) {
      using namespace cute;
      Tensor coords =
          tiled_mma.get_thread_slice(mma_thread_idx).partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        rows[h] = int(get<0>(coords(2 * h)));
      }
    }
    CUTLASS_DEVICE BlockScales load(int stage) const {
      asm volatile("" ::: "memory");
      float const* const s = scales + stage * kStageScales;
      return {{s[rows[0]], s[rows[1]]}, {s[kTileM], s[kTileM + kWeightBlocks - 1]}};
    }
  };

  // Cooperative tiles: warpgroup w multiplies rows [64 w, 64 w + 64) of the tile. When none of them
  // belongs to the expert (its last m-block has at most 64 rows, or a cluster CTA is past it), the
  // warpgroup skips the MMAs (it only frees the stages) and the epilogue: the other one then has the
  // tensor cores to itself, and an expert's tail of <= 64 rows costs half a tile instead of a whole one.
  CUTLASS_DEVICE static bool idle_warp_group(MoeWorkTile const& work, int mma_thread_idx) {
    if constexpr (kSwapAB) {
      return false;  // the rows are the MMA's N
    } else {
      using namespace cute;
      static_assert(size<1>(typename TiledMma::ThrLayoutVMNK{}) == 2 &&
                        size<2>(typename TiledMma::ThrLayoutVMNK{}) == 1 &&
                        size<0>(typename TiledMma::AtomShape_MNK{}) * 2 == kTileM,
                    "cooperative tiles are split in two along M, one half per warpgroup");
      int const rows_in_tile = work.rows - work.m_block * kTileM;
      int const first_row = mma_thread_idx / int(cutlass::NumThreadsPerWarpGroup) * (kTileM / 2);
      return rows_in_tile <= first_row;
    }
  }

  // The skipping warpgroup's side of the mainloop: wait for each stage, then free it. Its release
  // counts as one of the two the producer waits for, so the stage is refilled only once the
  // multiplying warpgroup has freed it as well.
  CUTLASS_DEVICE static void release_stages(MainloopPipeline& pipeline, PipelineState state, int k_tile_count) {
    for (int k = 0; k < k_tile_count; ++k) {
      pipeline.consumer_wait(state);
      pipeline.consumer_release(state);
      ++state;
    }
  }

  // Where a tile goes: its first row of D, the expert's rows from there on (at least 1) and its first
  // column; `active` when the warpgroup has rows of it to store.
  struct StoreTarget {
    int32_t tile_row0;
    int32_t tile_rows;
    int32_t col0;
    bool active;
  };

  // The epilogue's issue_store for a tile: the warpgroup's box of chunk `chunk` through the ragged
  // descriptor, which drops the rows at or past the expert's end (TMA's bounds check the columns past N).
  CUTLASS_DEVICE static auto issue_store(Params const& params, StoreTarget const& target) {
    return [&params, target](int chunk, auto* smem_box, int row_offset) {
      // Ragged coordinates (sm90_ragged_tma.hpp) of the box at row0, for a group that ends rows_here rows
      // later (at most the box: rows further on are inside its reach either way). Warpgroups with no rows
      // store nothing, so rows_here >= 1.
      int32_t const wrap = kRaggedWindow;  // a register: the copies take their coordinates by reference
      int32_t const rows_here = min(kStoreRows, target.tile_rows - row_offset);
      int32_t const window_row = kRaggedWindow - rows_here;
      int32_t const row_end = target.tile_row0 + row_offset + rows_here;
      int32_t const col = target.col0 + chunk * kEpiN;
      cute::SM90_TMA_STORE_4D::copy(&params.tma_store_d, smem_box, col, window_row, row_end, wrap);
      cute::tma_store_arrive();
    };
  }

  // kGateUp: the issue_store of a held tile's chunk of the pre-activation (kActivated false) or of the activation.
  // A pre-activation chunk of concatenated halves goes to gate_up's gate columns (the tile's first half) or up
  // columns (I further on); the gate half never crosses column I, a multiple of kTileN / 2.
  template <bool kActivated>
  CUTLASS_DEVICE static auto issue_gated_store(Params const& params, StoreTarget const& target) {
    return [&params, target](int chunk, auto* smem_box, int row_offset) {
      int32_t const wrap = kRaggedWindow;  // a register: the copies take their coordinates by reference
      int32_t const rows_here = min(kStoreRows, target.tile_rows - row_offset);
      int32_t const window_row = kRaggedWindow - rows_here;
      int32_t const row_end = target.tile_row0 + row_offset + rows_here;
      int32_t const half_col0 = target.col0 / 2;  // the n-block's first column of [M, I]
      if constexpr (kActivated) {
        int32_t const col = half_col0 + chunk * kEpiN;
        cute::SM90_TMA_STORE_4D::copy(&params.gated.tma_store_activated, smem_box, col, window_row, row_end, wrap);
      } else {
        constexpr int kHalfChunks = kChunks / 2;
        int32_t const col = kConcatenated ? (chunk >= kHalfChunks ? params.gated.I : 0) + half_col0 +
                                                (chunk % kHalfChunks) * kEpiN
                                          : target.col0 + chunk * kEpiN;
        cute::SM90_TMA_STORE_4D::copy(&params.tma_store_d, smem_box, col, window_row, row_end, wrap);
      }
      cute::tma_store_arrive();
    };
  }

  // Registers -> swizzled shared memory -> TMA store, 64 columns at a time, each warpgroup its own rows
  // (kStoreRows). Each of the kEpiBuffers buffers is reused only after the store issued from it kEpiBuffers chunks
  // ago has read it.
  template <class Accumulators, class SmemTensorD>
  CUTLASS_DEVICE static void store_tile_tma(Params const& params, StoreTarget const& target,
                                            Accumulators const& accumulators, TiledMma const& tiled_mma,
                                            int mma_thread_idx, SmemTensorD const& sD,
                                            cutlass::arch::NamedBarrier const& epilogue_barrier, int& store_count) {
    store_tile_through_smem<kTileN, kEpiN, kEpiBuffers>(sD, accumulators, tiled_mma, mma_thread_idx,
                                                        epilogue_barrier, store_count, issue_store(params, target));
  }

  // The valid part of a tile of D: from its first element, the expert's rows and the columns before N.
  CUTLASS_DEVICE static OutputTile<ElementD> output_tile(Params const& params, MoeWorkTile const& work) {
    int32_t const col0 = work.n_block * kTileN;
    return {params.ptr_d + (work.row_start + int64_t(work.m_block) * kTileM) * params.ldd + col0, params.ldd,
            min(kTileM, work.rows - work.m_block * kTileM), min(kTileN, params.N - col0)};
  }

  // Split-K: the unit's fp32 partial tile into the workspace, and the reduction by the tile's last unit
  // (sm90_moe_epilogue.hpp).
  template <class Accumulators>
  CUTLASS_DEVICE static void store_split_and_reduce(Params const& params, MoeWorkTile const& work,
                                                    int64_t tile, int32_t split, Accumulators const& accumulators,
                                                    TiledMma const& tiled_mma, int mma_thread_idx,
                                                    SharedStorage& shared_storage) {
    int64_t const split_stride = int64_t(params.partial_rows) * kTileN;
    SplitKPartials const partials{params.partials + tile * params.split_k * split_stride, split_stride, split,
                                  params.split_k, params.tile_arrivals + tile};
    reduce_split_k_tile<kSwapAB, kTileN, TileShape>(output_tile(params, work), partials, accumulators, tiled_mma,
                                                    mma_thread_idx, shared_storage.split_k_last_arrival);
  }

  // Rows [rows_covered, M) belong to no expert.
  // kGateUp: of the activation, and of the pre-activation when it is written.
  CUTLASS_DEVICE static void zero_uncovered_rows(Params const& params, int64_t rows_covered, int consumer_thread_idx) {
    if constexpr (kGated) {
      zero_rows<kNumConsumerThreads>(static_cast<ElementD*>(params.gated.activated), params.gated.ld_activated,
                                     params.gated.I, rows_covered, params.scheduler.experts.rows_total,
                                     consumer_thread_idx);
      if (!params.gated.write_pre_activation) {
        return;
      }
    }
    zero_rows<kNumConsumerThreads>(params.ptr_d, params.ldd, params.N, rows_covered,
                                   params.scheduler.experts.rows_total, consumer_thread_idx);
  }
};

}  // namespace moe_gemm
