// MoE tile scheduler: maps a persistent CTA's linear tile index to (expert, m-block, n-block)
// from the per-expert row counts in GPU memory. No host copy of the sizes, no prepared
// pointer arrays: the row offset of each expert is a prefix sum computed on the fly.
//
// The math, once:
//   rows[e]   = the rows of expert e after clamping to the buffer (moe_expert_rows.hpp).
//   tiles[e]  = ceil(rows[e] / kTileM) * tiles_n           (0 for an empty expert: it costs nothing)
//   tile t    = belongs to the expert e with start[e] <= t < start[e] + tiles[e], start = prefix(tiles)
//   inside e  = m-blocks are taken group_m at a time; within a group the n-block is the slow index,
//               so the CTAs running together read group_m blocks of A and a few B tiles from L2.
//   pointers  = A + (offs[e] + m_block * kTileM) * lda,  B + e * ldb_e,  D + (offs[e] + m_block * kTileM) * ldd.
//
// The TMA warp builds the table when it constructs the scheduler: lane l holds the first row and the
// tile range of its block of experts (ExpertRows: all sizes loaded at once, two warp scans). A tile
// then costs a ballot to find the lane whose block holds it and a walk of that block by the lane,
// except when it falls in the expert of the previous call, which is cached. Any order of tiles works.
// The kernel hands each decoded tile to its MMA warpgroups. In a cluster with dynamic scheduling, rank
// 0 takes each unit from the counter and broadcasts it to the other CTA (ClusterUnitSlots, below).
// The weight gradient's scheduler is in sm90_moe_wgrad_tile_scheduler.hpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cute/arch/cluster_sm90.hpp"
#include "cute/arch/util.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/pipeline/sm90_pipeline.hpp"

#include "moe_expert_rows.hpp"

namespace moe_gemm {

struct MoeSchedulerParams {
  ExpertRows experts{};  // m_sizes, and M: the rows of A and D
  int32_t tiles_n = 0;   // ceil(N / kTileN)
  int32_t group_m = 8;   // m-blocks per raster group (see above)
};

struct MoeWorkTile {
  int32_t expert;
  int32_t m_block;     // m-block inside the expert
  int32_t n_block;
  int64_t row_start;   // first row of the expert in A and D
  int32_t rows;        // rows of the expert (after clamping)
  bool valid;
};

template <int kTileM>
class Sm90MoeTileScheduler {
 public:
  using Params = MoeSchedulerParams;

  // Warp-collective: all 32 lanes of the warp.
  CUTLASS_DEVICE explicit Sm90MoeTileScheduler(Params const& params) : params_(params) {
    ExpertRows const sizes = expert_rows();
    int const lane = threadIdx.x % 32;
    int64_t const lane_rows = sizes.block_rows(lane);
    int64_t const rows_end = warp_inclusive_scan(lane_rows, lane);
    lane_row_start_ = rows_end - lane_rows;
    rows_covered_ = min(__shfl_sync(0xffffffff, rows_end, 31), params_.experts.rows_total);

    int64_t row = lane_row_start_;
    int64_t lane_tiles = 0;
    int32_t const end = sizes.block_end(lane);
    for (int32_t e = sizes.block_begin(lane); e < end; ++e) {  // sizes now come from L1
      int64_t const size = sizes.size(e);
      lane_tiles += tiles_of(row, size);
      row += size;
    }
    lane_tile_end_ = warp_inclusive_scan(lane_tiles, lane);
    lane_tile_start_ = lane_tile_end_ - lane_tiles;
  }

  // The tile this CTA works on for the given linear index. Warp-collective, with the same linear_idx
  // on every lane.
  CUTLASS_DEVICE MoeWorkTile get_work_tile(int64_t linear_idx) {
    MoeWorkTile work{};
    if (linear_idx < expert_tile_start_ || linear_idx >= expert_tile_start_ + expert_tiles_) {
      if (!locate(linear_idx)) {
        return work;  // past the last tile
      }
    }
    work.valid = true;
    int32_t const tiles_n = params_.tiles_n;
    int32_t const m_blocks = (expert_rows_ + kTileM - 1) / kTileM;
    int32_t const local = static_cast<int32_t>(linear_idx - expert_tile_start_);
    int32_t const group_m = params_.group_m;
    int32_t const group = local / (group_m * tiles_n);
    int32_t const in_group = local - group * (group_m * tiles_n);
    int32_t const group_m0 = group * group_m;
    int32_t const group_size = min(group_m, m_blocks - group_m0);
    work.expert = expert_;
    work.n_block = in_group / group_size;
    work.m_block = group_m0 + in_group % group_size;
    work.row_start = expert_row_start_;
    work.rows = expert_rows_;
    return work;
  }

  // Rows covered by all experts: min(sum(max(size, 0)), M).
  CUTLASS_DEVICE int64_t rows_covered() const { return rows_covered_; }

 private:
  CUTLASS_DEVICE ExpertRows const& expert_rows() const { return params_.experts; }

  // Tiles of an expert whose unclamped rows start at `row`.
  CUTLASS_DEVICE int64_t tiles_of(int64_t row, int64_t size) const {
    int64_t const begin = min(row, params_.experts.rows_total);
    int64_t const end = min(row + size, params_.experts.rows_total);
    return (end - begin + kTileM - 1) / kTileM * params_.tiles_n;
  }

  // Points the cache at the expert holding tile linear_idx; false when no expert does.
  CUTLASS_DEVICE bool locate(int64_t linear_idx) {
    int const lane = threadIdx.x % 32;
    uint32_t const owners = __ballot_sync(0xffffffff, lane_tile_start_ <= linear_idx && linear_idx < lane_tile_end_);
    if (owners == 0) {
      return false;
    }
    int const owner = __ffs(owners) - 1;
    int32_t expert = 0;
    int64_t tile_start = 0, tiles = 0, row = 0, size = 0;
    if (lane == owner) {
      ExpertRows const sizes = expert_rows();
      tile_start = lane_tile_start_;
      row = lane_row_start_;
      int32_t const end = sizes.block_end(lane);
      for (expert = sizes.block_begin(lane); expert < end; ++expert) {
        size = sizes.size(expert);
        tiles = tiles_of(row, size);
        if (linear_idx < tile_start + tiles) {
          break;
        }
        tile_start += tiles;
        row += size;
      }
    }
    expert_ = __shfl_sync(0xffffffff, expert, owner);
    expert_tile_start_ = __shfl_sync(0xffffffff, tile_start, owner);
    expert_tiles_ = __shfl_sync(0xffffffff, tiles, owner);
    row = __shfl_sync(0xffffffff, row, owner);
    size = __shfl_sync(0xffffffff, size, owner);
    expert_row_start_ = min(row, params_.experts.rows_total);
    expert_rows_ = static_cast<int32_t>(min(row + size, params_.experts.rows_total) - expert_row_start_);
    return true;
  }

  Params const& params_;  // in the kernel's parameter space: no registers in the 40-register TMA warp
  // This lane's block of experts: unclamped first row, and its tiles [start, end) in the sequence.
  int64_t lane_row_start_ = 0;
  int64_t lane_tile_start_ = 0;
  int64_t lane_tile_end_ = 0;
  int64_t rows_covered_ = 0;
  // The expert of the last tile looked up.
  int32_t expert_ = -1;
  int64_t expert_tile_start_ = 0;
  int64_t expert_tiles_ = 0;
  int64_t expert_row_start_ = 0;
  int32_t expert_rows_ = 0;
};

// Dynamic scheduling in a cluster: rank 0's producer warp takes each unit from the counter and writes
// it into unit[slot] of every CTA with st.async, which completes the transaction on that CTA's
// full[slot] (whose one arrival is its own producer warp's expect-tx). Each other producer warp then
// arrives on rank 0's empty[slot], as rank 0's does, which frees the slot for the round after.
template <int kSlots>
struct ClusterUnitSlots {
  using State = cutlass::PipelineState<kSlots>;

  alignas(8) uint64_t full[kSlots];
  alignas(8) uint64_t empty[kSlots];
  int64_t unit[kSlots];

  // One thread, before the cluster's barrier that ends the kernel's prologue.
  CUTLASS_DEVICE void init(int cluster_size) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kSlots; ++i) {
      cutlass::arch::ClusterBarrier::init(&full[i], 1);
      cutlass::arch::ClusterBarrier::init(&empty[i], cluster_size);
    }
    cutlass::arch::fence_barrier_init();
  }

  // Rank 0's producer warp: publishes `value` to every CTA of the cluster.
  template <int kClusterSize>
  CUTLASS_DEVICE void publish(State state, int64_t value, bool is_leader) {
    if (!is_leader) {
      return;
    }
    int const i = state.index();
    cutlass::arch::ClusterBarrier::wait(&empty[i], state.phase() ^ 1);
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[i], sizeof(int64_t));
    uint32_t const unit_addr = cute::cast_smem_ptr_to_uint(&unit[i]);
    uint32_t const full_addr = cute::cast_smem_ptr_to_uint(&full[i]);
    CUTLASS_PRAGMA_UNROLL
    for (uint32_t cta = 0; cta < kClusterSize; ++cta) {
      asm volatile(
          "{\n\t.reg .b32 remote_unit, remote_full;\n\t"
          "mapa.shared::cluster.u32 remote_unit, %0, %2;\n\t"
          "mapa.shared::cluster.u32 remote_full, %1, %2;\n\t"
          "st.async.shared::cluster.mbarrier::complete_tx::bytes.s64 [remote_unit], %3, [remote_full];\n\t}"
          :
          : "r"(unit_addr), "r"(full_addr), "r"(cta), "l"(value)
          : "memory");
    }
    cutlass::arch::ClusterBarrier::arrive(&empty[i]);
  }

  // The producer warp of a CTA of rank > 0: arrives on its own full barrier, expecting the unit's bytes,
  // waits for the unit of this round, then frees the slot on rank 0.
  CUTLASS_DEVICE int64_t receive(State state) {
    int const i = state.index();
    bool const leader = threadIdx.x % 32 == 0;
    if (leader) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[i], sizeof(int64_t));
    }
    cutlass::arch::ClusterBarrier::wait(&full[i], state.phase());
    asm volatile("" ::: "memory");  // the wait has no memory clobber: keep the read after it
    int64_t const value = *reinterpret_cast<int64_t volatile*>(&unit[i]);
    __syncwarp();
    cutlass::arch::ClusterBarrier::arrive(&empty[i], 0u, uint32_t(leader));
    return value;
  }

  // Rank 0's producer warp, after its last unit: wait until every slot has been read, so that no
  // arrival from a peer lands on this CTA's shared memory after it exits.
  CUTLASS_DEVICE void tail(State state, bool is_leader) {
    if (!is_leader) {
      return;
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kSlots; ++i) {
      cutlass::arch::ClusterBarrier::wait(&empty[state.index()], state.phase() ^ 1);
      ++state;
    }
  }
};

}  // namespace moe_gemm
