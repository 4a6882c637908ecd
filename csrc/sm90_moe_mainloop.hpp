// The pieces of the mainloop both sm90 kernels share: their warp roles and pipelines, and the consumer
// side of CUTLASS's sm90 warp-specialized mainloop (its collective's mma() then
// mma_tail(), one k-block of WGMMAs in flight while the next is issued), with a hook: after the MMAs of
// k-block k are issued, while they run, hook(k) is called for k < kHookSteps.
//
// Why: a cooperative kernel's two warpgroups hold one 128x256 float accumulator set between them (128
// registers a thread); a second set, to run the next tile while storing this one, does not fit. So the
// epilogue stalls the tensor cores, a large share of the time when a tile has few k-blocks (the weight
// gradient of 512-row experts: 8). A 16-bit copy of the finished tile does fit (64 registers,
// PackedTile in sm90_moe_epilogue.hpp): the hook stores it a chunk per k-block under the next tile's MMAs.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/arch/reg_reconfig.h"
#include "cutlass/cutlass.h"

namespace moe_gemm {

// The gathering kernels' copies (cp.async, which TMA's row-less boxes cannot replace: see GatheredTokenRows in
// sm90_moe_gemm_kernel.hpp). 16 bytes from global `source` to shared `address`, or 16 zeros without a read when
// `reads` is false. L2::256B: L2 fetches the 256 bytes around each read, so a row's next k-block is on its way
// while this one is copied (docs/design.md, "Gathered token rows").
CUTLASS_DEVICE void copy_16_bytes_or_zeros(uint32_t address, void const* source, bool reads) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(address), "l"(source),
               "r"(reads ? 16 : 0)
               : "memory");
}

// The arrival on `barrier` that this thread's copies so far trigger when they land; the barrier counts it among
// those it expects (noinc).
CUTLASS_DEVICE void arrive_when_copies_land(uint64_t* barrier) { cutlass::arch::cpasync_barrier_arrive_noinc(barrier); }

// A 4-byte cp.async (the scales of blockwise FP8, load_block_scales).
CUTLASS_DEVICE void copy_4_bytes(uint32_t address, void const* source) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(address), "l"(source) : "memory");
}

// Waits until this thread's copies have landed (before it exits: nothing may still write the CTA's shared memory).
CUTLASS_DEVICE void wait_for_copies() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Both kernels' warpgroups: the producer's warp 0 decodes the tiles and issues the TMA loads (its other
// warps idle, except in the forward kernels that gather A's rows or copy blockwise FP8 scales: there they load those
// too), the two consumer warpgroups run the MMAs and the epilogue.
enum class WarpGroupRole { Producer = 0, Consumer0 = 1, Consumer1 = 2 };

// A thread's place in the warp roles (the MMA threads are numbered mma_thread_idx = 0 .. num_mma_threads - 1).
struct WarpRoles {
  int thread_idx;
  int warp_idx;
  int warp_idx_in_warp_group;
  WarpGroupRole warp_group_role;
  int mma_thread_idx;
};

CUTLASS_DEVICE WarpRoles warp_roles(uint32_t num_mma_threads) {
  int const thread_idx = int(threadIdx.x);
  int const warp_idx = cutlass::canonical_warp_idx_sync();
  return {thread_idx, warp_idx, warp_idx % cutlass::NumWarpsPerWarpGroup,
          WarpGroupRole(cutlass::canonical_warp_group_idx()), int(thread_idx % num_mma_threads)};
}

// Both kernels' entry (their operator()): Kernel::run with the shared storage and the thread's roles, on the
// sm_90a build; any other build has no code for them, and says so instead.
template <class Kernel>
CUTLASS_DEVICE void run_sm90_kernel(typename Kernel::Params const& params, char* smem_buf) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  Kernel::run(params, *reinterpret_cast<typename Kernel::SharedStorage*>(smem_buf),
              warp_roles(Kernel::kNumMmaThreads));
#else
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    printf("moe_gemm: an sm90 kernel was launched on a build without sm_90a code\n");
  }
#endif
}

// The producer warpgroup only issues TMA: its registers go to the MMA warpgroups.
constexpr uint32_t kLoadRegisters = 40;
constexpr uint32_t kMmaRegisters = 232;

// Runs produce() on the producer warpgroup's warp 0, assist() on its warps 1-3 and consume() on the MMA
// warpgroups, with the registers moved from the producer warpgroup to the others.
template <class Produce, class Assist, class Consume>
CUTLASS_DEVICE void run_warp_groups(WarpRoles const& roles, Produce&& produce, Assist&& assist, Consume&& consume) {
  if (roles.warp_group_role == WarpGroupRole::Producer) {
    cutlass::arch::warpgroup_reg_dealloc<kLoadRegisters>();
    if (roles.warp_idx_in_warp_group == 0) {
      produce();
    } else {
      assist();
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kMmaRegisters>();
    consume();
  }
}

// The same with the producer warpgroup's warps 1-3 idle.
template <class Produce, class Consume>
CUTLASS_DEVICE void run_warp_groups(WarpRoles const& roles, Produce&& produce, Consume&& consume) {
  run_warp_groups(roles, produce, [] {}, consume);
}

// The pipeline of the operand stages, from the producer warp to the MMA warpgroups (num_consumers threads).
// Thread 0 arms each stage's barrier with transaction_bytes (its TMA loads). With assisting_warps the producer
// warpgroup's warps 1-3 (run_warp_groups' assist()) wait for stages and load into them too. The barrier expects
// num_producers arrivals: thread 0's, and one more from each assisting thread, which its cp.async copies trigger
// when they land (the forward kernel that gathers A's rows: 1 + 128; blockwise FP8's scales: 1 + 96).
template <class MainloopPipeline, class ClusterShape>
CUTLASS_DEVICE MainloopPipeline make_mainloop_pipeline(typename MainloopPipeline::SharedStorage& storage,
                                                       WarpRoles const& roles, uint32_t num_consumers,
                                                       uint32_t transaction_bytes, ClusterShape cluster_shape,
                                                       bool assisting_warps = false, uint32_t num_producers = 1) {
  typename MainloopPipeline::Params params;
  if (roles.warp_group_role == WarpGroupRole::Producer &&
      (roles.warp_idx_in_warp_group == 0 || assisting_warps)) {
    params.role = MainloopPipeline::ThreadCategory::Producer;
  }
  if (roles.warp_group_role != WarpGroupRole::Producer) {
    params.role = MainloopPipeline::ThreadCategory::Consumer;
  }
  params.is_leader = (roles.thread_idx % cutlass::NumThreadsPerWarpGroup) == 0;
  params.num_consumers = num_consumers;
  params.num_producers = num_producers;
  params.transaction_bytes = transaction_bytes;
  return MainloopPipeline(storage, params, cluster_shape);
}

// The small pipeline through which the producer warp hands each decoded tile to the MMA warpgroups, and
// with assisting_warps to the producer warpgroup's warps 1-3 as well (consumer_arrivals threads read every
// slot; take_tile_slot below).
template <class TilePipeline>
CUTLASS_DEVICE TilePipeline make_tile_pipeline(typename TilePipeline::SharedStorage& storage, WarpRoles const& roles,
                                               uint32_t consumer_arrivals, bool assisting_warps = false) {
  typename TilePipeline::Params params;
  params.role = roles.warp_group_role != WarpGroupRole::Producer ? TilePipeline::ThreadCategory::Consumer
                : roles.warp_idx_in_warp_group == 0             ? TilePipeline::ThreadCategory::Producer
                : assisting_warps                              ? TilePipeline::ThreadCategory::Consumer
                                                                : TilePipeline::ThreadCategory::NonParticipant;
  params.producer_arv_count = 1;
  params.consumer_arv_count = consumer_arrivals;
  return TilePipeline(storage, params);
}

// Overwrites `accumulators` with the tile's product over k_tiles >= 1 k-blocks, starting at read_state
// (taken by value: the caller advances its own by k_tiles, as with CUTLASS's mma()), and frees every
// stage it read. thread_idx runs over the TiledMma's threads. kProxyFence: the stages were written by cp.async
// (generic proxy), which WGMMA (async proxy) reads only after a proxy fence.
template <int kHookSteps, class CollectiveMainloop, bool kProxyFence = false, class Accumulators, class Hook>
CUTLASS_DEVICE void mma_with_hook(typename CollectiveMainloop::MainloopPipeline& pipeline,
                                  typename CollectiveMainloop::PipelineState read_state, Accumulators& accumulators,
                                  int k_tiles, int thread_idx, typename CollectiveMainloop::TensorStorage& tensors,
                                  Hook&& hook) {
  using namespace cute;
  using TiledMma = typename CollectiveMainloop::TiledMma;
  Tensor sA = make_tensor(make_smem_ptr(tensors.smem_A.data()), typename CollectiveMainloop::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(tensors.smem_B.data()), typename CollectiveMainloop::SmemLayoutB{});
  constexpr int kWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
  auto const warp_group_layout = make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
  int const warp_group = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
  TiledMma tiled_mma;
  auto thread_mma = tiled_mma.get_slice(warp_group_layout(warp_group));
  Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA, MMA_M, MMA_K, PIPE)
  Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA, MMA_N, MMA_K, PIPE)
  auto release_state = read_state;

  // k-block 0 overwrites the accumulators.
  warpgroup_fence_operand(accumulators);
  {
    auto const token = pipeline.consumer_try_wait(read_state);
    pipeline.consumer_wait(read_state, token);
    if constexpr (kProxyFence) {
      cutlass::arch::fence_view_async_shared();
    }
    int const stage = read_state.index();
    warpgroup_arrive();
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTLASS_PRAGMA_UNROLL
    for (int k_block = 0; k_block < size<2>(tCrA); ++k_block) {
      cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accumulators);
      tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    ++read_state;
  }
  warpgroup_fence_operand(accumulators);
  if constexpr (kHookSteps > 0) {
    hook(0);
  }
  CUTLASS_PRAGMA_NO_UNROLL
  for (int k = 1; k < k_tiles; ++k) {
    auto const token = pipeline.consumer_try_wait(read_state);
    pipeline.consumer_wait(read_state, token);
    if constexpr (kProxyFence) {
      cutlass::arch::fence_view_async_shared();
    }
    int const stage = read_state.index();
    warpgroup_fence_operand(accumulators);
    warpgroup_arrive();
    cute::gemm(tiled_mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), accumulators);
    warpgroup_commit_batch();
    if (k < kHookSteps) {
      hook(k);  // k-blocks k - 1 and k in flight
    }
    warpgroup_wait<1>();  // k-block k - 1 is done: free its stage
    warpgroup_fence_operand(accumulators);
    pipeline.consumer_release(release_state);
    ++read_state;
    ++release_state;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(accumulators);
  pipeline.consumer_release(release_state);
}

// A k-block's blockwise FP8 scales for one thread: x[h] of its row of half h, w[b] of the tile's b-th 128-column
// weight block (a 128-column tile has one, w[0]; a 256-column tile two).
struct BlockScales {
  float x[2];
  float w[2];
};

// The MMAs of one tile whose k-blocks each have their own scales (FP8 with blockwise scales): each k-block is
// multiplied into a block accumulator (its first WGMMA zeroes it), waited for, and added into `accumulators` times
// its scale, scales.load(stage) giving the BlockScales of the k-block in that stage, s.x[h] * s.w[0] for the
// thread's row of half h (WGMMA's accumulator layout ((2 columns, 2 row halves, N / 8 column groups), MMA_M, MMA_N),
// one 64-row block per warpgroup). Two block accumulators take turns, so that k-block k + 1's MMAs are queued before
// k-block k is waited for and added: the tensor cores never wait for the addition. The scales come with the stage
// (the producer's assisting warps copy them in beside the operands) and are read from shared memory while the stage
// is held, because loads from global memory in this loop slowed it (docs/benchmark_history.md, "The blockwise
// scales through the stages"). E.g. K = 7168 (56 k-blocks) with DeepSeek-V3's scales: s.x[h] = x_scale[row_h, k],
// s.w[0] = w_scale[expert, n_block, k], and accumulators += s.x[h] * s.w[0] * block over each k-block's 128 columns.
template <class CollectiveMainloop, class Accumulators, class Scales>
CUTLASS_DEVICE void mma_blockwise(typename CollectiveMainloop::MainloopPipeline& pipeline,
                                  typename CollectiveMainloop::PipelineState read_state, Accumulators& accumulators,
                                  int k_tiles, int thread_idx, typename CollectiveMainloop::TensorStorage& tensors,
                                  Scales const& scales) {
  using namespace cute;
  using TiledMma = typename CollectiveMainloop::TiledMma;
  static_assert(size<0, 0>(Accumulators{}) == 2 && size<0, 1>(Accumulators{}) == 2 && size<1>(Accumulators{}) == 1 &&
                size<2>(Accumulators{}) == 1, "one 64-row block of WGMMA accumulators per warpgroup");
  constexpr int kColumnGroups = size<0, 2>(Accumulators{});
  Tensor sA = make_tensor(make_smem_ptr(tensors.smem_A.data()), typename CollectiveMainloop::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(tensors.smem_B.data()), typename CollectiveMainloop::SmemLayoutB{});
  constexpr int kWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
  auto const warp_group_layout = make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
  int const warp_group = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
  TiledMma tiled_mma;
  auto thread_mma = tiled_mma.get_slice(warp_group_layout(warp_group));
  Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA, MMA_M, MMA_K, PIPE)
  Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA, MMA_N, MMA_K, PIPE)
  auto release_state = read_state;
  clear(accumulators);
  if (k_tiles <= 0) {
    return;
  }
  // Queues the next k-block's MMAs into `block`.
  auto issue = [&](Accumulators& block) {
    auto const token = pipeline.consumer_try_wait(read_state);
    pipeline.consumer_wait(read_state, token);
    int const stage = read_state.index();
    warpgroup_fence_operand(accumulators);
    warpgroup_fence_operand(block);
    warpgroup_arrive();
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    CUTLASS_PRAGMA_UNROLL
    for (int k_step = 0; k_step < size<2>(tCrA); ++k_step) {
      cute::gemm(tiled_mma, tCrA(_, _, k_step, stage), tCrB(_, _, k_step, stage), block);
      tiled_mma.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
    warpgroup_fence_operand(block);
    warpgroup_fence_operand(accumulators);
    ++read_state;
    return scales.load(stage);  // read while the stage is held: it is freed when this block is added
  };
  // Adds the oldest k-block in flight, `block`, times `scale`, once its MMAs are done (Newer: how many later
  // k-blocks' MMAs are queued behind them, 0 or 1, known at compile time so that ptxas sees which WGMMA registers
  // are ready), and frees its stage.
  auto add = [&](auto newer, Accumulators& block, BlockScales const& s) {
    warpgroup_wait<decltype(newer)::value>();
    warpgroup_fence_operand(block);
    warpgroup_fence_operand(accumulators);
    pipeline.consumer_release(release_state);
    ++release_state;
    float const scale[2] = {s.x[0] * s.w[0], s.x[1] * s.w[0]};
    CUTLASS_PRAGMA_UNROLL
    for (int group = 0; group < kColumnGroups; ++group) {
      CUTLASS_PRAGMA_UNROLL
      for (int h = 0; h < 2; ++h) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = 0; c < 2; ++c) {
          auto const i = make_coord(make_coord(c, h, group), 0, 0);
          accumulators(i) = fmaf(block(i), scale[h], accumulators(i));
        }
      }
    }
  };
  Accumulators even, odd;  // the blocks of the even and the odd k-blocks
  BlockScales s_even = issue(even), s_odd;  // the scales of the k-blocks in even and odd
  int k = 0;
  CUTLASS_PRAGMA_NO_UNROLL
  for (; k + 2 < k_tiles; k += 2) {  // even holds k-block k; k + 1 and k + 2 follow
    s_odd = issue(odd);
    add(Int<1>{}, even, s_even);
    s_even = issue(even);
    add(Int<1>{}, odd, s_odd);
  }
  if (k + 1 < k_tiles) {  // the last two
    s_odd = issue(odd);
    add(Int<1>{}, even, s_even);
    add(Int<0>{}, odd, s_odd);
  } else {
    add(Int<0>{}, even, s_even);
  }
}

// mma_blockwise for 128x256 tiles, whose accumulators (128 registers a thread) leave room for one 64x128 block a
// warpgroup, not two: each k-block is multiplied a 128-column half at a time (the halves of the B tile are the
// tile's two weight scale blocks), each half waited for and added in before the next is issued, so that the other
// warpgroup's MMAs run meanwhile. Half b of k-block k adds s.x[h] * s.w[b] * block into the accumulators' columns
// [128 b, 128 b + 128): WGMMA's column groups [16 b, 16 b + 16) of 8 columns.
template <class CollectiveMainloop, class Accumulators, class Scales>
CUTLASS_DEVICE void mma_blockwise_halves(typename CollectiveMainloop::MainloopPipeline& pipeline,
                                         typename CollectiveMainloop::PipelineState read_state,
                                         Accumulators& accumulators, int k_tiles, int thread_idx,
                                         typename CollectiveMainloop::TensorStorage& tensors, Scales const& scales) {
  using namespace cute;
  using TiledMma = typename CollectiveMainloop::TiledMma;
  static_assert(size<0, 0>(Accumulators{}) == 2 && size<0, 1>(Accumulators{}) == 2 &&
                    size<0, 2>(Accumulators{}) == 32 && size<1>(Accumulators{}) == 1 && size<2>(Accumulators{}) == 1,
                "one 64x256 block of WGMMA accumulators per warpgroup");
  constexpr int kWarpGroups = size(TiledMma{}) / cutlass::NumThreadsPerWarpGroup;
  static_assert(kWarpGroups == 2, "two warpgroups split the tile along M");
  // The MMA of one half: 64x128 a warpgroup, the two warpgroups along M.
  using HalfMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<typename TiledMma::ValTypeA, typename TiledMma::ValTypeB, float, Shape<_64, _128, _32>,
                           GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
  HalfMma half_mma;
  Tensor sA = make_tensor(make_smem_ptr(tensors.smem_A.data()), typename CollectiveMainloop::SmemLayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(tensors.smem_B.data()), typename CollectiveMainloop::SmemLayoutB{});
  auto const warp_group_layout = make_layout(Int<kWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
  int const warp_group = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
  auto thread_mma = half_mma.get_slice(warp_group_layout(warp_group));
  Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA, 1, MMA_K, PIPE)
  Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA, 2 halves, MMA_K, PIPE)
  static_assert(size<1>(decltype(tCrB){}) == 2, "two 128-column halves of the B tile");
  auto block = partition_fragment_C(half_mma, Shape<_128, _128>{});      // ((2, 2, 16), 1, 1)
  clear(accumulators);
  CUTLASS_PRAGMA_NO_UNROLL
  for (int k = 0; k < k_tiles; ++k) {
    auto const token = pipeline.consumer_try_wait(read_state);
    pipeline.consumer_wait(read_state, token);
    int const stage = read_state.index();
    BlockScales const s = scales.load(stage);
    CUTLASS_PRAGMA_UNROLL
    for (int half = 0; half < 2; ++half) {
      warpgroup_fence_operand(accumulators);
      warpgroup_fence_operand(block);
      warpgroup_arrive();
      half_mma.accumulate_ = GMMA::ScaleOut::Zero;
      CUTLASS_PRAGMA_UNROLL
      for (int k_step = 0; k_step < size<2>(tCrA); ++k_step) {
        cute::gemm(half_mma, tCrA(_, 0, k_step, stage), tCrB(_, half, k_step, stage), block(_, 0, 0));
        half_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(block);
      warpgroup_fence_operand(accumulators);
      if (half == 1) {
        pipeline.consumer_release(read_state);  // both halves have read the stage
      }
      float const scale[2] = {s.x[0] * s.w[half], s.x[1] * s.w[half]};
      CUTLASS_PRAGMA_UNROLL
      for (int group = 0; group < 16; ++group) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < 2; ++c) {
            auto const into = make_coord(make_coord(c, h, 16 * half + group), 0, 0);
            accumulators(into) = fmaf(block(make_coord(make_coord(c, h, group), 0, 0)), scale[h], accumulators(into));
          }
        }
      }
    }
    ++read_state;
  }
}

// The MMA warpgroups' side of the small pipeline through which the TMA warp hands them each decoded
// tile: waits for slot `state`, copies it out, frees it. The compiler barriers keep the copy between
// the wait and the release (the pipeline's asm does not tell the compiler it touches memory).
template <class TilePipeline, class Slot, int kSlots>
CUTLASS_DEVICE Slot take_tile_slot(TilePipeline& pipeline, typename TilePipeline::PipelineState& state,
                                   Slot const (&slots)[kSlots]) {
  pipeline.consumer_wait(state);
  asm volatile("" ::: "memory");
  Slot const slot = slots[state.index()];
  asm volatile("" ::: "memory");
  pipeline.consumer_release(state);
  ++state;
  return slot;
}

}  // namespace moe_gemm
