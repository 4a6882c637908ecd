// Host dispatch: argument checks, the tile-configuration heuristic, and the switch over the
// explicit kernel instantiations. Plain C++ (no CUTLASS, no torch) so it compiles in seconds.
#include "cuda_context.h"
#include "moe_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "moe_gemm_workspace.h"

namespace moe_gemm {

template <DType kDType, bool kBNMajor, TileConfig kConfig>
cudaError_t run_sm90_moe_gemm(GroupedGemmParams const& params, cudaStream_t stream);

namespace {

bool aligned16(void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

// The heuristic, from host-known shapes only (the per-expert sizes stay on the GPU). With balanced
// routing an expert gets r = M / min(E, M) rows and does 2 * r * N * K FLOPs on 2 * N * K bytes of
// weights: r FLOPs per weight byte. Up to one m-block per expert (r <= 128) the GEMM streams weights
// and the smaller 128x128 tile wins: twice as many CTAs keep loads in flight. Beyond it, 128x256 tiles
// reuse each loaded byte twice as often and win, already at 136 rows, below the H100's ridge point
// (~790 TFLOP/s / 3 TB/s ~ 260): Qwen1.5 at 2048 tokens (M = 8192, E = 60, r = 136, N = 2816 / 2048),
// forward 1.070x / 1.102x torch._grouped_mm against 1.008x / 1.084x with 128x128, dgrad 1.077x / 1.096x
// against 1.025x / 1.075x; at r = 128 (Qwen3, 2048 tokens) the two tie (within 3% either way), at
// r = 64 (DeepSeek-V3, GPT-OSS) 128x128 leads by 1-3% (H100, 2026-11-23, scripts/ab_env.py
// MOE_GEMM_TILE_CONFIG=auto MOE_GEMM_TILE_CONFIG=128x128 MOE_GEMM_TILE_CONFIG=128x256 --tokens 2048).
// Between 256 and 1024 rows (a few m-blocks per expert, the prefill of many-expert models) clusters of
// two CTAs on neighbouring n-blocks sharing the A tile win too: a sixth less traffic from L2, in a
// kernel that is power-bound there (DeepSeek-V3 at 16k tokens: forward 1.153x / 1.174x torch against
// 1.023x / 1.113x with 128x256, dgrad 1.147x / 1.130x against 1.049x / 1.015x). Not when N has an odd
// number of 256-column blocks, which the pairs round up by one more: then clusters on neighbouring
// m-blocks (GPT-OSS up at 16k tokens, N = 5760 in 23 blocks: 1.105x against 1.077x, and 1.104x
// against 1.061x in an earlier session). Not for longer experts either, where it measured no better
// (Mixtral, Qwen3 at 16k tokens).
// From 2048 rows (16 or more m-blocks per expert, so that pairing m-blocks almost never leaves a CTA
// without rows) clusters on neighbouring m-blocks sharing the B tile: 1-2% faster than 128x256 on
// Mixtral at 16k tokens, but 3-8% slower at 1024-1092 rows (Qwen3 and Qwen1.5 at 16k tokens), timed
// in turn with torch._grouped_mm (docs/benchmark_history.md, "Tile configurations").
// Examples: Qwen3 at 2048 tokens (M = 16384, E = 128): r = 128 -> 128x128 (0.355 ms vs 0.374);
// Mixtral at 16k tokens (M = 32768, E = 8): r = 4096 -> 128x256c2x1 (up 11.25 ms vs 11.45);
// DeepSeek-V3 at 16k tokens (M = 131072, E = 256, N = 4096 / 7168): r = 512 -> 128x256c1x2
// (13.5 ms vs 13.8 up, 7.6 vs 7.8 down), measured on an H100 in bf16 with randn data
// (scripts/compare_tile_configs.sh; docs/benchmark_history.md, "Tile configurations").
//
// Decode (at most 4 rows per expert): each tile streams a block of one expert's weights, and what
// counts is how many weight bytes each SM keeps in flight. The swapped 16x128 tile loads 16 token rows
// per stage instead of 128, so its 6 stages hold 192 KB of weights (128x128: 6 stages, 96 KB;
// 128x256: 4 stages, 128 KB). Measured on an H100 (2026-11-22, bf16, in CUDA graphs,
// `MOE_GEMM_CONFIGS="auto 16x128s" scripts/compare_tile_configs.sh OUT --decode`, two runs), it beat
// the previous choice (128x128, or 128x256 above 1.25 waves of 128x128 tiles) on all 70 decode
// shapes, 1 to 64 tokens, by 3-23%: Qwen3 up at 1 token 31.0 us vs 34.7, GPT-OSS down at 4 tokens
// 95 us vs 117.
// Between 4 and 32 rows per expert, routed experts often have more than 16 rows, which the 16-row tile
// takes in two m-blocks, each streaming the weights. The swapped 32x128 tile (5 stages of 32 KB of
// weights and 8 KB of tokens) takes them in one. Measured on an H100 (2026-11-23, scripts/ab_env.py
// MOE_GEMM_TILE_CONFIG=auto MOE_GEMM_TILE_CONFIG=16x128s MOE_GEMM_TILE_CONFIG=32x128s
// MOE_GEMM_TILE_CONFIG=128x128 --kinds forward dgrad --tokens 1 32 192 384 640 768 1280, and 128 to 1024;
// docs/benchmark_history.md, "Session 14"), on geometric mean over the GEMMs of 5 to 31 rows per expert: forward
// ([E, N, K] weights) 0.4% and 3.6% faster than 16x128s below and above 16 rows, 2.2% faster than
// 128x128 (DeepSeek-V3 up at 640 tokens, 20 rows: 1.075x torch._grouped_mm against 0.972x and 1.041x);
// the input gradient ([E, K, N] weights) 0.6% and 5% faster than 16x128s, within 0.5% of 128x128.
// At 1 token it is 1-3% slower than 16x128s, at 32 rows no better than 128x128 (forward +0.2%, input
// gradient -3%), and from 40 rows on slower. Hence 16x128s up to 4 rows, 32x128s below 32.
//
// Few waves of long tiles at up to one m-block per expert: ping-pong 128x128. When the 128x128 tiles
// are at most two per SM (but more than the half of the SMs below which split-K takes over), ping-pong
// measured faster on the two such GEMMs of the suite, Mixtral at 256 tokens (64 rows per expert, 256
// tiles): forward down (K = 14336) 1.031x torch._grouped_mm against 0.975x, dgrad up (K = 28672) 1.014x
// against 0.976x, the same within 0.5% in three runs in one process (H100, 2026-11-23, scripts/ab_env.py
// MOE_GEMM_TILE_CONFIG=auto MOE_GEMM_TILE_CONFIG=128x128pp --tokens 256 --models mixtral-8x7b; session
// 12 had forward down at +3.8%). With many waves it is no better (forward at 2048 tokens, DeepSeek-V3,
// GPT-OSS and Qwen3: 1.103x against 1.109x; Mixtral up at 256 tokens, 1792 tiles: 1.058x against 1.062x).
// Nor with fewer rows: at 8 to 32 rows per expert it was 3-5% slower than 128x128 on Mixtral's few-wave
// GEMMs (input gradient of up at 32, 64 and 128 tokens: 1.000x against 1.058x, 1.064x against 1.117x,
// 1.055x against 1.085x; forward down at 128 tokens 1.010x against 1.057x), so only above 32 rows.
TileConfig choose_tile_config(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count) {
  (void)K;
  constexpr int64_t kDecodeRowsPerExpert = 4;
  constexpr int64_t kSwapped32RowsBelow = 32;
  constexpr int64_t kOneMBlock = 128;
  constexpr int64_t kClusterRowsPerExpert = 256;
  constexpr int64_t kLongExpertRows = 1024;
  constexpr int64_t kVeryLongExpertRows = 2048;
  int64_t const experts_hit = std::max<int64_t>(1, std::min<int64_t>(E, M));
  int64_t const rows_per_expert = M / experts_hit;
  if (rows_per_expert <= kDecodeRowsPerExpert) {
    return TileConfig::k16x128SwapAB;
  }
  if (rows_per_expert < kSwapped32RowsBelow) {
    return TileConfig::k32x128SwapAB;
  }
  if (rows_per_expert <= kOneMBlock) {
    int64_t const tiles = experts_hit * ((N + 127) / 128);
    bool const few_waves = sm_count > 0 && 2 * tiles > sm_count && tiles <= 2 * int64_t(sm_count);
    return few_waves && rows_per_expert > kSwapped32RowsBelow ? TileConfig::k128x128Pingpong : TileConfig::k128x128;
  }
  if (rows_per_expert < kClusterRowsPerExpert) {
    return TileConfig::k128x256;  // (clusters of two measured slower at 136 rows: 1.044x against 1.070x)
  }
  int64_t const n_blocks = (N + 255) / 256;
  if (rows_per_expert < kLongExpertRows && n_blocks >= 2) {
    return n_blocks % 2 == 0 ? TileConfig::k128x256Cluster1x2 : TileConfig::k128x256Cluster2x1;
  }
  return rows_per_expert >= kVeryLongExpertRows ? TileConfig::k128x256Cluster2x1 : TileConfig::k128x256;
}

namespace {

bool is_swapped(TileConfig config) {
  return config == TileConfig::k16x128SwapAB || config == TileConfig::k32x128SwapAB;
}

// Rows, columns and k-block of a configuration's tile.
int64_t tile_m_of(TileConfig config) {
  return config == TileConfig::k16x128SwapAB ? 16 : config == TileConfig::k32x128SwapAB ? 32 : 128;
}
int64_t tile_n_of(TileConfig config) {
  return config == TileConfig::k128x128 || config == TileConfig::k128x128Pingpong || is_swapped(config) ? 128 : 256;
}
int64_t tile_k_of(TileConfig config) { return is_swapped(config) ? 128 : 64; }

bool has_split_k(TileConfig config) { return config == TileConfig::k128x128 || is_swapped(config); }

}  // namespace

// Split-K, from host-known shapes only, for the 16x128s and 128x128 tiles (the configurations with a
// split-K instantiation; the tile heuristic picks 16x128s for the few rows per expert that split-K is
// for). With few rows per expert each tile is one SM streaming a 128 x K block of weights. Splitting pays
// only when the tiles leave at least half the SMs idle: measured on an H100 (bench --decode,
// 2026-11-22, in CUDA graphs), the partial-tile traffic and the last split's reduction cost more than
// what the idle SMs would add above that. T is the most tiles the sizes allow
// (max_m_blocks x ceil(N / 128): min(E, M) experts hit for small M); S = floor(SMs / T), with at least
// 1024 of K per split and S <= 16.
// Measured examples (132 SMs, in a CUDA graph, split vs no split):
//   Mixtral-8x7B down, 1 token (M = 2, E = 8, N = 4096, K = 14336): T = 2 x 32 = 64 -> S = 2: 97 us vs 100
//     (16x128s; 104 us vs 146 with 128x128 tiles, which keep half the weight bytes in flight).
//   Qwen1.5-MoE down, 1 token (M = 4, E = 60, N = 2048, K = 1408): T = 64 but K < 2 x 1024 -> no split: with
//     16x128s tiles a split of 2 measured 21.8 us vs 19.1 (with 128x128 tiles it had gained, 22.6 vs 23.5).
//   Qwen3-30B up, 1 token (M = 8, E = 128, N = 1536): T = 96 -> no split (split 4 measured 43 us vs 36).
//   GPT-OSS down, 1 token (M = 4, N = 2880): T = 92 -> no split (split 4 measured 59 us vs 45).
int choose_split_k(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count, TileConfig config) {
  constexpr int64_t kMaxSplitK = 16;
  constexpr int64_t kMinKPerSplit = 1024;
  if (!has_split_k(config) || M <= 0 || N <= 0 || K <= 0 || E <= 0 || sm_count <= 0) {
    return 1;
  }
  int64_t const tiles = max_m_blocks(M, E, tile_m_of(config)) * ((N + tile_n_of(config) - 1) / tile_n_of(config));
  if (2 * tiles > int64_t(sm_count)) {
    return 1;
  }
  int64_t const max_split = std::max<int64_t>(1, std::min(kMaxSplitK, K / kMinKPerSplit));
  return int(std::min(max_split, int64_t(sm_count) / std::max<int64_t>(tiles, 1)));
}

namespace {

int current_sm_count() {
  int device = 0, sm_count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  return sm_count;
}

TileConfig resolved_config(GroupedGemmParams const& p) {
  if (p.config != TileConfig::kAuto) {
    return p.config;
  }
  return choose_tile_config(p.M, p.N, p.K, p.E, p.sm_count > 0 ? p.sm_count : current_sm_count());
}

// Dynamic scheduling pays when tiles come in several waves (CTAs drift apart over the waves, and a
// weight tile shared by CTAs that no longer run together is read from DRAM again); a one-wave decode
// problem skips the counter and its memset. In a cluster, rank 0 takes the units for both CTAs.
bool use_dynamic_schedule(GroupedGemmParams const& p) {
  if (p.dynamic_schedule >= 0) {
    return p.dynamic_schedule == 1;
  }
  TileConfig const config = resolved_config(p);
  int64_t const tile_m = tile_m_of(config), tile_n = tile_n_of(config);
  int64_t const tiles_upper = ((p.M + tile_m - 1) / tile_m + std::min<int64_t>(p.E, p.M)) * ((p.N + tile_n - 1) / tile_n);
  int const sm_count = p.sm_count > 0 ? p.sm_count : current_sm_count();
  return tiles_upper >= 4 * int64_t(sm_count);
}

bool nothing_to_multiply(GroupedGemmParams const& p) { return p.M <= 0 || p.N <= 0 || p.K <= 0 || p.E <= 0; }

WorkspaceLayout resolved_workspace_layout(GroupedGemmParams const& p) {
  if (nothing_to_multiply(p)) {
    return WorkspaceLayout{};
  }
  TileConfig const config = resolved_config(p);
  return workspace_layout(p.M, p.N, p.E, int(tile_m_of(config)), int(tile_n_of(config)), use_dynamic_schedule(p),
                          resolved_split_k(p));
}

}  // namespace

// An explicit split is clamped to the k-blocks (no empty split); only the decode tiles split.
int resolved_split_k(GroupedGemmParams const& p) {
  TileConfig const config = resolved_config(p);
  if (!has_split_k(config) || nothing_to_multiply(p)) {
    return 1;
  }
  int64_t const split = p.split_k > 0 ? p.split_k
                                      : choose_split_k(p.M, p.N, p.K, p.E,
                                                       p.sm_count > 0 ? p.sm_count : current_sm_count(), config);
  int64_t const clamped = std::clamp<int64_t>(split, 1, (p.K + tile_k_of(config) - 1) / tile_k_of(config));
  // The kernel counts work units in 32 bits.
  int64_t const tile_slots =
      max_m_blocks(p.M, p.E, tile_m_of(config)) * ((p.N + tile_n_of(config) - 1) / tile_n_of(config));
  return tile_slots * clamped < (int64_t(1) << 30) ? int(clamped) : 1;
}

bool resolved_dynamic_schedule(GroupedGemmParams const& params) {
  return !nothing_to_multiply(params) && use_dynamic_schedule(params);
}

size_t grouped_gemm_workspace_bytes(GroupedGemmParams const& params) {
  return resolved_workspace_layout(params).total_bytes;
}

size_t grouped_gemm_workspace_zeroed_bytes(GroupedGemmParams const& params) {
  return resolved_workspace_layout(params).zeroed_bytes;
}

bool parse_tile_config(char const* name, TileConfig* config) {
  struct Named { char const* name; TileConfig config; };
  static Named const names[] = {{"auto", TileConfig::kAuto},
                                {"128x256", TileConfig::k128x256},
                                {"128x128", TileConfig::k128x128},
                                {"128x256c2x1", TileConfig::k128x256Cluster2x1},
                                {"128x256c1x2", TileConfig::k128x256Cluster1x2},
                                {"128x128pp", TileConfig::k128x128Pingpong},
                                {"16x128s", TileConfig::k16x128SwapAB},
                                {"32x128s", TileConfig::k32x128SwapAB}};
  for (Named const& named : names) {
    if (std::strcmp(name, named.name) == 0) {
      *config = named.config;
      return true;
    }
  }
  return false;
}

char const* tile_config_name(TileConfig config) {
  switch (config) {
    case TileConfig::k128x256: return "128x256";
    case TileConfig::k128x128: return "128x128";
    case TileConfig::k128x256Cluster2x1: return "128x256c2x1";
    case TileConfig::k128x256Cluster1x2: return "128x256c1x2";
    case TileConfig::k128x128Pingpong: return "128x128pp";
    case TileConfig::k16x128SwapAB: return "16x128s";
    case TileConfig::k32x128SwapAB: return "32x128s";
    default: return "auto";
  }
}

char const* check_grouped_gemm(GroupedGemmParams const& p) {
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.E < 0) {
    return "sizes must be non-negative";
  }
  if (p.M >= (int64_t(1) << 31) || p.N >= (int64_t(1) << 31) || p.K >= (int64_t(1) << 31)) {
    return "M, N and K must each be below 2^31 (TMA coordinates are 32-bit)";
  }
  if (p.N % 8 != 0 || p.K % 8 != 0) {
    return "N and K must be multiples of 8 (rows of 16 bytes for TMA)";
  }
  if (p.lda % 8 != 0 || p.ldb % 8 != 0 || p.batch_stride_b % 8 != 0 || p.ldd % 8 != 0) {
    return "row and expert strides must be multiples of 8 elements (16 bytes)";
  }
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.d)) {
    return "A, B and D must start at 16-byte aligned addresses";
  }
  if (p.E > 0 && p.m_sizes == nullptr) {
    return "m_sizes is null";
  }
  return nullptr;
}

cudaError_t run_grouped_gemm(GroupedGemmParams const& params, cudaStream_t stream) {
  if (check_grouped_gemm(params) != nullptr) {
    return cudaErrorInvalidValue;
  }
  if (params.M == 0 || params.N == 0) {
    return cudaSuccess;
  }
  if (params.K == 0 || params.E == 0) {
    // Nothing to multiply: every row is either an empty sum or past the last expert.
    return cudaMemset2DAsync(params.d, params.ldd * 2, 0, params.N * 2, params.M, stream);
  }
  if (cudaError_t status = make_device_context_current(); status != cudaSuccess) {
    return status;  // the TMA descriptors are encoded through the driver API
  }
  if (grouped_gemm_workspace_bytes(params) > 0 && params.workspace == nullptr) {
    return cudaErrorInvalidValue;  // the caller must provide the workspace, its counters zeroed
  }
  // The kernels get every choice made: configuration, schedule and split.
  GroupedGemmParams p = params;
  p.config = resolved_config(params);
  p.dynamic_schedule = use_dynamic_schedule(params) ? 1 : 0;
  p.split_k = resolved_split_k(params);
  TileConfig const config = p.config;

#define MOE_GEMM_DISPATCH_CONFIG(DTYPE, N_MAJOR)                                              \
  switch (config) {                                                                           \
    case TileConfig::k128x128:                                                                \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x128>(p, stream);  \
    case TileConfig::k128x256Cluster2x1:                                                      \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x256Cluster2x1>(p, stream); \
    case TileConfig::k128x256Cluster1x2:                                                      \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x256Cluster1x2>(p, stream); \
    case TileConfig::k128x128Pingpong:                                                        \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x128Pingpong>(p, stream); \
    case TileConfig::k16x128SwapAB:                                                           \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k16x128SwapAB>(p, stream);  \
    case TileConfig::k32x128SwapAB:                                                           \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k32x128SwapAB>(p, stream);  \
    default:                                                                                  \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x256>(p, stream);  \
  }

  if (params.dtype == DType::kBFloat16) {
    if (params.b_n_major) {
      MOE_GEMM_DISPATCH_CONFIG(kBFloat16, true)
    }
    MOE_GEMM_DISPATCH_CONFIG(kBFloat16, false)
  }
  if (params.b_n_major) {
    MOE_GEMM_DISPATCH_CONFIG(kFloat16, true)
  }
  MOE_GEMM_DISPATCH_CONFIG(kFloat16, false)
#undef MOE_GEMM_DISPATCH_CONFIG
}

}  // namespace moe_gemm
