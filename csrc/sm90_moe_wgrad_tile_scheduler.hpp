// The weight-gradient kernel's tile scheduler (sm90_moe_wgrad_kernel.hpp): every expert has the same
// ceil(P / kTileP) x ceil(Q / kTileQ) output tiles, so tile t belongs to expert t / tiles_per_expert, a
// division; the reduction range of that expert (its first row and row count) comes from the warp's table
// of m_sizes (moe_expert_rows.hpp). The forward kernel's scheduler is sm90_moe_tile_scheduler.hpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/fast_math.h"

#include "moe_expert_rows.hpp"

namespace moe_gemm {

struct WgradSchedulerParams {
  ExpertRows experts{};   // m_sizes, and M: the rows of L and R
  int32_t tiles_p = 0;    // ceil(P / kTileP)
  int32_t group_p = 8;    // p-blocks per raster group
  // Divisors of the tile -> (expert, p-block, q-block) map, precomputed (a tile costs multiplies, not
  // divisions): tiles_p * tiles_q tiles per expert, group_p * tiles_q per raster group, and the group
  // sizes: group_p, and tiles_p % group_p for the last group when smaller.
  cutlass::FastDivmod tiles_per_expert{1};
  cutlass::FastDivmod tiles_per_group{1};
  cutlass::FastDivmod group_size{1};
  cutlass::FastDivmod last_group_size{1};

  // All of the above from the tile counts; the caller checks that tiles_p * tiles_q * num_experts
  // fits in an int32.
  static WgradSchedulerParams make(ExpertRows const& experts, int32_t tiles_p, int32_t tiles_q, int32_t group_p) {
    WgradSchedulerParams params;
    params.experts = experts;
    params.tiles_p = tiles_p;
    params.group_p = group_p;
    params.tiles_per_expert = cutlass::FastDivmod(tiles_p * tiles_q);
    params.tiles_per_group = cutlass::FastDivmod(group_p * tiles_q);
    params.group_size = cutlass::FastDivmod(group_p);
    params.last_group_size = cutlass::FastDivmod(tiles_p % group_p != 0 ? tiles_p % group_p : group_p);
    return params;
  }
};

struct WgradWorkTile {
  int32_t expert;
  int32_t p_block;
  int32_t q_block;
  int64_t row_start;  // first row of the expert in L and R
  int32_t rows;       // the expert's rows after clamping to M: the reduction length
  bool valid;
};

// Tile t -> (expert t / tiles_per_expert, p-block, q-block). The expert's row range comes from the
// warp's table of m_sizes (moe_expert_rows.hpp: lane l holds the first row of its block of experts),
// built when the scheduler is constructed; the expert of the previous call is cached. Warp-collective.
// Only the TMA warp runs it (40 registers): `params` stays in the kernel's parameter space.
class Sm90MoeWgradScheduler {
 public:
  CUTLASS_DEVICE explicit Sm90MoeWgradScheduler(WgradSchedulerParams const& params) : params_(params) {
    int const lane = threadIdx.x % 32;
    int64_t const lane_rows = expert_rows().block_rows(lane);
    lane_row_start_ = warp_inclusive_scan(lane_rows, lane) - lane_rows;
  }

  CUTLASS_DEVICE WgradWorkTile get_work_tile(int32_t linear_idx) {
    WgradWorkTile work{};
    int expert, local;
    params_.tiles_per_expert(expert, local, linear_idx);
    work.valid = expert < params_.experts.num_experts;
    if (!work.valid) {
      return work;
    }
    if (expert != expert_) {
      locate(expert);
    }
    // Within the expert, groups of group_p p-blocks; the q-block is the slow index inside a group,
    // so the CTAs running together read a few column blocks of L and R.
    int group, in_group, p_in_group;
    params_.tiles_per_group(group, in_group, local);
    int32_t const group_p0 = group * params_.group_p;
    bool const last_group = group_p0 + params_.group_p > params_.tiles_p;
    (last_group ? params_.last_group_size : params_.group_size)(work.q_block, p_in_group, in_group);
    work.expert = expert;
    work.p_block = group_p0 + p_in_group;
    work.row_start = expert_row_start_;
    work.rows = expert_rows_;
    return work;
  }

 private:
  CUTLASS_DEVICE ExpertRows const& expert_rows() const { return params_.experts; }

  // The lane owning `expert` walks its block up to it, from L1, and shares the clamped row range.
  CUTLASS_DEVICE void locate(int32_t expert) {
    ExpertRows const sizes = expert_rows();
    int const owner = expert / sizes.per_lane();
    int64_t row = 0, size = 0;
    if (int(threadIdx.x % 32) == owner) {
      row = lane_row_start_;
      for (int32_t e = sizes.block_begin(owner); e < expert; ++e) {
        row += sizes.size(e);
      }
      size = sizes.size(expert);
    }
    row = __shfl_sync(0xffffffff, row, owner);
    size = __shfl_sync(0xffffffff, size, owner);
    expert_ = expert;
    expert_row_start_ = min(row, params_.experts.rows_total);
    expert_rows_ = int32_t(min(row + size, params_.experts.rows_total) - expert_row_start_);
  }

  WgradSchedulerParams const& params_;
  int64_t lane_row_start_ = 0;  // unclamped first row of this lane's block of experts
  int32_t expert_ = -1;         // the expert of the last call, cached
  int64_t expert_row_start_ = 0;
  int32_t expert_rows_ = 0;
};

}  // namespace moe_gemm
