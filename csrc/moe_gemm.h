// The seam between the kernels and their callers (the torch binding and the C++ profiler):
// plain pointers, sizes and strides, no torch types. Everything here is host code.
//
// A call is planned once, then run: plan_grouped_gemm() resolves the tile configuration, split-K, the
// tile schedule and the workspace layout from host-known shapes (the per-expert sizes stay on the GPU),
// and run_grouped_gemm() launches what the plan says. The caller allocates plan.workspace.total_bytes of
// device memory; run_grouped_gemm zeroes the counters at its start before each launch, in stream order.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "moe_activation.h"
#include "moe_dtype.h"
#include "moe_gemm_workspace.h"
#include "moe_tile_configs.h"

namespace moe_gemm {

// The table's names (moe_tile_configs.h) and "auto" <-> TileConfig; parse returns false for an unknown name.
bool parse_tile_config(char const* name, TileConfig* config);
char const* tile_config_name(TileConfig config);

// D[offs[e] + i, :] = A[offs[e] + i, :] @ B[e]^T for i < m_sizes[e], offs = exclusive prefix sum of
// m_sizes; rows of D past the last expert are written as zeros. With gather_rows, row r of A is row
// gather_rows[r] of `a` (the MoE layer's hidden[token_of_row], never materialised).
struct GroupedGemmParams {
  void const* a = nullptr;        // [M, K] (gathering: [gather_source_rows, K]), row stride lda (elements),
                                  // inner stride 1
  void const* b = nullptr;        // [E, N, K] (b_n_major = false) or [E, K, N] (b_n_major = true)
  void* d = nullptr;              // [M, N], row stride ldd, inner stride 1
  void const* m_sizes = nullptr;  // [E] counts in device memory, int32 or int64
  bool m_sizes_int64 = false;
  bool b_n_major = false;         // the weight_transposed layout: B[e] is [K, N] with N contiguous
  DType dtype = DType::kBFloat16; // kBFloat16 or kFloat16
  int64_t M = 0, N = 0, K = 0;
  int32_t E = 0;
  int64_t lda = 0;                // elements between rows of A
  int64_t ldb = 0;                // elements between rows of B[e] (between n for K-major, between k for N-major)
  int64_t batch_stride_b = 0;     // elements between B[e] and B[e + 1]
  int64_t ldd = 0;                // elements between rows of D
  int sm_count = 0;               // persistent grid size; 0 = query the current device
  // Device memory of the plan's workspace.total_bytes; null when that is 0.
  void* workspace = nullptr;
  // [M] int64 in device memory, or null for no gather. Values are not checked: one outside
  // [0, gather_source_rows) reads a row of zeros (cp.async's zero-fill; nothing outside `a` is read).
  int64_t const* gather_rows = nullptr;
  int64_t gather_source_rows = 0;  // rows of `a` when gathering (1 to 2^31 - 1)
  // The gated activation in the epilogue (gate_up_layout not kNone; the op grouped_mm_gated): D's N = 2I columns
  // are gate and up, laid out as gate_up_layout says (so are the weight's N rows); the call writes
  // activated[r, i] = act(gate[r, i]) * up[r, i] ([M, I], rounded as moe_layer_kernels.h's gated activation of the
  // 16-bit D) and D itself only when d is not null. Rows past the last expert are zeros in both.
  GateUpLayout gate_up_layout = GateUpLayout::kNone;
  GatedActivation activation = GatedActivation::kSilu;
  void* activated = nullptr;      // [M, I], row stride ld_activated, inner stride 1
  int64_t ld_activated = 0;
};

// What tests and A/B measurements may force instead of the heuristics. check_plan_override() says whether
// an override is valid; plan_grouped_gemm() expects one that is.
struct PlanOverride {
  TileConfig config = TileConfig::kAuto;
  // 0: choose_split_k(); 1: never split; n: n splits, clamped to the k-blocks and to 2^30 work units.
  // n > 1 needs a configuration with a split-K instantiation (moe_tile_configs.h), or kAuto (then the
  // heuristic's configuration splits if it has one).
  int split_k = 0;
  int dynamic_schedule = -1;  // -1: the heuristic; 0: static striding; 1: tile counter in the workspace
};

// Nullptr when `override` is valid, else a sentence saying what is wrong: a split below 0, a split above 1
// for a configuration without a split-K kernel, a schedule other than -1, 0 or 1.
char const* check_plan_override(PlanOverride const& override);

// Every choice of one call, made once from host-known shapes; the launcher reads it and derives nothing.
struct GroupedGemmPlan {
  TileConfig config = TileConfig::kAuto;  // never kAuto when there is something to multiply
  int split_k = 1;                        // >= 1; above 1 only for configurations with split-K
  bool dynamic_schedule = false;
  int sm_count = 0;                       // the SMs the persistent grid may use
  int64_t max_units = 0;                  // the most work units (cluster tiles x splits) the sizes allow
  WorkspaceLayout workspace;              // counters (zeroed by run_grouped_gemm) and split-K partials
  // A gated call (gate_up_layout not kNone): whether `config` runs the gated epilogue. When false (a tile other
  // than 128x256 planned, or concatenated halves with I not a multiple of 128), run_grouped_gemm refuses
  // the plan, and the caller runs the plain GEMM (the same params with gate_up_layout kNone) then the separate
  // activation (moe_layer_kernels.h): check_grouped_gemm_plan says why.
  bool gated = false;
};

// Returns the configuration the heuristic picks for these shapes (never kAuto). Only the rows per expert
// and N decide it. A gathering call runs gather_tile_config() of it.
TileConfig choose_tile_config(int64_t M, int64_t N, int32_t E);

// The configuration that gathers A's rows in place of `config` (not kAuto): itself where its row has a
// gathering kernel, else the one without clusters or swapped operands of the same tile width (128x256 for
// its clusters, 128x128 for the swapped decode tiles, which keeps split-K for decode).
TileConfig gather_tile_config(TileConfig config);

// The configuration with the gated epilogue in place of `config` (not kAuto) for I = N / 2 output columns, or kAuto
// for none: 128x256 (the one gated tile) in place of 128x256 and its clusters; none for the narrower tiles (128x128,
// which the heuristic picks at 128 rows per expert or fewer, and the swapped decode tiles: the activation stays a
// kernel of its own there) nor for concatenated halves when I is not a multiple of 128.
TileConfig gated_tile_config(TileConfig config, int64_t I, GateUpLayout layout);

// The split-K factor the heuristic picks for these shapes and a resolved (not kAuto) configuration:
// 1 unless the tiles are too few to keep every SM streaming weights (decode).
int choose_split_k(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count, TileConfig config);

// Checks what the kernel can read (alignment, strides, sizes); returns nullptr when it can,
// else a sentence saying what is wrong.
char const* check_grouped_gemm(GroupedGemmParams const& params);

// The plan of a call: the override's fields where set, else the heuristics. Reads params' sizes, whether it
// gathers, and sm_count only (queries the current device when sm_count is 0). The override must pass
// check_plan_override(); an explicit split is clamped to the k-blocks and to 2^30 work units. An override's
// configuration is kept as is, also one that cannot gather for a gathering call: check_grouped_gemm_plan
// refuses that plan.
GroupedGemmPlan plan_grouped_gemm(GroupedGemmParams const& params, PlanOverride const& override = PlanOverride{});

// Nullptr when run_grouped_gemm can run `plan` for `params`, else a sentence saying what is wrong (a gathering
// call planned with a configuration that has no gathering kernel: an override's).
char const* check_grouped_gemm_plan(GroupedGemmParams const& params, GroupedGemmPlan const& plan);

// Zeroes the workspace's counters, then launches the grouped GEMM on `stream`, as `plan` says.
// Asynchronous; returns the launch status (cudaErrorInvalidValue for what check_grouped_gemm or
// check_grouped_gemm_plan refuses).
cudaError_t run_grouped_gemm(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream);

// The float32 scales of an FP8 grouped GEMM, device memory (Fp8Scales in moe_dtype.h):
//   kRowwise:   x_scale [M], w_scale [E, N];
//   kBlockwise: x_scale [M, x_groups] with x_groups = ceil(K / 128), or [M] with x_groups = 0;
//               w_scale [E, ceil(N / 128), ceil(K / 128)] (DeepSeek-V3's weight_scale_inv).
struct Fp8ScaleParams {
  Fp8Scales kind = Fp8Scales::kRowwise;
  float const* x_scale = nullptr;
  float const* w_scale = nullptr;
  int32_t x_groups = 0;
};

// The grouped GEMM of FP8 e4m3 operands, `a` [M, K] and `b` [E, N, K] (K-major only), into bf16 `d`:
// d[r, c] = sum_k (a[r, k] * x scale) * (b[e, c, k] * w scale). params.dtype is the output's (bf16); N, K, lda, ldb
// and batch_stride_b must be multiples of 16 (16-byte rows). plan_grouped_gemm_fp8 plans it (rowwise: 128x256,
// 128x128 or 32x128s tiles; blockwise: 128x256 or 128x128; no split-K); run_grouped_gemm_fp8 checks and launches,
// as run_grouped_gemm.
GroupedGemmPlan plan_grouped_gemm_fp8(GroupedGemmParams const& params, Fp8Scales scales,
                                      PlanOverride const& override = PlanOverride{});
char const* check_grouped_gemm_fp8(GroupedGemmParams const& params, Fp8ScaleParams const& scales,
                                   GroupedGemmPlan const& plan);
cudaError_t run_grouped_gemm_fp8(GroupedGemmParams const& params, Fp8ScaleParams const& scales,
                                 GroupedGemmPlan const& plan, cudaStream_t stream);

// Weight gradient, a K-grouped GEMM: the reduction runs over each expert's rows, read from m_sizes on
// the GPU. With L = grad_y, R = x (weight [E, N, K]) or L = x, R = grad_y (weight_transposed, [E, K, N]):
//   D[e] (P x Q) = L_e^T @ R_e,  L_e = L[offs[e] : offs[e] + m_sizes[e], :] ([rows, P]), R_e likewise ([rows, Q]).
// An expert without rows gets an exact zero (or, accumulating, is left as it was); rows past the last
// expert contribute nothing. With l_rows (r_rows), row i of L (R) is row l_rows[i] of `l` (r_rows[i] of `r`): the
// MoE layer's hidden[token_of_row] and grad_out[token_of_row], never materialised.
struct GroupedWgradParams {
  void const* l = nullptr;        // [M, P] (gathering L: [l_source_rows, P]), row stride ldl, inner stride 1
  void const* r = nullptr;        // [M, Q] (gathering R: [r_source_rows, Q]), row stride ldr, inner stride 1
  void* d = nullptr;              // [E, P, Q], rows of ldd elements, experts batch_stride_d apart
  void const* m_sizes = nullptr;  // [E] counts in device memory, int32 or int64
  bool m_sizes_int64 = false;
  DType dtype = DType::kBFloat16; // of l and r: kBFloat16 or kFloat16
  bool d_float32 = false;         // D is float32 (else the input dtype)
  bool accumulate = false;        // D += L^T R (float32 D only): a trainer's main-grad buffer
  int64_t M = 0, P = 0, Q = 0;
  int32_t E = 0;
  int64_t ldl = 0, ldr = 0, ldd = 0, batch_stride_d = 0;
  int sm_count = 0;               // persistent grid size; 0 = query the current device
  // Device memory of the plan's workspace.total_bytes (the tile counter); null when that is 0.
  void* workspace = nullptr;
  // Row gathers: [M] int64 in device memory, or null for none. At most one of the two per call (a kernel gathers
  // one operand), and only into a gradient in the input dtype (no accumulation: the float32 kernels do not gather).
  // Values are not checked: one outside [0, source rows) reads a row of zeros (cp.async's zero-fill; nothing
  // outside the source is read).
  int64_t const* l_rows = nullptr;
  int64_t l_source_rows = 0;      // rows of `l` when gathering L (1 to 2^31 - 1)
  int64_t const* r_rows = nullptr;
  int64_t r_source_rows = 0;      // rows of `r` when gathering R (1 to 2^31 - 1)
};

// Which operand of the weight gradient a kernel reads through a row index.
enum class WgradGather : int { kNone = 0, kL = 1, kR = 2 };

// The weight gradient has one tile configuration and a dynamic schedule always: its plan is the kernel (which
// operand it gathers), the grid bound and the workspace (the tile counter, zeroed by run_grouped_wgrad).
struct GroupedWgradPlan {
  WgradGather gather = WgradGather::kNone;
  int sm_count = 0;
  WorkspaceLayout workspace;
};

// Nullptr when the kernel can run these params, else a sentence saying what is wrong (also: both operands
// gathered, a gather with a float32 gradient or accumulation).
char const* check_grouped_wgrad(GroupedWgradParams const& params);
GroupedWgradPlan plan_grouped_wgrad(GroupedWgradParams const& params);
cudaError_t run_grouped_wgrad(GroupedWgradParams const& params, GroupedWgradPlan const& plan, cudaStream_t stream);

}  // namespace moe_gemm
