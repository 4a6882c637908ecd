// The sm90 MoE weight-gradient kernel: a K-grouped GEMM, D[e] (P x Q) = L_e^T @ R_e, whose
// reduction runs over expert e's rows (see GroupedWgradParams in moe_gemm.h). Persistent,
// warp-specialized, cooperative; TMA loads and WGMMA through CUTLASS's sm90 collective mainloop,
// both operands MN-major (P and Q are the contiguous dimensions of L and R).
//
// What is MoE-specific here (the rest is CUTLASS):
//   - tiles: every expert has the same ceil(P / 128) x ceil(Q / 256) output tiles, so the tile -> expert
//     map is a division; the expert's first row and row count (the reduction range) come from a
//     prefix sum of m_sizes computed on the fly (all sizes loaded at once, a warp-wide scan), cached
//     (sm90_moe_wgrad_tile_scheduler.hpp).
//     Tiles are handed out from a global counter (ragged experts take unequal times). The TMA warp
//     decodes each tile and hands it to the MMA warpgroups through shared memory, so that they go from
//     one tile's MMAs to the next without a decode in between (2-3% faster at 2048 and 16k tokens).
//   - the reduction range ends inside a k-block: rows past the expert's end must load as zeros.
//     Each operand has one ragged TMA descriptor (sm90_ragged_tma.hpp). A k-block of expert
//     [r0, r1) is loaded at (col, W - (r1 - r0) + 64 kb, r1, W): element j lands on row
//     r0 + 64 kb + j, and TMA's bounds check on the window dimension (coordinate < W) zero-fills
//     exactly the rows at or past r1. No per-expert descriptor, no masking in shared memory.
//   - the epilogue: registers -> swizzled shared memory -> TMA store of 128 B-wide column chunks, each
//     warpgroup its 64 rows, into a 3-D (Q, P, E) descriptor that clips at the P and Q edges (16-bit
//     tiles of 4 or more k-blocks under the next tile's MMAs, sm90_moe_mainloop.hpp); when
//     accumulating, a TMA reduce-add (D += tile) instead, so a float32 main-grad buffer is updated
//     without reading it.
//   - gathered reduction rows (kGatherL or kGatherR, separate instantiations): row i of L (or R) is row
//     gather_rows[i] of a source tensor, so that the MoE layer's weight gradients read hidden[token_of_row] and
//     grad_out[token_of_row] in place. The producer warpgroup's 128 threads copy the gathered operand's
//     k-block with cp.async, eight threads per 128-byte run of a row, into the 128-byte swizzle TMA would have
//     written (GatheredReductionRows); rows past the expert's end are zero-filled. Without either none of it is
//     compiled in.
#pragma once

#include <algorithm>

#include <cuda.h>

#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/atom/mma_traits_sm90_gmma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"
#include "cutlass/cutlass.h"
#include "cutlass/fast_math.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/pipeline/pipeline.hpp"

#include "sm90_moe_epilogue.hpp"
#include "sm90_moe_mainloop.hpp"
#include "sm90_moe_wgrad_tile_scheduler.hpp"
#include "sm90_ragged_tma.hpp"

namespace moe_gemm {

// Shared memory of the epilogue: two buffers of kTileP rows x 128 bytes.
constexpr int wgrad_epilogue_smem_bytes(int tile_p) { return 2 * tile_p * 128; }

// kGatherL / kGatherR: where the gathered operand's rows come from. The operand tiles are MN-major: in a stage,
// reduction row j of the 64 columns [64 b, 64 b + 64) is one run of 128 bytes at element (b * kTileK + j) * 64,
// before the swizzle (reduction_runs_are_contiguous below checks it). Each run is copied as eight 16-byte cp.async,
// each to where TMA's 128-byte swizzle (bits 4-6 of the shared-memory address XOR bits 7-9) would have put it, as
// the forward kernel's gathered token rows are (GatheredTokenRows in sm90_moe_gemm_kernel.hpp, which says why not
// one-row TMA boxes).
template <bool kEnabled>
struct GatheredReductionRows {
  void const* source;   // [T, cols], rows row_bytes apart (less than 4 GiB: moe_wgrad.cpp checks)
  uint32_t row_bytes;
  int64_t source_rows;  // T
  int64_t const* rows;  // [M]: reduction row i of the operand is row rows[i] of the source
  int32_t cols;         // the source's width: P for L, Q for R
};
template <>
struct GatheredReductionRows<false> {};

// Whether, in stage 1 of an MN-major operand layout (cols, kRows reduction rows, stages), every run of kBoxCols
// columns of one reduction row is the kBoxCols elements at kCols * kRows + (b * kRows + j) * kBoxCols, before
// the swizzle: then a one-row box has its own 128 bytes, at that address. (A few columns of every run; the
// layout is affine within a stage.)
template <class SmemLayout, int kCols, int kRows, int kBoxCols>
constexpr bool reduction_runs_are_contiguous() {
  auto const layout = cute::get_nonswizzle_portion(SmemLayout{});
  for (int b = 0; b < kCols / kBoxCols; ++b) {
    for (int j = 0; j < kRows; ++j) {
      for (int c : {0, 1, kBoxCols - 1}) {
        if (layout(b * kBoxCols + c, j, 1) != kCols * kRows + (b * kRows + j) * kBoxCols + c) {
          return false;
        }
      }
    }
  }
  return true;
}

template <class CollectiveMainloop_, class ElementD_, bool kGatherL_ = false, bool kGatherR_ = false>
class Sm90MoeWgradKernel {
 public:
  using CollectiveMainloop = CollectiveMainloop_;
  using ElementD = ElementD_;
  using ElementIn = typename CollectiveMainloop::TiledMma::ValTypeA;
  using TileShape = typename CollectiveMainloop::TileShape;
  using TiledMma = typename CollectiveMainloop::TiledMma;
  using MainloopPipeline = typename CollectiveMainloop::MainloopPipeline;
  using PipelineState = typename CollectiveMainloop::PipelineState;

  static constexpr int kTileP = cute::size<0>(TileShape{});
  static constexpr int kTileQ = cute::size<1>(TileShape{});
  static constexpr int kTileK = cute::size<2>(TileShape{});
  static constexpr uint32_t kNumMmaThreads = cute::size(TiledMma{});
  static constexpr uint32_t MaxThreadsPerBlock = kNumMmaThreads + cutlass::NumThreadsPerWarpGroup;
  static constexpr uint32_t MinBlocksPerMultiprocessor = 1;
  static constexpr int kClusterSize = 1;
  // 128-row blocks of the gradient per raster group (L2 locality).
  static constexpr int32_t kGroupP = 8;
  static_assert(kNumMmaThreads == 256, "cooperative kernel: two consumer warpgroups");

  // The operand tiles in shared memory are 64 x 64 boxes (128-byte swizzled rows of 64 columns,
  // one row per reduction index): the MN-major layout CUTLASS's collective expects, checked here.
  static constexpr int kBoxCols = 64;
  static_assert(kTileK == 64 && kTileP % kBoxCols == 0 && kTileQ % kBoxCols == 0);
  static_assert(cute::is_same_v<typename CollectiveMainloop::SmemLayoutAtomA,
                                cute::GMMA::Layout_MN_SW128_Atom<ElementIn>> &&
                cute::is_same_v<typename CollectiveMainloop::SmemLayoutAtomB,
                                cute::GMMA::Layout_MN_SW128_Atom<ElementIn>>,
                "the loads below assume 128-byte-swizzled MN-major operand tiles");
  static constexpr int kBoxElements = kBoxCols * kTileK;
  static constexpr uint64_t kCacheHint = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);

  // Epilogue chunks of kTileP rows x 128 bytes (64 bf16/fp16 or 32 float columns), double-buffered.
  static constexpr int kEpiN = 128 / int(sizeof(ElementD));
  static constexpr int kEpiBuffers = 2;
  static_assert(kTileQ % kEpiN == 0);
  static constexpr int kStoreRows = kRowsPerWarpGroup<TiledMma, kTileP>;  // of D's TMA store box
  static constexpr int kChunks = kTileQ / kEpiN;
  // 16-bit tiles are stored under the next tile's MMAs (consume()).
  static constexpr bool kDeferStore = sizeof(ElementD) == 2;
  using SmemLayoutD = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<ElementD>{},
      cute::make_shape(cute::Int<kTileP>{}, cute::Int<kEpiN>{}, cute::Int<kEpiBuffers>{})));

  // kGatherL / kGatherR: the gathered operand (L, kTileP wide, or R, kTileQ wide) comes as kGatherRuns runs of
  // 128 bytes per reduction row, kTileK * kGatherRuns per stage (128 or 256), copied by the producer warpgroup's
  // 128 threads (warp 0's lanes in produce(), warps 1-3 in assist_gathered_loads()): thread t copies chunk t % 8
  // of rows t / 8 + 16 i (i = 0..3) of every run, so that a warp instruction copies four whole runs. Rows at or
  // past the expert's end, indices outside the source and columns past its width are zero-filled without a read:
  // the stage then holds exact zeros there whatever an older tile left, which the sums need (a stale row, NaN
  // even, would be multiplied by the other operand's zero-filled row). Thread 0 arms each stage's barrier with
  // the other operand's bytes; each producer thread's copies arrive on it when they land (1 + 128 arrivals).
  static constexpr bool kGatherL = kGatherL_;
  static constexpr bool kGatherR = kGatherR_;
  static constexpr bool kGather = kGatherL || kGatherR;
  static_assert(!(kGatherL && kGatherR), "one gathered operand per kernel");
  static constexpr int kGatherCols = kGatherL ? kTileP : kTileQ;
  static constexpr int kGatherRuns = kGatherCols / kBoxCols;
  static constexpr int kGatherRowStep = int(cutlass::NumThreadsPerWarpGroup) / 8;  // 16 rows at once
  static constexpr int kGatherRowsPerThread = kTileK / kGatherRowStep;              // 4
  static_assert(!kGather || kDeferStore, "gathered rows: consume()'s mma_with_hook fences the proxies");
  using GatherParams = GatheredReductionRows<kGather>;

  static constexpr int kTileSlots = 4;
  using TilePipeline = cutlass::PipelineAsync<kTileSlots>;
  using TilePipelineState = typename TilePipeline::PipelineState;
  // The threads that read the decoded tiles: the MMA warpgroups, and the producer's warps 1-3 when they load rows.
  static constexpr uint32_t kTileSlotReaders =
      kNumMmaThreads + (kGather ? cutlass::NumThreadsPerWarpGroup - cutlass::NumThreadsPerWarp : 0);

  struct SharedStorage {
    typename CollectiveMainloop::TensorStorage tensors;
    alignas(1024) cute::array_aligned<ElementD, cute::cosize_v<SmemLayoutD>, 1024> smem_d;
    alignas(16) typename CollectiveMainloop::PipelineStorage pipeline;
    alignas(16) typename TilePipeline::SharedStorage tile_pipeline;
    WgradWorkTile tile_slots[kTileSlots];  // decoded by the TMA warp
  };
  static constexpr int SharedStorageSize = sizeof(SharedStorage);
  static_assert(SharedStorageSize <= 232448, "more shared memory than an H100 SM has");

  struct Params {
    CUtensorMap tma_l;  // ragged view of L, see the header comment (unused when L is gathered)
    CUtensorMap tma_r;  // ragged view of R (unused when R is gathered)
    CUtensorMap tma_d;  // (Q, P, E) view of D, boxes of kEpiN x kStoreRows
    int32_t P;          // rows of each expert's gradient: a warpgroup whose rows start past them stores nothing
    WgradSchedulerParams scheduler;
    int* tile_counter;  // zeroed before the launch
    bool accumulate;
    GatherParams gather;  // kGatherL / kGatherR only
  };

  // The host's side of a launch, in plain values (see GroupedWgradParams in moe_gemm.h).
  struct Arguments {
    void const* l;  // [M, P], rows ldl elements apart
    int64_t ldl;
    void const* r;  // [M, Q], rows ldr elements apart
    int64_t ldr;
    void* d;        // [E, P, Q], rows ldd elements apart, experts batch_stride_d
    int64_t ldd;
    int64_t batch_stride_d;
    void const* m_sizes;
    bool m_sizes_int64;
    int64_t M, P, Q;
    int32_t E;
    bool accumulate;
    int* tile_counter;  // zeroed before the launch
    // kGatherL (kGatherR): row i of L (R) is row gather_rows[i] (< gather_source_rows, not checked) of `l` (`r`),
    // which then has gather_source_rows rows instead of M.
    int64_t const* gather_rows;  // [M], device memory
    int64_t gather_source_rows;
  };

  // Output tiles of all experts: the most work units of a launch.
  static int64_t num_tiles(Arguments const& args) {
    return ((args.P + kTileP - 1) / kTileP) * ((args.Q + kTileQ - 1) / kTileQ) * args.E;
  }

  // Host code: fills `params` from `args`; fails only when a TMA descriptor cannot be encoded.
  static cudaError_t to_underlying_arguments(Arguments const& args, Params& params) {
    params = Params{};
    cudaError_t status = cudaSuccess;
    if constexpr (!kGatherL) {
      status = detail::encode_ragged<ElementIn>(&params.tma_l, args.l, args.P, args.ldl, kBoxCols, kTileK);
    }
    if (status == cudaSuccess && !kGatherR) {
      status = detail::encode_ragged<ElementIn>(&params.tma_r, args.r, args.Q, args.ldr, kBoxCols, kTileK);
    }
    if constexpr (kGather) {
      params.gather = {kGatherL ? args.l : args.r,
                       uint32_t((kGatherL ? args.ldl : args.ldr) * int64_t(sizeof(ElementIn))), args.gather_source_rows,
                       args.gather_rows, int32_t(kGatherL ? args.P : args.Q)};
    }
    if (status == cudaSuccess) {
      uint64_t const dims[3] = {uint64_t(args.Q), uint64_t(args.P), uint64_t(args.E)};
      uint64_t const strides[3] = {1, uint64_t(args.ldd), uint64_t(args.batch_stride_d)};
      uint32_t const box[3] = {uint32_t(kEpiN), uint32_t(kStoreRows), 1};
      status = detail::encode_tma(&params.tma_d, detail::tma_type<ElementD>(), int(sizeof(ElementD)), args.d, 3, dims,
                                  strides, box);
    }
    if (status != cudaSuccess) {
      return status;
    }
    params.P = int32_t(args.P);
    int32_t const tiles_p = int32_t((args.P + kTileP - 1) / kTileP);
    int32_t const tiles_q = int32_t((args.Q + kTileQ - 1) / kTileQ);
    params.scheduler = WgradSchedulerParams::make(ExpertRows{args.m_sizes, args.m_sizes_int64, args.E, args.M},
                                                  tiles_p, tiles_q, std::min(kGroupP, tiles_p));
    params.tile_counter = args.tile_counter;
    params.accumulate = args.accumulate;
    return cudaSuccess;
  }

  CUTLASS_DEVICE void operator()(Params const& params, char* smem_buf) {
    run_sm90_kernel<Sm90MoeWgradKernel>(params, smem_buf);
  }

  // The kernel's body (sm_90a only, see run_sm90_kernel).
  CUTLASS_DEVICE static void run(Params const& params, SharedStorage& shared_storage, WarpRoles const& roles) {

    if (roles.warp_idx == 0 && cute::elect_one_sync()) {
      if constexpr (!kGatherL) {
        cute::prefetch_tma_descriptor(&params.tma_l);
      }
      if constexpr (!kGatherR) {
        cute::prefetch_tma_descriptor(&params.tma_r);
      }
      cute::prefetch_tma_descriptor(&params.tma_d);
    }

    // Pipelines from the TMA warp (producer; gathering, the whole producer warpgroup) to the two MMA warpgroups
    // (consumers): the stages, and the decoded tiles (gathering, read by warps 1-3 of the producer warpgroup too).
    MainloopPipeline pipeline = make_mainloop_pipeline<MainloopPipeline>(
        shared_storage.pipeline, roles, kNumMmaThreads,
        !kGather ? CollectiveMainloop::TmaTransactionBytes
                 : (kGatherL ? CollectiveMainloop::TmaTransactionBytesNK : CollectiveMainloop::TmaTransactionBytesMK),
        cute::Shape<cute::_1, cute::_1, cute::_1>{}, kGather, kGather ? 1 + cutlass::NumThreadsPerWarpGroup : 1);
    TilePipeline tile_pipeline =
        make_tile_pipeline<TilePipeline>(shared_storage.tile_pipeline, roles, kTileSlotReaders, kGather);
    __syncthreads();

    run_warp_groups(
        roles, [&] { produce(params, pipeline, tile_pipeline, shared_storage); },
        [&] {
          if constexpr (kGather) {
            assist_gathered_loads(params, pipeline, tile_pipeline, shared_storage, roles.thread_idx);
          }
        },
        [&] { consume(params, pipeline, tile_pipeline, shared_storage, roles.mma_thread_idx); });
  }

 private:
  CUTLASS_DEVICE static int k_blocks(WgradWorkTile const& work) { return (work.rows + kTileK - 1) / kTileK; }

  // An empty expert's tile is all zeros; accumulating, it adds nothing and is skipped altogether.
  CUTLASS_DEVICE static bool skipped(Params const& params, WgradWorkTile const& work) {
    return params.accumulate && work.rows == 0;
  }

  // TMA warp: takes tiles from the counter, publishes them to the MMA warpgroups, and loads the
  // k-blocks of the expert's rows of L and R.
  CUTLASS_DEVICE
  static void produce(Params const& params, MainloopPipeline& pipeline, TilePipeline& tile_pipeline,
                      SharedStorage& shared_storage) {
    Sm90MoeWgradScheduler scheduler(params.scheduler);
    bool const is_leader = cute::elect_one_sync();
    PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
    TilePipelineState tile_write = cutlass::make_producer_start_state<TilePipeline>();
    auto* smem_l = shared_storage.tensors.smem_A.data();
    auto* smem_r = shared_storage.tensors.smem_B.data();
    constexpr int kStageL = kTileP * kTileK, kStageR = kTileQ * kTileK;
    for (int32_t tile = blockIdx.x;;) {
      WgradWorkTile const work = scheduler.get_work_tile(tile);
      // The next tile is taken now: the atomic's round trip passes while this tile's loads are issued.
      int next = 0;
      if (threadIdx.x % 32 == 0 && work.valid) {
        next = atomicAdd(params.tile_counter, 1);
      }
      // The MMA warpgroups get the tile decoded (an invalid one tells them to stop).
      tile_pipeline.producer_acquire(tile_write);
      if (is_leader) {
        shared_storage.tile_slots[tile_write.index()] = work;
        tile_pipeline.producer_commit(tile_write);
      }
      ++tile_write;
      if (!work.valid) {
        break;
      }
      int const k_tiles = skipped(params, work) ? 0 : k_blocks(work);
      // Ragged coordinates (see the header comment): window start and base row of the expert.
      int32_t const row_end = int32_t(work.row_start + work.rows);
      int32_t const wrap = kRaggedWindow;  // a register: the copies take their coordinates by reference
      int32_t const window0 = kRaggedWindow - work.rows;
      int32_t const p0 = work.p_block * kTileP, q0 = work.q_block * kTileQ;
      if constexpr (kGather) {
        // Every lane waits for each stage and copies its chunks of the gathered operand (warps 1-3 copy the others,
        // assist_gathered_loads); thread 0 arms the barrier with the other operand's bytes (producer_acquire), which
        // the leader loads through its ragged descriptor.
        load_gathered_k_blocks(params, pipeline, write_state, work, k_tiles, int(threadIdx.x), shared_storage,
                               [&](uint64_t* barrier, int stage, int k) {
                                 if (is_leader) {
                                   int32_t const window_row = window0 + k * kTileK;
                                   if constexpr (kGatherR) {
                                     auto* stage_l = smem_l + stage * kStageL;
                                     CUTLASS_PRAGMA_UNROLL
                                     for (int box = 0; box < kTileP / kBoxCols; ++box) {
                                       cute::SM90_TMA_LOAD_4D::copy(&params.tma_l, barrier, kCacheHint,
                                                                    stage_l + box * kBoxElements, p0 + box * kBoxCols,
                                                                    window_row, row_end, wrap);
                                     }
                                   } else {
                                     auto* stage_r = smem_r + stage * kStageR;
                                     CUTLASS_PRAGMA_UNROLL
                                     for (int box = 0; box < kTileQ / kBoxCols; ++box) {
                                       cute::SM90_TMA_LOAD_4D::copy(&params.tma_r, barrier, kCacheHint,
                                                                    stage_r + box * kBoxElements, q0 + box * kBoxCols,
                                                                    window_row, row_end, wrap);
                                     }
                                   }
                                 }
                               });
      } else if (is_leader) {
        PipelineState state = write_state;
        for (int k = 0; k < k_tiles; ++k) {
          pipeline.producer_acquire(state);
          uint64_t* barrier = pipeline.producer_get_barrier(state);
          int32_t const window_row = window0 + k * kTileK;
          auto* stage_l = smem_l + state.index() * kStageL;
          auto* stage_r = smem_r + state.index() * kStageR;
          CUTLASS_PRAGMA_UNROLL
          for (int box = 0; box < kTileP / kBoxCols; ++box) {
            cute::SM90_TMA_LOAD_4D::copy(&params.tma_l, barrier, kCacheHint, stage_l + box * kBoxElements,
                                         p0 + box * kBoxCols, window_row, row_end, wrap);
          }
          CUTLASS_PRAGMA_UNROLL
          for (int box = 0; box < kTileQ / kBoxCols; ++box) {
            cute::SM90_TMA_LOAD_4D::copy(&params.tma_r, barrier, kCacheHint, stage_r + box * kBoxElements,
                                         q0 + box * kBoxCols, window_row, row_end, wrap);
          }
          ++state;
        }
      }
      write_state.advance(k_tiles);
      tile = __shfl_sync(0xffffffff, next, 0) + int32_t(gridDim.x);
    }
    if constexpr (kGather) {
      wait_for_copies();
    }
    if (is_leader) {
      pipeline.producer_tail(write_state);
    }
  }

  // kGatherL / kGatherR: the index prefetch. Each k-block needs the source rows of its 64 reduction rows, loaded
  // from global memory; loaded one k-block ahead, that load's latency was the producer's critical path and the
  // MMAs waited for the stages (ncu: 72% of warp cycles on L1TEX scoreboard, 0.4-0.5x the copy's speed). So the
  // indices are loaded kIndexPairs pairs of k-blocks ahead (3-4 k-blocks), one per lane: lane l of producer warp w
  // holds the index of slot l % 16 of k-block 2 * pair + l / 16, slot s being reduction row w * 4 + s % 4 +
  // 16 * (s / 4), the 16 rows the warp copies; a thread takes its four rows' indices from their lanes by shuffle.
  // Example: thread 37 (warp 1, lane 5) copies rows 4, 20, 36, 52; for k-block 2 p + 1 it reads them from
  // lanes 16, 20, 24 and 28 of ring[p % kIndexPairs].
  static constexpr int kIndexPairs = 2;

  // The source row of slot (lane % 16) of k-block 2 * pair + lane / 16 of the tile (`rows` reduction rows, `k_tiles`
  // k-blocks), or -1 past its end or for an index outside [0, source_rows).
  CUTLASS_DEVICE static int32_t prefetch_row(int64_t const* indices, int32_t rows, int64_t source_rows, int k_tiles,
                                             int pair, int lane, int slot_row) {
    int const k = 2 * pair + lane / 16;
    int32_t const row = k * kTileK + slot_row;
    int64_t const index = k < k_tiles && row < rows ? indices[row] : int64_t(-1);
    return index >= 0 && index < source_rows ? int32_t(index) : -1;
  }

  // kGatherL / kGatherR: the k-blocks of one tile from stage `state` on, as producer thread `thread` (0-127) takes
  // part in them: it waits for each stage, calls other_loads(barrier, stage, k), which warp 0 uses to load the
  // other operand, copies its chunks of the gathered operand (chunk thread % 8 of reduction rows thread / 8 + 16 i
  // of every run, into their places in the stage: GatheredReductionRows) and has them arrive on the stage's barrier
  // when they land. Rows whose index is outside [0, T) are zero-filled: such an index is the caller's bug all the
  // same (the PyTorch path raises for it); the kernel does not report it, and nothing outside the source is ever
  // read. Every lane of the warpgroup runs the same k-blocks (the shuffles take the whole warp).
  // A copy's shared-memory address is the stage's plus a constant per thread: the swizzle XORs the chunk with
  // (the stage's 128-byte line + run * kTileK + row) mod 8, and stages (multiples of 1024 bytes), runs (kTileK rows)
  // and the 16 rows between a thread's rows are all multiples of 8 lines, so only the thread's first row counts.
  template <class OtherLoads>
  CUTLASS_DEVICE static void load_gathered_k_blocks(Params const& params, MainloopPipeline& pipeline,
                                                    PipelineState state, WgradWorkTile const& work, int k_tiles,
                                                    int thread, SharedStorage& shared_storage,
                                                    OtherLoads&& other_loads) {
    using SmemLayout = cute::conditional_t<kGatherL, typename CollectiveMainloop::SmemLayoutA,
                                           typename CollectiveMainloop::SmemLayoutB>;
    static_assert(kBoxCols * sizeof(ElementIn) == 128 &&
                      cute::is_same_v<decltype(cute::get_swizzle_portion(SmemLayout{})), cute::Swizzle<3, 4, 3>> &&
                      reduction_runs_are_contiguous<SmemLayout, kGatherCols, kTileK, kBoxCols>(),
                  "gathered rows: 128-byte runs under the 128-byte swizzle, at (run * 64 + row) * 64 in each stage");
    static_assert(kGatherRowsPerThread == 4 && kGatherRowStep == 16, "the index slots assume 4 x 16 rows per warp");
    constexpr int kStageElements = kGatherCols * kTileK;
    static_assert(kStageElements * sizeof(ElementIn) % 1024 == 0 && kTileK % 8 == 0,
                  "every stage and run at the same phase of the 1024-byte swizzle");
    auto* smem = kGatherL ? shared_storage.tensors.smem_A.data() : shared_storage.tensors.smem_B.data();
    uint32_t const chunk = uint32_t(thread % 8);
    int const lane = thread % 32;
    int const slot = lane % 16;
    int const slot_row = thread / 32 * 4 + slot % 4 + 16 * (slot / 4);
    uint32_t const first_row = uint32_t(thread / 8);
    uint32_t const phase = (cute::cast_smem_ptr_to_uint(smem) >> 7) + first_row;
    uint32_t const thread_offset = first_row * 128 + ((chunk ^ (phase & 7u)) << 4);
    int32_t const col0 = (kGatherL ? work.p_block * kTileP : work.q_block * kTileQ) + int32_t(chunk) * 8;
    uint32_t runs_in_source = 0;  // bit run: the run's chunk lies within the source's columns
    CUTLASS_PRAGMA_UNROLL
    for (int run = 0; run < kGatherRuns; ++run) {
      runs_in_source |= uint32_t(col0 + run * kBoxCols < params.gather.cols) << run;
    }
    char const* const tile_source =
        static_cast<char const*>(params.gather.source) + int64_t(col0) * int64_t(sizeof(ElementIn));
    int64_t const* indices = params.gather.rows + work.row_start;
    int32_t ring[kIndexPairs];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kIndexPairs; ++j) {
      ring[j] = prefetch_row(indices, work.rows, params.gather.source_rows, k_tiles, j, lane, slot_row);
    }
    for (int pair0 = 0; 2 * pair0 < k_tiles; pair0 += kIndexPairs) {
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kIndexPairs; ++j) {
        CUTLASS_PRAGMA_NO_UNROLL
        for (int half = 0; half < 2; ++half) {
          if (2 * (pair0 + j) + half < k_tiles) {
            pipeline.producer_acquire(state);  // waits; thread 0 alone arms the barrier
            uint64_t* barrier = pipeline.producer_get_barrier(state);
            other_loads(barrier, int(state.index()), 2 * (pair0 + j) + half);  // first: one TMA instruction
            uint32_t const thread_base =
                cute::cast_smem_ptr_to_uint(smem + state.index() * kStageElements) + thread_offset;
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < kGatherRowsPerThread; ++i) {
              int32_t const row = __shfl_sync(0xffffffff, ring[j], half * 16 + lane / 8 + 4 * i);
              char const* const row_source = tile_source + uint64_t(uint32_t(max(row, 0))) * params.gather.row_bytes;
              CUTLASS_PRAGMA_UNROLL
              for (int run = 0; run < kGatherRuns; ++run) {
                uint32_t const address =
                    thread_base + uint32_t((run * kTileK + i * kGatherRowStep) * kBoxCols * int(sizeof(ElementIn)));
                bool const reads = row >= 0 && ((runs_in_source >> run) & 1u);
                copy_16_bytes_or_zeros(address, row_source + run * 128, reads);
              }
            }
            arrive_when_copies_land(barrier);
            ++state;
          }
        }
        ring[j] = prefetch_row(indices, work.rows, params.gather.source_rows, k_tiles, pair0 + j + kIndexPairs, lane,
                               slot_row);
      }
    }
  }

  // kGatherL / kGatherR, the producer warpgroup's warps 1-3: thread `thread_idx` (32 to 127) loads its boxes of
  // every k-block (load_gathered_k_blocks), following the tiles that warp 0 decodes, into the stages that thread 0
  // arms (produce()).
  CUTLASS_DEVICE static void assist_gathered_loads(Params const& params, MainloopPipeline& pipeline,
                                                   TilePipeline& tile_pipeline, SharedStorage& shared_storage,
                                                   int thread_idx) {
    TilePipelineState tile_read;
    PipelineState state = cutlass::make_producer_start_state<MainloopPipeline>();
    while (true) {
      WgradWorkTile const work = take_tile_slot(tile_pipeline, tile_read, shared_storage.tile_slots);
      if (!work.valid) {
        wait_for_copies();
        return;
      }
      int const k_tiles = skipped(params, work) ? 0 : k_blocks(work);
      load_gathered_k_blocks(params, pipeline, state, work, k_tiles, thread_idx, shared_storage,
                             [](uint64_t*, int, int) {});
      state.advance(k_tiles);
    }
  }

  CUTLASS_DEVICE
  static void consume(Params const& params, MainloopPipeline& pipeline,
                      TilePipeline& tile_pipeline, SharedStorage& shared_storage, int mma_thread_idx) {
    using namespace cute;
    CollectiveMainloop collective_mainloop;
    TiledMma tiled_mma;
    PipelineState read_state;
    TilePipelineState tile_read;
    int store_count = 0;
    typename CollectiveMainloop::Params unused_mainloop_params{};
    Tensor sD = make_tensor(make_smem_ptr(shared_storage.smem_d.data()), SmemLayoutD{});  // (BLK_P, EPI_N, BUF)
    cutlass::arch::NamedBarrier const epilogue_barrier(cutlass::NumThreadsPerWarpGroup,
                                                        uint32_t(mma_thread_idx) / cutlass::NumThreadsPerWarpGroup);
    int const group_row0 = mma_thread_idx / int(cutlass::NumThreadsPerWarpGroup) * kStoreRows;
    using Accumulators = decltype(partition_fragment_C(tiled_mma, take<0, 2>(TileShape{})));
    // 16-bit outputs: the finished tile waits in registers, packed, and is stored a chunk per k-block
    // under the next tile's MMAs (sm90_moe_mainloop.hpp). Float outputs are stored right away.
    MaybePendingTile<kDeferStore, kTileQ, kEpiN, kEpiBuffers, ElementD, Accumulators, StoreTarget> pending;
    auto const store_pending = [&](int first_chunk, int last_chunk) {
      pending.store(first_chunk, last_chunk, sD, tiled_mma, mma_thread_idx, epilogue_barrier, store_count,
                    [&](StoreTarget const& target) { return issue_store(params, target); });
    };
    while (true) {
      WgradWorkTile const work = take_tile_slot(tile_pipeline, tile_read, shared_storage.tile_slots);
      if (!work.valid) {
        break;
      }
      if (skipped(params, work)) {
        continue;
      }
      int const k_tiles = k_blocks(work);
      // Issue the MMAs and wait for them in one branch: with a branch in between, ptxas cannot tell that
      // clear() never runs while WGMMAs are in flight and inserts waits on them (advisory C7517, which CI
      // checks for); a version that did ran up to 1.7x slower.
      Accumulators accumulators = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));
      if (k_tiles > 0) {
        if constexpr (kDeferStore) {
          mma_with_hook<kChunks, CollectiveMainloop, kGather>(pipeline, read_state, accumulators, k_tiles, mma_thread_idx,
                                                     shared_storage.tensors, [&](int k) { store_pending(k, k + 1); });
        } else {
          collective_mainloop.mma(pipeline, read_state, accumulators, k_tiles, mma_thread_idx,
                                  shared_storage.tensors, unused_mainloop_params);
          collective_mainloop.mma_tail(pipeline, read_state, k_tiles);
        }
        read_state.advance(k_tiles);
      } else {
        clear(accumulators);  // a sum over no rows
      }
      store_pending(k_tiles, kChunks);  // what the k-blocks' hooks did not store (all of it without MMAs)
      // Each warpgroup stores its own rows; none when they are all past P.
      StoreTarget const target{work.p_block * kTileP, work.q_block * kTileQ, work.expert,
                               work.p_block * kTileP + group_row0 < params.P};
      if (kDeferStore && k_tiles >= kChunks) {
        pending.hold(accumulators, target);
      } else if (target.active) {
        // Not deferred, or a short reduction: the next tile (most likely of the same expert) would have too
        // few k-blocks to cover the stores (a first version that deferred these looked up to 13% slower at
        // 256 and 2048 tokens; docs/design.md).
        store_tile_through_smem<kTileQ, kEpiN, kEpiBuffers>(sD, accumulators, tiled_mma, mma_thread_idx,
                                                            epilogue_barrier, store_count, issue_store(params, target));
      }
    }
    store_pending(0, kChunks);
    // Shared memory must outlive the TMA stores that read it (each warpgroup's leader issued its own).
    if (mma_thread_idx % cutlass::NumThreadsPerWarpGroup == 0) {
      tma_store_wait<0>();
    }
  }

  // Where a tile goes, and whether this warpgroup has rows of it to store.
  struct StoreTarget {
    int32_t p0, q0, expert;
    bool active;
  };

  // The epilogue's issue_store for a tile of D: a TMA store of the warpgroup's box at (q, p, expert), or
  // a reduce-add when accumulating into a float32 gradient.
  CUTLASS_DEVICE static auto issue_store(Params const& params, StoreTarget const& target) {
    return [&params, target](int chunk, auto* smem_box, int row_offset) {
      int32_t const q = target.q0 + chunk * kEpiN;
      if (params.accumulate) {
        cute::SM90_TMA_REDUCE_ADD_3D::copy(&params.tma_d, smem_box, q, target.p0 + row_offset, target.expert);
      } else {
        cute::SM90_TMA_STORE_3D::copy(&params.tma_d, smem_box, q, target.p0 + row_offset, target.expert);
      }
      cute::tma_store_arrive();
    };
  }
};

}  // namespace moe_gemm
