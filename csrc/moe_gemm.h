// The seam between the kernels and their callers (the torch binding and the C++ profiler):
// plain pointers, sizes and strides, no torch types. Everything here is host code.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace moe_gemm {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1 };

// Tile configurations of the sm90 kernel. kAuto lets choose_tile_config() pick from host-known shapes.
// Clusters of two CTAs of 128x256 tiles: k128x256Cluster2x1 on consecutive m-blocks of one expert
// shares (multicasts) each B tile, k128x256Cluster1x2 on consecutive n-blocks each A tile, cutting the
// traffic from L2 by a third or a sixth. k128x128Pingpong: each consumer warpgroup computes its own
// 128x128 tile, alternating with the other, so that one's epilogue overlaps the other's MMAs.
// k16x128SwapAB (decode): tiles of 16 rows x 128 columns, computed with the weights as WGMMA's A
// operand and the tokens along its N, so that the stages hold weights, not 128 rows of tokens.
// k32x128SwapAB: the same with 32 token rows per tile (the heuristic takes it from 5 to 31 rows per expert).
enum class TileConfig : int {
  kAuto = 0,
  k128x256 = 1,
  k128x128 = 2,
  k128x256Cluster2x1 = 3,
  k128x256Cluster1x2 = 4,
  k128x128Pingpong = 5,
  k16x128SwapAB = 6,
  k32x128SwapAB = 7,
};

// "auto", "128x256", "128x128", "128x256c2x1", "128x256c1x2", "128x128pp", "16x128s", "32x128s" <-> TileConfig;
// parse returns false for an unknown name.
bool parse_tile_config(char const* name, TileConfig* config);
char const* tile_config_name(TileConfig config);

// D[offs[e] + i, :] = A[offs[e] + i, :] @ B[e]^T for i < m_sizes[e], offs = exclusive prefix sum of
// m_sizes; rows of D past the last expert are written as zeros.
struct GroupedGemmParams {
  void const* a = nullptr;        // [M, K], row stride lda (elements), inner stride 1
  void const* b = nullptr;        // [E, N, K] (b_n_major = false) or [E, K, N] (b_n_major = true)
  void* d = nullptr;              // [M, N], row stride ldd, inner stride 1
  void const* m_sizes = nullptr;  // [E] counts in device memory, int32 or int64
  bool m_sizes_int64 = false;
  bool b_n_major = false;         // the weight_transposed layout: B[e] is [K, N] with N contiguous
  DType dtype = DType::kBFloat16;
  int64_t M = 0, N = 0, K = 0;
  int32_t E = 0;
  int64_t lda = 0;                // elements between rows of A
  int64_t ldb = 0;                // elements between rows of B[e] (between n for K-major, between k for N-major)
  int64_t batch_stride_b = 0;     // elements between B[e] and B[e + 1]
  int64_t ldd = 0;                // elements between rows of D
  int sm_count = 0;               // persistent grid size; 0 = query the current device
  TileConfig config = TileConfig::kAuto;
  int group_m = 0;                // m-blocks per raster group (L2 locality); 0 = the configuration's default
  // Device memory of grouped_gemm_workspace_bytes(params) bytes whose first
  // grouped_gemm_workspace_zeroed_bytes(params) bytes the caller zeroes before each launch
  // (stream-ordered, e.g. cudaMemsetAsync); null when the size is 0.
  void* workspace = nullptr;
  int dynamic_schedule = -1;      // 1: tile counter in the workspace, 0: static striding, -1: heuristic
  // Splits of the K loop per output tile, reduced deterministically through the workspace:
  // 0 = choose_split_k(), 1 = off. Values above the number of k-blocks (64 or 128 wide) are clamped to it;
  // only the 128x128 and 16x128s configurations split (the others run 1).
  int split_k = 0;
  // 16-bit outputs of the cooperative configurations: store each tile under the next tile's MMAs (true)
  // or right after its own (false; for A/B measurements).
  bool overlap_epilogue = true;
  // An expert's last m-block of at most half a tile of rows loads only the token rows it multiplies
  // (true) or the whole token tile (false; for A/B measurements).
  bool partial_token_loads = true;
};

// Returns the configuration the heuristic picks for these shapes (never kAuto).
TileConfig choose_tile_config(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count);

// The split-K factor the heuristic picks for these shapes and a resolved (not kAuto) configuration:
// 1 unless the tiles are too few to keep every SM streaming weights (decode).
int choose_split_k(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count, TileConfig config);

// Checks what the kernel can read (alignment, strides, sizes); returns nullptr when it can,
// else a sentence saying what is wrong.
char const* check_grouped_gemm(GroupedGemmParams const& params);

// Bytes of device workspace run_grouped_gemm needs for these params: the counter of dynamic tile
// scheduling (4 bytes, problems of several waves of tiles), and for split-K a counter per tile and
// the fp32 partial tiles (csrc/moe_gemm_workspace.h). 0 when none is needed.
size_t grouped_gemm_workspace_bytes(GroupedGemmParams const& params);

// The leading bytes of that workspace to zero before each launch (the counters; at most
// grouped_gemm_workspace_bytes). The rest, the partials, needs no initialization.
size_t grouped_gemm_workspace_zeroed_bytes(GroupedGemmParams const& params);

// The choices run_grouped_gemm makes for these params: split-K factor (>= 1) and tile schedule.
int resolved_split_k(GroupedGemmParams const& params);
bool resolved_dynamic_schedule(GroupedGemmParams const& params);

// Launches the grouped GEMM on `stream`. Asynchronous; returns the launch status.
cudaError_t run_grouped_gemm(GroupedGemmParams const& params, cudaStream_t stream);

// Weight gradient, a K-grouped GEMM: the reduction runs over each expert's rows, read from m_sizes on
// the GPU. With L = grad_y, R = x (weight [E, N, K]) or L = x, R = grad_y (weight_transposed, [E, K, N]):
//   D[e] (P x Q) = L_e^T @ R_e,  L_e = L[offs[e] : offs[e] + m_sizes[e], :] ([rows, P]), R_e likewise ([rows, Q]).
// An expert without rows gets an exact zero (or, accumulating, is left as it was); rows past the last
// expert contribute nothing.
struct GroupedWgradParams {
  void const* l = nullptr;        // [M, P], row stride ldl, inner stride 1
  void const* r = nullptr;        // [M, Q], row stride ldr, inner stride 1
  void* d = nullptr;              // [E, P, Q], rows of ldd elements, experts batch_stride_d apart
  void const* m_sizes = nullptr;  // [E] counts in device memory, int32 or int64
  bool m_sizes_int64 = false;
  DType dtype = DType::kBFloat16; // of l and r
  bool d_float32 = false;         // D is float32 (else the input dtype)
  bool accumulate = false;        // D += L^T R (float32 D only): a trainer's main-grad buffer
  int64_t M = 0, P = 0, Q = 0;
  int32_t E = 0;
  int64_t ldl = 0, ldr = 0, ldd = 0, batch_stride_d = 0;
  int sm_count = 0;               // persistent grid size; 0 = query the current device
  int group_p = 0;                // 128-row blocks of D per raster group (L2 locality); 0 = 8
  bool overlap_epilogue = true;   // 16-bit D: store each tile under the next tile's MMAs (as in GroupedGemmParams)
  // Device memory of grouped_wgrad_workspace_bytes(params) bytes, zeroed by the caller before each launch.
  void* workspace = nullptr;
};

// Nullptr when the kernel can run these params, else a sentence saying what is wrong.
char const* check_grouped_wgrad(GroupedWgradParams const& params);
size_t grouped_wgrad_workspace_bytes(GroupedWgradParams const& params);
cudaError_t run_grouped_wgrad(GroupedWgradParams const& params, cudaStream_t stream);

}  // namespace moe_gemm
