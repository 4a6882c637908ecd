// The per-expert row counts as both kernels' schedulers read them from GPU memory.
//
// A warp reads all of m_sizes at once: lane l owns the contiguous block of experts
// [l * per_lane, (l + 1) * per_lane), per_lane = ceil(E / 32), and loads its block with independent
// loads (one memory latency in all, where walking 32 experts at a time costs one latency per chunk:
// 8 dependent round trips for 256 experts, at the start and at the end of every CTA). A warp scan of
// the lane totals then gives each lane the rows before its block; finding an expert's first row is a
// walk of at most per_lane sizes by the lane that owns it, from L1.
//
// Clamping, as the kernels define it: sizes < 0 count as 0, and rows at or past M are dropped, so
// expert e covers rows [min(offs[e], M), min(offs[e] + size[e], M)) with offs = exclusive prefix sum.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace moe_gemm {

struct ExpertRows {
  void const* m_sizes;  // [num_experts] int32 or int64, device memory
  bool m_sizes_int64;
  int32_t num_experts;
  int64_t rows_total;   // M

  CUTLASS_DEVICE int64_t size(int32_t expert) const {
    int64_t const value = m_sizes_int64 ? static_cast<int64_t const*>(m_sizes)[expert]
                                        : static_cast<int32_t const*>(m_sizes)[expert];
    return value > 0 ? value : 0;
  }

  CUTLASS_DEVICE int32_t per_lane() const { return (num_experts + 31) / 32; }
  CUTLASS_DEVICE int32_t block_begin(int lane) const { return min(lane * per_lane(), num_experts); }
  CUTLASS_DEVICE int32_t block_end(int lane) const { return min((lane + 1) * per_lane(), num_experts); }

  // Unclamped rows of this lane's block of experts.
  CUTLASS_DEVICE int64_t block_rows(int lane) const {
    int32_t const end = block_end(lane);
    int64_t rows = 0;
#pragma unroll 8  // the loads of a block are independent: issue them together
    for (int32_t e = block_begin(lane); e < end; ++e) {
      rows += size(e);
    }
    return rows;
  }
};

template <class T>
CUTLASS_DEVICE T warp_inclusive_scan(T value, int lane) {
  CUTLASS_PRAGMA_UNROLL
  for (int offset = 1; offset < 32; offset <<= 1) {
    T const other = __shfl_up_sync(0xffffffff, value, offset);
    if (lane >= offset) {
      value += other;
    }
  }
  return value;
}

}  // namespace moe_gemm
