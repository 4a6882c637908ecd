// MoE tile scheduler: maps a persistent CTA's linear tile index to (expert, m-block, n-block)
// from the per-expert row counts in GPU memory. No host copy of the sizes, no prepared
// pointer arrays: the row offset of each expert is a prefix sum computed on the fly.
//
// The math, once:
//   rows[e]   = the rows of expert e after clamping to the buffer: sizes < 0 count as 0 and
//               rows at or past M are dropped, so offs[e] = min(sum_{j<e} max(size_j, 0), M).
//   tiles[e]  = ceil(rows[e] / kTileM) * tiles_n           (0 for an empty expert: it costs nothing)
//   tile t    = belongs to the expert e with start[e] <= t < start[e] + tiles[e], start = prefix(tiles)
//   inside e  = m-blocks are taken group_m at a time; within a group the n-block is the slow index,
//               so the CTAs running together read group_m blocks of A and a few B tiles from L2.
//   pointers  = A + (offs[e] + m_block * kTileM) * lda,  B + e * ldb_e,  D + (offs[e] + m_block * kTileM) * ldd.
//
// Each warp keeps its own cursor (current expert, its first tile and first row). Persistent CTAs
// only move forward, so the cursor advances 32 experts at a time with a warp-wide scan.
// With split-K the kernel's work units are (tile, split) and it asks for tile unit / split_k: still
// non-decreasing along a CTA's units, so the cursor logic is the same.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace moe_gemm {

struct MoeSchedulerParams {
  void const* m_sizes = nullptr;  // [num_experts] int32 or int64, device memory
  bool m_sizes_int64 = false;
  int32_t num_experts = 0;
  int64_t rows_total = 0;         // M: rows of A and D
  int32_t tiles_n = 0;            // ceil(N / kTileN)
  int32_t group_m = 8;            // m-blocks per raster group (see above)
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

  CUTLASS_DEVICE explicit Sm90MoeTileScheduler(Params const& params) : params_(params) {}

  // The tile this CTA works on for the given linear index. Must be called by all 32 lanes of a
  // warp with the same, non-decreasing, linear_idx.
  CUTLASS_DEVICE MoeWorkTile get_work_tile(int64_t linear_idx) {
    while (linear_idx >= expert_tile_start_ + expert_tiles_ && next_expert_ < params_.num_experts) {
      advance_chunk(linear_idx);
    }
    MoeWorkTile work{};
    work.valid = linear_idx >= expert_tile_start_ && linear_idx < expert_tile_start_ + expert_tiles_;
    if (!work.valid) {
      return work;
    }
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

  // Rows covered by all experts: min(sum(max(size, 0)), M). Scans the experts not visited yet.
  CUTLASS_DEVICE int64_t rows_covered() {
    while (next_expert_ < params_.num_experts) {
      advance_chunk(INT64_MAX);
    }
    return expert_row_start_ + expert_rows_;
  }

 private:
  CUTLASS_DEVICE int64_t load_size(int32_t expert) const {
    if (expert >= params_.num_experts) {
      return 0;
    }
    int64_t size = params_.m_sizes_int64 ? static_cast<int64_t const*>(params_.m_sizes)[expert]
                                         : static_cast<int32_t const*>(params_.m_sizes)[expert];
    return size > 0 ? size : 0;
  }

  template <class T>
  CUTLASS_DEVICE static T warp_inclusive_scan(T value, int lane) {
    CUTLASS_PRAGMA_UNROLL
    for (int offset = 1; offset < 32; offset <<= 1) {
      T other = __shfl_up_sync(0xffffffff, value, offset);
      if (lane >= offset) {
        value += other;
      }
    }
    return value;
  }

  // Looks at the next 32 experts. Stops the cursor at the first one whose tiles contain
  // linear_idx, or at the last of the 32 when none does.
  CUTLASS_DEVICE void advance_chunk(int64_t linear_idx) {
    int const lane = threadIdx.x % 32;
    int32_t const expert = next_expert_ + lane;
    int64_t const rows_before_chunk = expert_row_start_ + expert_rows_;
    int64_t const tiles_before_chunk = expert_tile_start_ + expert_tiles_;

    // Clamp to the buffer: an expert's rows end at min(prefix, M).
    int64_t const size = load_size(expert);
    int64_t const end_unclamped = rows_before_chunk + warp_inclusive_scan(size, lane);
    int64_t const end = min(end_unclamped, params_.rows_total);
    int64_t const begin = min(end_unclamped - size, params_.rows_total);
    int32_t const rows = static_cast<int32_t>(end - begin);
    int64_t const tiles = static_cast<int64_t>((rows + kTileM - 1) / kTileM) * params_.tiles_n;
    int64_t const tiles_end = tiles_before_chunk + warp_inclusive_scan(tiles, lane);

    int32_t const experts_in_chunk = min(32, params_.num_experts - next_expert_);
    uint32_t const hit = __ballot_sync(0xffffffff, lane < experts_in_chunk && tiles_end > linear_idx);
    int const stop_lane = hit ? __ffs(hit) - 1 : experts_in_chunk - 1;

    expert_ = next_expert_ + stop_lane;
    expert_row_start_ = __shfl_sync(0xffffffff, begin, stop_lane);
    expert_rows_ = __shfl_sync(0xffffffff, rows, stop_lane);
    expert_tiles_ = __shfl_sync(0xffffffff, tiles, stop_lane);
    expert_tile_start_ = __shfl_sync(0xffffffff, tiles_end, stop_lane) - expert_tiles_;
    next_expert_ = expert_ + 1;
  }

  Params params_;
  int32_t expert_ = -1;
  int32_t next_expert_ = 0;
  int64_t expert_tile_start_ = 0;
  int64_t expert_tiles_ = 0;
  int64_t expert_row_start_ = 0;
  int32_t expert_rows_ = 0;
};

}  // namespace moe_gemm
