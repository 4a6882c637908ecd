// Layout of the kernels' device workspace: planned once per call (plan_grouped_gemm in moe_gemm.cpp,
// plan_grouped_wgrad in moe_wgrad.cpp), read by the launchers (their pointers) and by the callers (its size,
// which they allocate). Host only.
//
//   [0, zeroed_bytes)             counters, zeroed by run_grouped_gemm / run_grouped_wgrad before each launch:
//                                   int tile_counter              (dynamic scheduling only)
//                                   int arrivals[tile_slots]      (split-K only: splits done per tile)
//   [partials_offset, total_bytes) split-K partial sums, never zeroed (each is written before it is read):
//                                   float partials[tile_slots][split_k][partial_rows][tile_n]
//
// Counters come first so the memset stays a few hundred bytes while the partials may be megabytes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace moe_gemm {

// Most m-blocks of tile_m rows that M rows over E experts can make. A non-empty expert of r rows has
// 1 + floor((r - 1) / tile_m) blocks; summed over k <= min(E, M) non-empty experts holding <= M rows
// that is at most k + floor((M - k) / tile_m), largest at k = min(E, M).
inline int64_t max_m_blocks(int64_t M, int64_t E, int64_t tile_m) {
  int64_t const experts_hit = std::min(E, M);
  return experts_hit + (M - experts_hit) / tile_m;
}

struct WorkspaceLayout {
  size_t tile_counter_offset = 0;  // valid when dynamic
  size_t arrivals_offset = 0;      // valid when split_k > 1
  size_t zeroed_bytes = 0;
  size_t partials_offset = 0;      // valid when split_k > 1
  size_t total_bytes = 0;
  int64_t tile_slots = 0;          // tiles the sizes can make at most: arrivals and partials are indexed by tile
  int64_t partial_rows = 0;        // rows kept per partial tile: no tile has more valid rows than min(tile_m, M)
};

inline WorkspaceLayout workspace_layout(int64_t M, int64_t N, int64_t E, int tile_m, int tile_n, bool dynamic,
                                        int split_k) {
  WorkspaceLayout layout;
  size_t offset = 0;
  if (dynamic) {
    layout.tile_counter_offset = offset;
    offset += sizeof(int);
  }
  if (split_k > 1) {
    layout.tile_slots = max_m_blocks(M, E, tile_m) * ((N + tile_n - 1) / tile_n);
    layout.partial_rows = std::min<int64_t>(tile_m, M);
    layout.arrivals_offset = offset;
    offset += size_t(layout.tile_slots) * sizeof(int);
  }
  layout.zeroed_bytes = offset;
  if (split_k > 1) {
    offset = (offset + 255) / 256 * 256;  // partials 16-byte aligned for float4 loads (256 for whole sectors)
    layout.partials_offset = offset;
    offset += size_t(layout.tile_slots) * size_t(split_k) * size_t(layout.partial_rows) * size_t(tile_n) *
              sizeof(float);
  }
  layout.total_bytes = offset;
  return layout;
}

// The workspace protocol's one stream-ordered step: before each launch, zero the counters.
inline cudaError_t zero_workspace_counters(WorkspaceLayout const& layout, void* workspace, cudaStream_t stream) {
  if (layout.zeroed_bytes == 0) {
    return cudaSuccess;
  }
  if (workspace == nullptr) {
    return cudaErrorInvalidValue;  // the caller must provide the plan's workspace
  }
  return cudaMemsetAsync(workspace, 0, layout.zeroed_bytes, stream);
}

}  // namespace moe_gemm
