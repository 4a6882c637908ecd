// Host dispatch of the grouped GEMM: argument checks, the heuristics, the plan of a call, and the
// switch over the explicit kernel instantiations. Plain C++ (no CUTLASS, no torch) so it compiles in
// seconds. The measurements behind each heuristic are in docs/design.md, "Heuristics".
#include "cuda_context.h"
#include "moe_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace moe_gemm {

template <DType kDType, bool kBNMajor, TileConfig kConfig, bool kGatherA>
cudaError_t run_sm90_moe_gemm(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream);
template <DType kDType, bool kBNMajor, TileConfig kConfig, bool kGatherA, GateUpLayout kGateUp>
cudaError_t run_sm90_moe_gemm_gated(GroupedGemmParams const& params, GroupedGemmPlan const& plan,
                                    cudaStream_t stream);

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// From host-known shapes only: with balanced routing an expert gets r = M / min(E, M) rows and does
// r FLOPs per weight byte, so r decides between streaming weights (small tiles, many CTAs) and reusing
// them (large tiles, clusters). Each branch below with one measured example (H100, bf16); the others,
// and the rejected alternatives, in docs/design.md ("Tile configurations").
TileConfig choose_tile_config(int64_t M, int64_t N, int32_t E) {
  constexpr int64_t kDecodeRowsPerExpert = 4;
  constexpr int64_t kSwapped32RowsBelow = 32;
  constexpr int64_t kOneMBlock = 128;
  constexpr int64_t kClusterRowsPerExpert = 256;
  constexpr int64_t kLongExpertRows = 1024;
  int64_t const experts_hit = std::max<int64_t>(1, std::min<int64_t>(E, M));
  int64_t const rows_per_expert = M / experts_hit;
  // Decode: the swapped 16-row tile keeps 192 KB of weights in flight per SM (128x128: 96 KB).
  // Qwen3 up at 1 token: 31.0 us against 34.7 with 128x128.
  if (rows_per_expert <= kDecodeRowsPerExpert) {
    return TileConfig::k16x128SwapAB;
  }
  // 5 to 31 rows: one 32-row m-block streams the expert's weights once, where 16-row tiles take two.
  // DeepSeek-V3 up at 640 tokens (20 rows): 1.075x torch._grouped_mm against 0.972x (16x128s).
  if (rows_per_expert < kSwapped32RowsBelow) {
    return TileConfig::k32x128SwapAB;
  }
  // Up to one m-block per expert the GEMM streams weights: twice the CTAs of 128x256 keep more loads in
  // flight. DeepSeek-V3 at 2048 tokens (64 rows): 128x128 leads 128x256 by 1-3%.
  if (rows_per_expert <= kOneMBlock) {
    return TileConfig::k128x128;
  }
  // Beyond it 128x256 reuses each loaded byte twice as often. Qwen1.5 at 2048 tokens (136 rows): forward
  // 1.070x torch against 1.008x with 128x128 (clusters of two: 1.044x).
  if (rows_per_expert < kClusterRowsPerExpert) {
    return TileConfig::k128x256;
  }
  // 256 to 1023 rows: pairs of CTAs on neighbouring n-blocks share the A tile (a sixth less L2 traffic);
  // on neighbouring m-blocks when N has an odd number of 256-column blocks. DeepSeek-V3 at 16k tokens
  // (512 rows, N = 4096): 1.153x torch against 1.023x with 128x256.
  int64_t const n_blocks = ceil_div(N, tile_config_info(TileConfig::k128x256Cluster1x2).tile_n);
  if (rows_per_expert < kLongExpertRows && n_blocks >= 2) {
    return n_blocks % 2 == 0 ? TileConfig::k128x256Cluster1x2 : TileConfig::k128x256Cluster2x1;
  }
  // From 1024 rows, plain 128x256: clusters of two are slower or tie. The layer's down-projection at 2048 rows
  // (sonic-4: M = 524288, N = 4096, K = 256): 2.33 ms against 2.47 with 2x1 clusters.
  return TileConfig::k128x256;
}

TileConfig gather_tile_config(TileConfig config) {
  TileConfigInfo const& info = tile_config_info(config);
  if (info.gather_a) {
    return config;
  }
  for (TileConfigInfo const& candidate : kTileConfigs) {
    if (candidate.gather_a && candidate.tile_n == info.tile_n && candidate.cluster_m == 1 &&
        candidate.cluster_n == 1 && !candidate.swap_ab) {
      return candidate.config;
    }
  }
  return TileConfig::k128x128;  // a tile width without a gathering configuration: the narrowest one
}

TileConfig gated_tile_config(TileConfig config, int64_t I, GateUpLayout layout) {
  TileConfigInfo const& info = tile_config_info(config);
  if (info.swap_ab || layout == GateUpLayout::kNone) {
    return TileConfig::kAuto;
  }
  // The widest gated tile no wider than `config`'s whose half divides I (concatenated halves are loaded and
  // stored half a tile at a time); interleaved columns need no such division.
  TileConfig best = TileConfig::kAuto;
  int best_n = 0;
  for (TileConfigInfo const& candidate : kTileConfigs) {
    bool const divides = layout != GateUpLayout::kConcatenated || I % (candidate.tile_n / 2) == 0;
    if (candidate.gated && candidate.tile_n <= info.tile_n && candidate.tile_n > best_n && divides) {
      best = candidate.config;
      best_n = candidate.tile_n;
    }
  }
  return best;
}

// Split-K pays only when the tiles leave at least half the SMs idle (decode): then S = floor(SMs / T)
// splits of at least 1024 of K each, at most 16, where T is the most tiles the sizes allow. Example
// (132 SMs): Mixtral-8x7B down at 1 token (M = 2, E = 8, N = 4096, K = 14336, 16x128s): T = 2 x 32 = 64
// -> S = 2, 97 us against 100. More examples, and where it does not pay, in docs/design.md ("Split-K").
int choose_split_k(int64_t M, int64_t N, int64_t K, int32_t E, int sm_count, TileConfig config) {
  constexpr int64_t kMaxSplitK = 16;
  constexpr int64_t kMinKPerSplit = 1024;
  TileConfigInfo const& tile = tile_config_info(config);
  if (config == TileConfig::kAuto || !tile.split_k || M <= 0 || N <= 0 || K <= 0 || E <= 0 || sm_count <= 0) {
    return 1;
  }
  int64_t const tiles = max_m_blocks(M, E, tile.tile_m) * ceil_div(N, tile.tile_n);
  if (2 * tiles > int64_t(sm_count)) {
    return 1;
  }
  int64_t const max_split = std::max<int64_t>(1, std::min(kMaxSplitK, K / kMinKPerSplit));
  return int(std::min(max_split, int64_t(sm_count) / std::max<int64_t>(tiles, 1)));
}

namespace {

bool nothing_to_multiply(GroupedGemmParams const& p) { return p.M <= 0 || p.N <= 0 || p.K <= 0 || p.E <= 0; }

}  // namespace

GroupedGemmPlan plan_grouped_gemm(GroupedGemmParams const& p, PlanOverride const& override) {
  GroupedGemmPlan plan;
  if (nothing_to_multiply(p)) {
    return plan;  // run_grouped_gemm launches no kernel
  }
  plan.sm_count = p.sm_count > 0 ? p.sm_count : current_sm_count();
  if (override.config != TileConfig::kAuto) {
    plan.config = override.config;
  } else {
    TileConfig const chosen = choose_tile_config(p.M, p.N, p.E);
    plan.config = p.gather_rows != nullptr ? gather_tile_config(chosen) : chosen;
  }
  // A gated call runs the gated configuration of that choice where there is one (an override's own only if it is
  // gated and fits I): unsplit, since the gated kernels have no split-K.
  if (p.gate_up_layout != GateUpLayout::kNone) {
    TileConfig const gated = gated_tile_config(plan.config, p.N / 2, p.gate_up_layout);
    plan.gated = gated != TileConfig::kAuto && (override.config == TileConfig::kAuto || gated == plan.config);
    if (plan.gated) {
      plan.config = gated;
    }
  }
  TileConfigInfo const& tile = tile_config_info(plan.config);
  int64_t const tiles_n = ceil_div(p.N, tile.tile_n);

  // An explicit split is clamped to the k-blocks (no empty split), and so that the work units (tile slots x
  // splits) stay below 2^30: the kernel counts them in 32 bits.
  if (tile.split_k && !plan.gated) {
    int64_t const split = override.split_k > 0 ? override.split_k
                                               : choose_split_k(p.M, p.N, p.K, p.E, plan.sm_count, plan.config);
    int64_t const tile_slots = max_m_blocks(p.M, p.E, tile.tile_m) * tiles_n;
    int64_t const max_split = std::max<int64_t>(1, ((int64_t(1) << 30) - 1) / std::max<int64_t>(tile_slots, 1));
    plan.split_k = int(std::clamp<int64_t>(split, 1, std::min(ceil_div(p.K, tile.tile_k), max_split)));
  }

  // Dynamic scheduling pays when tiles come in several waves (CTAs drift apart over the waves, and a
  // weight tile shared by CTAs that no longer run together is read from DRAM again); a one-wave decode
  // problem skips the counter and its memset. Example: Mixtral up at 2048 tokens (M = 4096, E = 8,
  // N = 28672, tiles of 128 x 256): (32 + 8) x 112 = 4480 tiles >= 4 x 132 SMs -> dynamic.
  if (override.dynamic_schedule >= 0) {
    plan.dynamic_schedule = override.dynamic_schedule == 1;
  } else {
    int64_t const tiles_upper = (ceil_div(p.M, tile.tile_m) + std::min<int64_t>(p.E, p.M)) * tiles_n;
    plan.dynamic_schedule = tiles_upper >= 4 * int64_t(plan.sm_count);
  }

  // Each expert adds at most one partial m-block of a cluster's tile_m * cluster_m rows: cluster tiles
  // <= (ceil(M / (tile_m * cluster_m)) + min(E, M)) * cluster n-blocks, each split_k units.
  int64_t const cluster_m_blocks = ceil_div(p.M, int64_t(tile.tile_m) * tile.cluster_m) + std::min<int64_t>(p.E, p.M);
  int64_t const cluster_n_blocks = ceil_div(p.N, int64_t(tile.tile_n) * tile.cluster_n);
  plan.max_units = std::max<int64_t>(1, cluster_m_blocks * cluster_n_blocks * plan.split_k);
  plan.workspace =
      workspace_layout(p.M, p.N, p.E, tile.tile_m, tile.tile_n, plan.dynamic_schedule, plan.split_k);
  return plan;
}

char const* check_plan_override(PlanOverride const& override) {
  if (override.split_k < 0) {
    return "split_k must be >= 0 (0: the heuristic, 1: no split)";
  }
  if (override.split_k > 1 && override.config != TileConfig::kAuto && !tile_config_info(override.config).split_k) {
    return "this tile configuration has no split-K kernel: split_k must be 0 or 1";
  }
  if (override.dynamic_schedule < -1 || override.dynamic_schedule > 1) {
    return "dynamic_schedule must be -1 (the heuristic), 0 (static) or 1 (dynamic)";
  }
  return nullptr;
}

bool parse_tile_config(char const* name, TileConfig* config) {
  if (std::strcmp(name, "auto") == 0) {
    *config = TileConfig::kAuto;
    return true;
  }
  for (TileConfigInfo const& info : kTileConfigs) {
    if (std::strcmp(name, info.name) == 0) {
      *config = info.config;
      return true;
    }
  }
  return false;
}

char const* tile_config_name(TileConfig config) {
  return config == TileConfig::kAuto ? "auto" : tile_config_info(config).name;
}

char const* check_grouped_gemm(GroupedGemmParams const& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) {
    return "the kernel takes bfloat16 or float16";
  }
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.E < 0) {
    return "sizes must be non-negative";
  }
  if (p.M >= (int64_t(1) << 31) || p.N >= (int64_t(1) << 31) || p.K >= (int64_t(1) << 31)) {
    return "M, N and K must each be below 2^31 (TMA coordinates are 32-bit)";
  }
  if (p.N % 8 != 0 || p.K % 8 != 0) {
    return "N and K must be multiples of 8 (rows of 16 bytes for TMA)";
  }
  // With K = 0 nothing is read (the output is zeros), and torch gives an empty row the stride 1.
  if ((p.K > 0 && (p.lda % 8 != 0 || p.ldb % 8 != 0 || p.batch_stride_b % 8 != 0)) || p.ldd % 8 != 0) {
    return "row and expert strides must be multiples of 8 elements (16 bytes)";
  }
  if (!aligned16(p.a) || !aligned16(p.b) || !aligned16(p.d)) {
    return "A, B and D must start at 16-byte aligned addresses";
  }
  if (p.E > 0 && p.m_sizes == nullptr) {
    return "m_sizes is null";
  }
  if (p.gate_up_layout != GateUpLayout::kNone) {
    if (p.N % 16 != 0) {
      return "a gated call needs N = 2I with I a multiple of 8 (rows of 16 bytes for TMA)";
    }
    if (p.activated == nullptr || !aligned16(p.activated) || p.ld_activated % 8 != 0 || p.ld_activated < p.N / 2) {
      return "a gated call needs its [M, I] output at a 16-byte aligned address, rows a multiple of 8 elements apart";
    }
  } else if (p.d == nullptr && p.M > 0 && p.N > 0) {
    return "D is null";
  }
  // Gathering, `a` is the [gather_source_rows, K] source, its rows indexed in 32 bits and their stride in bytes a
  // 32-bit number (16-bit elements).
  if (p.gather_rows != nullptr && p.M > 0 &&
      (p.gather_source_rows < 1 || p.gather_source_rows >= (int64_t(1) << 31))) {
    return "a gathering call needs 1 to 2^31 - 1 source rows";
  }
  if (p.gather_rows != nullptr && p.M > 0 && (p.lda < 0 || p.lda >= (int64_t(1) << 31))) {
    return "a gathering call needs its source rows 0 to 2^31 - 1 elements apart";
  }
  return nullptr;
}

char const* check_grouped_gemm_plan(GroupedGemmParams const& p, GroupedGemmPlan const& plan) {
  if (p.gather_rows != nullptr && plan.config != TileConfig::kAuto && !tile_config_info(plan.config).gather_a) {
    return "this tile configuration has no kernel that gathers A's rows (the configurations marked gather_a in "
           "csrc/moe_tile_configs.h have one)";
  }
  if (p.gate_up_layout != GateUpLayout::kNone && plan.config != TileConfig::kAuto && !plan.gated) {
    return "no gated-epilogue kernel for this call: only the 128x256 tiles have one, concatenated gate and up "
           "halves need I a multiple of 128, and a forced configuration must be a gated "
           "one (the configurations marked gated in csrc/moe_tile_configs.h); run the GEMM, then the activation";
  }
  return nullptr;
}

namespace {

// The kernel of one configuration, gathering or not (check_grouped_gemm_plan refused a gathering call of a
// configuration without a gathering kernel before this).
template <DType kDType, bool kBNMajor, TileConfig kConfig, GateUpLayout kGateUp>
cudaError_t run_gated_kernel(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream) {
  if (params.gather_rows != nullptr) {
    return run_sm90_moe_gemm_gated<kDType, kBNMajor, kConfig, true, kGateUp>(params, plan, stream);
  }
  return run_sm90_moe_gemm_gated<kDType, kBNMajor, kConfig, false, kGateUp>(params, plan, stream);
}

template <DType kDType, bool kBNMajor, TileConfig kConfig>
cudaError_t run_kernel(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream) {
  if constexpr (tile_config_info(kConfig).gated) {
    static_assert(tile_config_info(kConfig).gather_a, "the gated configurations gather too");
    if (params.gate_up_layout == GateUpLayout::kInterleaved) {
      return run_gated_kernel<kDType, kBNMajor, kConfig, GateUpLayout::kInterleaved>(params, plan, stream);
    }
    if (params.gate_up_layout == GateUpLayout::kConcatenated) {
      return run_gated_kernel<kDType, kBNMajor, kConfig, GateUpLayout::kConcatenated>(params, plan, stream);
    }
  }
  if constexpr (tile_config_info(kConfig).gather_a) {
    if (params.gather_rows != nullptr) {
      return run_sm90_moe_gemm<kDType, kBNMajor, kConfig, true>(params, plan, stream);
    }
  }
  return run_sm90_moe_gemm<kDType, kBNMajor, kConfig, false>(params, plan, stream);
}

// The switch over the table's configurations for one dtype and weight layout.
template <DType kDType, bool kBNMajor>
cudaError_t run_config(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream) {
  switch (plan.config) {
#define MOE_GEMM_CONFIG_CASE(Enum, ...) \
  case TileConfig::Enum:                \
    return run_kernel<kDType, kBNMajor, TileConfig::Enum>(params, plan, stream);
    MOE_GEMM_TILE_CONFIGS(MOE_GEMM_CONFIG_CASE)
#undef MOE_GEMM_CONFIG_CASE
    default:
      return cudaErrorInvalidValue;  // kAuto: a plan for sizes with nothing to multiply
  }
}

}  // namespace

namespace {

// What the forward launches (16-bit and FP8) do once their checks pass, before the kernel: nothing for an empty
// output, zeros for an empty reduction (K = 0 or no experts: every row is an empty sum or past the last expert),
// else the workspace's counters zeroed. `launch` says whether the kernel is still to run; the status is that of
// what was done.
cudaError_t prepare_forward(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream,
                            bool& launch) {
  launch = false;
  if (params.M == 0 || params.N == 0) {
    return cudaSuccess;
  }
  if (params.K == 0 || params.E == 0) {
    // Nothing to multiply: every row is either an empty sum or past the last expert (gated: act(0) * 0 = 0). The
    // outputs are 16-bit; the gated kernel's activated output has N / 2 columns.
    if (params.gate_up_layout != GateUpLayout::kNone) {
      cudaError_t const status =
          cudaMemset2DAsync(params.activated, params.ld_activated * 2, 0, params.N, params.M, stream);
      if (status != cudaSuccess || params.d == nullptr) {
        return status;
      }
    }
    return cudaMemset2DAsync(params.d, params.ldd * 2, 0, params.N * 2, params.M, stream);
  }
  cudaError_t const status = prepare_launch(plan.workspace, params.workspace, stream);
  launch = status == cudaSuccess;
  return status;
}

}  // namespace

template <TileConfig kConfig, Fp8Scales kScales>
cudaError_t run_sm90_moe_gemm_fp8(GroupedGemmParams const& params, Fp8ScaleParams const& scales,
                                  GroupedGemmPlan const& plan, cudaStream_t stream);

GroupedGemmPlan plan_grouped_gemm_fp8(GroupedGemmParams const& p, Fp8Scales scales, PlanOverride const& override) {
  // The configurations with an FP8 kernel: 128x256 where the heuristic takes a 256-wide tile; rowwise, the swapped
  // 32x128s where it takes a swapped decode tile; else 128x128 (blockwise: two weight scale blocks a 128x256 tile,
  // mma_blockwise_halves, one a 128x128 tile, mma_blockwise).
  PlanOverride fp8 = override;
  TileConfig const wanted = override.config != TileConfig::kAuto ? override.config : choose_tile_config(p.M, p.N, p.E);
  bool const wide = tile_config_info(wanted).tile_n == 256 && !tile_config_info(wanted).swap_ab;
  bool const decode = tile_config_info(wanted).swap_ab;
  fp8.config = wide                                    ? TileConfig::k128x256
               : decode && scales == Fp8Scales::kRowwise ? TileConfig::k32x128SwapAB
                                                         : TileConfig::k128x128;
  fp8.split_k = 1;
  return plan_grouped_gemm(p, fp8);
}

char const* check_grouped_gemm_fp8(GroupedGemmParams const& p, Fp8ScaleParams const& scales,
                                   GroupedGemmPlan const& plan) {
  if (p.dtype != DType::kBFloat16) {
    return "the FP8 kernel writes bfloat16";
  }
  if (p.b_n_major || p.gather_rows != nullptr) {
    return "the FP8 kernel takes K-major [E, N, K] weights and no gather";
  }
  if (p.K % 16 != 0 || p.N % 16 != 0 || p.lda % 16 != 0 || p.ldb % 16 != 0 || p.batch_stride_b % 16 != 0) {
    return "the FP8 kernel needs N, K and the operands' row and expert strides in multiples of 16 (16-byte rows)";
  }
  if (scales.kind == Fp8Scales::kRowwise) {
    if (scales.x_groups != 0) {
      return "rowwise FP8 scales: x_scale [M] (x_groups 0)";
    }
    if (plan.config != TileConfig::kAuto && plan.config != TileConfig::k128x256 &&
        plan.config != TileConfig::k128x128 && plan.config != TileConfig::k32x128SwapAB) {
      return "the rowwise FP8 kernel has 128x256, 128x128 and 32x128s tiles";
    }
  } else if (scales.kind == Fp8Scales::kBlockwise) {
    if (scales.x_groups != 0 && scales.x_groups != (p.K + 127) / 128) {
      return "blockwise FP8 scales: x_scale [M, ceil(K / 128)] or [M] (x_groups ceil(K / 128) or 0)";
    }
    if (plan.config != TileConfig::kAuto && plan.config != TileConfig::k128x256 &&
        plan.config != TileConfig::k128x128) {
      return "the blockwise FP8 kernel has 128x256 and 128x128 tiles";
    }
  } else {
    return "FP8 scales are rowwise or blockwise";
  }
  if (plan.split_k > 1) {
    return "the FP8 kernel does not split K";
  }
  return check_grouped_gemm(p);
}

cudaError_t run_grouped_gemm_fp8(GroupedGemmParams const& params, Fp8ScaleParams const& scales,
                                 GroupedGemmPlan const& plan, cudaStream_t stream) {
  if (check_grouped_gemm_fp8(params, scales, plan) != nullptr || (params.M > 0 && scales.x_scale == nullptr) ||
      (params.E > 0 && scales.w_scale == nullptr)) {
    return cudaErrorInvalidValue;
  }
  bool launch = false;
  if (cudaError_t status = prepare_forward(params, plan, stream, launch); !launch) {
    return status;
  }
  if (scales.kind == Fp8Scales::kBlockwise) {
    return plan.config == TileConfig::k128x256
               ? run_sm90_moe_gemm_fp8<TileConfig::k128x256, Fp8Scales::kBlockwise>(params, scales, plan, stream)
               : run_sm90_moe_gemm_fp8<TileConfig::k128x128, Fp8Scales::kBlockwise>(params, scales, plan, stream);
  }
  if (plan.config == TileConfig::k128x256) {
    return run_sm90_moe_gemm_fp8<TileConfig::k128x256, Fp8Scales::kRowwise>(params, scales, plan, stream);
  }
  if (plan.config == TileConfig::k32x128SwapAB) {
    return run_sm90_moe_gemm_fp8<TileConfig::k32x128SwapAB, Fp8Scales::kRowwise>(params, scales, plan, stream);
  }
  return run_sm90_moe_gemm_fp8<TileConfig::k128x128, Fp8Scales::kRowwise>(params, scales, plan, stream);
}

cudaError_t run_grouped_gemm(GroupedGemmParams const& params, GroupedGemmPlan const& plan, cudaStream_t stream) {
  if (check_grouped_gemm(params) != nullptr || check_grouped_gemm_plan(params, plan) != nullptr) {
    return cudaErrorInvalidValue;
  }
  bool launch = false;
  if (cudaError_t status = prepare_forward(params, plan, stream, launch); !launch) {
    return status;
  }
  return with_16bit_dtype_and_flag(params.dtype, params.b_n_major, [&](auto dtype, auto b_n_major) {
    return run_config<decltype(dtype)::value, decltype(b_n_major)::value>(params, plan, stream);
  });
}

}  // namespace moe_gemm
