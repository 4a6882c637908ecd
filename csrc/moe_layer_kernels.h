// The seam of the MoE layer's small kernels (moe_layer_kernels.cu): dispatch, the gated activation and its
// backward, combine and FP8 quantization, with plain pointers and sizes, no torch types. They compute what
// moe_gemm/dispatch.py, moe_gemm/layer.py and moe_gemm/_ops.py compute with tensor ops, in one launch each, so that
// a decode step of moe_gemm.experts_forward costs a handful of launches instead of about twenty-five ops, and a
// prefill step reads and writes each activation once.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "moe_activation.h"
#include "moe_dtype.h"

namespace moe_gemm {

// Sorts the P = T * top_k (token, slot) pairs by expert, stably (a counting sort: a histogram per warp, scans, then
// each warp places its pairs in order with __match_any_sync). Pair p = t * top_k + j has expert ids[p]; ids outside
// [0, E) are dropped and go last, as expert E. All outputs int64, contiguous. Up to kDispatchPairsPerBlock pairs
// take one CTA and one launch (decode); more take three launches over ceil(P / kDispatchPairsPerBlock) CTAs (a
// histogram per CTA, one CTA's scan over them, the placement), exchanging the CTAs' counts through block_counts.
struct DispatchParams {
  int64_t const* ids = nullptr;  // [P]
  int64_t* m_sizes = nullptr;     // [E] rows per expert
  int64_t* expert_of_row = nullptr;  // [P] expert of each row, E for dropped pairs
  int64_t* pair_of_row = nullptr;    // [P] row r holds pair pair_of_row[r]
  int64_t* token_of_row = nullptr;   // [P] pair_of_row / top_k
  int64_t* row_of_pair = nullptr;    // [P] the inverse permutation
  int32_t* block_counts = nullptr;   // [dispatch_workspace_ints(P, E)] scratch, any contents
  int64_t P = 0;
  int32_t E = 0;
  int32_t top_k = 1;
};

// Each CTA keeps (warps + 1) * (E + 1) int32 counters in kDispatchSharedBytes of shared memory (under the
// 48 KB a launch gets without opting in), at least one warp's worth.
constexpr int kDispatchSharedBytes = 46 * 1024;
constexpr int kDispatchMaxExperts = kDispatchSharedBytes / 4 / 2 - 1;
// Pairs per CTA: at 262144 pairs (32k tokens, top-8), 64 CTAs of up to 32 warps.
constexpr int64_t kDispatchPairsPerBlock = 4096;

// The int32 scratch of DispatchParams::block_counts: one count per (CTA, expert or dropped) when P takes several.
inline int64_t dispatch_workspace_ints(int64_t P, int32_t E) {
  int64_t const blocks = (P + kDispatchPairsPerBlock - 1) / kDispatchPairsPerBlock;
  return blocks > 1 ? blocks * (int64_t(E) + 1) : 0;
}

// out[r, i] = act(gate[r, i]) * up[r, i], rounded to the element type after the activation and after the
// product, as PyTorch's ops round. gate_up is [rows, 2I] contiguous: [gate; up] halves when concatenated,
// else interleaved columns gate0, up0, gate1, up1, ...; out is [rows, I] contiguous. I % 8 == 0.
struct GatedActivationParams {
  void const* gate_up = nullptr;
  void* out = nullptr;
  int64_t rows = 0;
  int64_t I = 0;
  DType dtype = DType::kBFloat16;
  GatedActivation act = GatedActivation::kSilu;
  bool concatenated = true;
};

// The gated activation's part of the layer's backward, from the saved pre-activation gate_up [rows, 2I] (layout as
// above). Row r has routing weight w = row_weights[r] and activated[r] = act(gate[r]) * up[r], rounded as the
// forward rounds it; grad_activated[r] is the gradient of the layer's output through the down projection alone,
// (grad_out of the row's token) @ down_e, i.e. the gradient of activated[r] for a routing weight of 1. Then:
//   grad_gate_up[r]       = the gradient of gate_up[r] given w * grad_activated[r]   [rows, 2I], gate_up's layout
//   weighted_activated[r] = w * activated[r]                                          [rows, I], the down weight
//                           gradient's operand (grad_W_down = grad_out_rows^T @ weighted_activated)
//   grad_row_weights[r]   = sum_i activated[r, i] * grad_activated[r, i]              float32 [rows], the routing
//                           weight's gradient (the row's output is activated[r] @ down_e^T)
// Each element's math runs in float32 and is rounded once to the element type. One warp per row (the row's dot
// product is a warp reduction, no atomics: bitwise reproducible). I % 8 == 0.
struct GatedActivationBackwardParams {
  void const* grad_activated = nullptr;  // [rows, I]
  void const* gate_up = nullptr;         // [rows, 2I]
  float const* row_weights = nullptr;    // [rows]
  void* grad_gate_up = nullptr;          // [rows, 2I]
  void* weighted_activated = nullptr;    // [rows, I]
  float* grad_row_weights = nullptr;     // [rows]
  int64_t rows = 0;
  int64_t I = 0;
  DType dtype = DType::kBFloat16;
  GatedActivation act = GatedActivation::kSilu;
  bool concatenated = true;
};

// out[t, :] = sum over j in slot order of (valid(t, j) ? y[row_of_pair[t * top_k + j], :] * w[t, j] : 0), in
// float32, rounded to y's type once. valid(t, j): 0 <= ids[t, j] < E. y is [P, H] contiguous, out [T, H]
// contiguous, weights [T, top_k] contiguous of weights_dtype. H % 8 == 0. No atomics: bitwise reproducible.
struct CombineParams {
  void const* y = nullptr;
  int64_t const* row_of_pair = nullptr;
  void const* weights = nullptr;
  int64_t const* ids = nullptr;
  void* out = nullptr;
  int64_t T = 0;
  int64_t H = 0;
  int32_t top_k = 1;
  int32_t E = 0;
  DType dtype = DType::kBFloat16;
  DType weights_dtype = DType::kFloat32;
};

// FP8 quantization, as moe_gemm/_ops.py's quantize_fp8_torch computes it, bit for bit: over each group of row r
// (128 columns [128 g, 128 g + 128), or the whole row when group is 0), scale = max(amax / 448, FLT_MIN) in
// float32, and x_fp8[r, c] = x[r, c] / scale saturated to +-448 and rounded to the nearest float8_e4m3fn (even on
// ties). A NaN or +-inf makes its group's amax and scale NaN or inf, and the group dequantizes to NaN. E.g. a group
// whose largest magnitude is 3.5 gets scale 3.5 / 448 = 0.0078125, and its 3.5 becomes 448. The scale is the product
// amax * (1 / 448), as torch on CUDA computes it. One warp per (row, group of 128); one block per row for a whole
// row, which it reads twice.
struct QuantizeFp8Params {
  void const* x = nullptr;  // [rows, K], rows ld elements apart, inner stride 1
  int64_t ld = 0;
  uint8_t* x_fp8 = nullptr;  // [rows, K] contiguous float8_e4m3fn
  float* scale = nullptr;    // [rows, ceil(K / 128)] contiguous, or [rows] when group is 0
  int64_t rows = 0;
  int64_t K = 0;
  int32_t group = 128;  // 128 or 0
  DType dtype = DType::kBFloat16;
};

// FP8 quantization of expert weights in 128 x 128 blocks, as moe_gemm/layer_fp8.py's quantize_fp8_weight computes it
// in PyTorch ops, bit for bit: over block (e, i, j) = rows [128 i, 128 i + 128) x columns [128 j, 128 j + 128) of
// weight[e] (the last blocks partial), scale = max(amax / 448, FLT_MIN) and values = weight / scale saturated to
// +-448 and rounded to the nearest float8_e4m3fn, as QuantizeFp8Params does per row group. The weight is read as
// stored, [E, A, B] with B contiguous; with `transposed` the values and scales are written as those of its transpose
// [E, B, A] (the backward's layout: the blocks are the same, so this is the stored weight's quantization,
// transposed). E.g. A = 200, B = 72: two blocks per expert, rows 0-127 and 128-199, each one block of columns.
// A thread block per SM or two, each quantizing one weight block after another: the block is loaded into shared
// memory in 16-byte vectors (the next one's loads in flight meanwhile), the thread block reduces its amax, and each
// thread writes its values, or for `transposed` puts them in shared memory, from where each thread writes eight
// values of a column of the stored block (a row of the output) at a time.
struct QuantizeFp8WeightParams {
  void const* weight = nullptr;  // [E, A, B]: 16-byte aligned, rows stride_a, experts stride_e elements apart
  int64_t stride_e = 0;          // both multiples of 8
  int64_t stride_a = 0;
  uint8_t* values = nullptr;  // float8_e4m3fn [E, A, B], or [E, B, A] when transposed; contiguous
  float* scale = nullptr;     // [E, ceil(A / 128), ceil(B / 128)], or [E, ceil(B / 128), ceil(A / 128)]; contiguous
  int64_t E = 0;
  int64_t A = 0;  // a multiple of 8 when transposed (the op asks it of both sides)
  int64_t B = 0;  // a multiple of 8
  bool transposed = false;
  DType dtype = DType::kBFloat16;
};

// Expert parallelism's pull (moe_gemm/distributed.py, SymmetricMemoryTransport): copies blocks of rows out of the
// peers' symmetric buffers, which this GPU reads over NVLink. For each source s < num_sources, rows i < counts[s]
// (never more than max_rows) of the block that starts at row src_start[s] of peer s's region go to row
// dst_start[s] + i of out. Peer s's region begins region_offset bytes into its buffer, peer_ptrs[s] (the device
// array of torch's symmetric memory, buffer_ptrs_dev). Rows are row_bytes long (a multiple of 16) and contiguous;
// rows of out outside the blocks are not written. E.g. W = 2, this rank 1, counts [3, 0], src_start [5, 0],
// dst_start [0, 0]: out[0..2] = rows 5..7 of rank 0's region. The sizes live on the GPU (no host sync); the grid is
// sized by max_rows, so that a CUDA graph replays it with any counts.
struct PullRowsParams {
  void const* const* peer_ptrs = nullptr;  // [num_sources], device memory
  int64_t region_offset = 0;              // bytes
  int64_t const* src_start = nullptr;     // [num_sources], rows
  int64_t const* dst_start = nullptr;     // [num_sources], rows
  int64_t const* counts = nullptr;        // [num_sources]
  void* out = nullptr;
  int64_t row_bytes = 0;
  int64_t max_rows = 0;  // counts[s] <= max_rows
  int32_t num_sources = 0;
};

// Asynchronous launches on `stream` (nothing for empty inputs); each returns the launch status.
cudaError_t run_dispatch(DispatchParams const& params, cudaStream_t stream);
cudaError_t run_gated_activation(GatedActivationParams const& params, cudaStream_t stream);
cudaError_t run_gated_activation_backward(GatedActivationBackwardParams const& params, cudaStream_t stream);
cudaError_t run_combine(CombineParams const& params, cudaStream_t stream);
cudaError_t run_quantize_fp8(QuantizeFp8Params const& params, cudaStream_t stream);
cudaError_t run_quantize_fp8_weight(QuantizeFp8WeightParams const& params, cudaStream_t stream);
cudaError_t run_pull_rows(PullRowsParams const& params, cudaStream_t stream);

}  // namespace moe_gemm
