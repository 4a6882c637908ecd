// Host dispatch: argument checks, the tile-configuration heuristic, and the switch over the
// explicit kernel instantiations. Plain C++ (no CUTLASS, no torch) so it compiles in seconds.
#include "moe_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace moe_gemm {

template <DType kDType, bool kBNMajor, TileConfig kConfig>
cudaError_t run_sm90_moe_gemm(GroupedGemmParams const& params, cudaStream_t stream);

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Host-side estimate of how long a configuration takes: whole waves of cluster tiles over the
// SMs, each wave as long as one CTA tile. Counts come from M, E, N alone (the per-expert sizes stay on
// the GPU), assuming balanced routing over min(E, M) experts with ceil(M / experts) rows each.
double estimated_cost(int64_t M, int64_t N, int32_t E, int sm_count, int tile_m, int tile_n, int cluster_m,
                      double tile_speed) {
  int64_t const experts_hit = std::max<int64_t>(1, std::min<int64_t>(E, M));
  int64_t const rows_per_expert = ceil_div(M, experts_hit);
  int64_t const cluster_tiles =
      experts_hit * ceil_div(ceil_div(rows_per_expert, tile_m), cluster_m) * ceil_div(N, tile_n);
  int64_t const waves = ceil_div(cluster_tiles, std::max(sm_count / cluster_m, 1));
  return double(waves) * tile_m * tile_n / tile_speed;
}

}  // namespace

// Worked examples, 132 SMs (cost = waves * tile area / speed):
// DeepSeek-V3 up-projection at 16k tokens (M = 131072, E = 256, N = 4096): 512 rows per expert.
//   128x256:    256 * 4 * 16 = 16384 tiles   = 125 waves of 132     -> 125 * 32768 / 1.0 = 4.10M
//   128x128:    32768 tiles                  = 249 waves of 132     -> 249 * 16384 / 0.9 = 4.53M
//   128x256 c2: 256 * 2 * 16 = 8192 clusters = 125 waves of 66 pairs -> 125 * 32768 / 1.1 = 3.72M: wins.
// Qwen3 down-projection at 1 token (M = 8, E = 128, N = 2048): 8 experts with one row each.
//   128x256: 64 tiles = 1 wave -> 32768;  128x256 c2: 1 wave -> 29789 (half its CTAs idle);
//   128x128: 128 tiles = 1 wave -> 18204: wins (twice as many SMs stream the same weights).
TileConfig choose_tile_config(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count) {
  (void)K;
  // Relative speed per FLOP of a full wave: 128x128 tiles reuse each loaded byte half as often as
  // 128x256 ones; clusters halve the B traffic from L2.
  struct Candidate { TileConfig config; int tile_m, tile_n, cluster_m; double speed; };
  Candidate const candidates[] = {
      {TileConfig::k128x256, 128, 256, 1, 1.0},
      {TileConfig::k128x128, 128, 128, 1, 0.9},
      {TileConfig::k128x256Cluster2, 128, 256, 2, 1.1},
  };
  TileConfig best = TileConfig::k128x256;
  double best_cost = 0;
  for (Candidate const& c : candidates) {
    double const cost = estimated_cost(M, N, E, sm_count, c.tile_m, c.tile_n, c.cluster_m, c.speed);
    if (best_cost == 0 || cost < best_cost) {
      best = c.config;
      best_cost = cost;
    }
  }
  return best;
}

bool parse_tile_config(char const* name, TileConfig* config) {
  struct Named { char const* name; TileConfig config; };
  static Named const names[] = {{"auto", TileConfig::kAuto},
                                {"128x256", TileConfig::k128x256},
                                {"128x128", TileConfig::k128x128},
                                {"128x256c2", TileConfig::k128x256Cluster2}};
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
    case TileConfig::k128x256Cluster2: return "128x256c2";
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
  // Building the TMA descriptors calls the driver API, which needs a current context in this thread.
  // A fresh thread (PyTorch's autograd workers) may have none yet: cudaSetDevice makes the primary
  // context current, once per thread and device.
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }
  thread_local int context_device = -1;
  if (context_device != device) {
    status = cudaSetDevice(device);
    if (status != cudaSuccess) {
      return status;
    }
    context_device = device;
  }
  TileConfig config = params.config;
  if (config == TileConfig::kAuto) {
    int sm_count = params.sm_count;
    if (sm_count <= 0) {
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
    }
    config = choose_tile_config(params.M, params.N, params.K, params.E, sm_count);
  }

#define MOE_GEMM_DISPATCH_CONFIG(DTYPE, N_MAJOR)                                              \
  switch (config) {                                                                           \
    case TileConfig::k128x128:                                                                \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x128>(params, stream);  \
    case TileConfig::k128x256Cluster2:                                                        \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x256Cluster2>(params, stream); \
    default:                                                                                  \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x256>(params, stream);  \
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
