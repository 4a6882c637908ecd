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

bool aligned16(void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

// The heuristic, from host-known shapes only (the per-expert sizes stay on the GPU). With balanced
// routing an expert gets r = M / min(E, M) rows and does 2 * r * N * K FLOPs on 2 * N * K bytes of
// weights: r FLOPs per weight byte. Below the H100's ridge point (~790 TFLOP/s / 3 TB/s ~ 260) the
// GEMM streams weights and the smaller 128x128 tile wins: twice as many CTAs keep loads in flight.
// Above it, 128x256 tiles reuse each loaded byte twice as often and win.
// Examples: Qwen3 at 2048 tokens (M = 16384, E = 128): r = 128 -> 128x128 (0.355 ms vs 0.374);
// DeepSeek-V3 at 16k tokens (M = 131072, E = 256): r = 512 -> 128x256 (14.4 ms vs 16.2), measured on
// an H100 with scripts/compare_tile_configs.sh. The cluster config is never picked: it measured
// slower than 128x256 on most suite shapes (see BENCHMARKS.md).
TileConfig choose_tile_config(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count) {
  (void)N;
  (void)K;
  (void)sm_count;
  constexpr int64_t kRidgeRowsPerExpert = 256;
  int64_t const experts_hit = std::max<int64_t>(1, std::min<int64_t>(E, M));
  int64_t const rows_per_expert = M / experts_hit;
  return rows_per_expert < kRidgeRowsPerExpert ? TileConfig::k128x128 : TileConfig::k128x256;
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
// problem skips the counter and its memset. Clusters keep static striding (both CTAs of a cluster
// must take the same tile).
bool use_dynamic_schedule(GroupedGemmParams const& p) {
  if (p.dynamic_schedule >= 0) {
    return p.dynamic_schedule == 1 && resolved_config(p) != TileConfig::k128x256Cluster2;
  }
  TileConfig const config = resolved_config(p);
  if (config == TileConfig::k128x256Cluster2) {
    return false;
  }
  int64_t const tile_n = config == TileConfig::k128x128 ? 128 : 256;
  int64_t const tiles_upper = ((p.M + 127) / 128 + std::min<int64_t>(p.E, p.M)) * ((p.N + tile_n - 1) / tile_n);
  int const sm_count = p.sm_count > 0 ? p.sm_count : current_sm_count();
  return tiles_upper >= 4 * int64_t(sm_count);
}

}  // namespace

size_t grouped_gemm_workspace_bytes(GroupedGemmParams const& params) {
  if (params.M == 0 || params.N == 0 || params.K == 0 || params.E == 0) {
    return 0;
  }
  return use_dynamic_schedule(params) ? sizeof(int) : 0;
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
  bool const dynamic = grouped_gemm_workspace_bytes(params) > 0;
  if (dynamic && params.workspace == nullptr) {
    return cudaErrorInvalidValue;  // the caller must provide the zeroed tile counter
  }
  GroupedGemmParams p = params;
  p.workspace = dynamic ? params.workspace : nullptr;
  TileConfig const config = resolved_config(p);

#define MOE_GEMM_DISPATCH_CONFIG(DTYPE, N_MAJOR)                                              \
  switch (config) {                                                                           \
    case TileConfig::k128x128:                                                                \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x128>(p, stream);  \
    case TileConfig::k128x256Cluster2:                                                        \
      return run_sm90_moe_gemm<DType::DTYPE, N_MAJOR, TileConfig::k128x256Cluster2>(p, stream); \
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
