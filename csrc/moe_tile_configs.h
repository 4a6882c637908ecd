// The tile configurations of the sm90 grouped GEMM, one row each. Everything that lists them reads this
// table: the TileConfig enum and its names (moe_gemm.h), the tile sizes the heuristics and the workspace
// use (moe_gemm.cpp), the dispatch switch, the kernel traits (sm90_moe_gemm_launch.cuh derives the CuTe
// shapes from the numbers) and the instantiation generator (csrc/generate_instantiations.py parses the
// rows with a regular expression: keep one row per line, in this form). Adding a configuration means a
// row here, `python csrc/generate_instantiations.py`, and its name in the static lists of moe_gemm/testing.py
// (TILE_CONFIGS, and SPLIT_K_TILE_CONFIGS or GATHER_TILE_CONFIGS where its columns say so; tests/test_testing.py
// checks them all); the GPU tests take the names from the extension.
//
// Columns: enum name, name (tests, the profiler's --config, moe_gemm.testing), output tile rows (tokens)
// x columns x k-block, cluster shape along M x N, swapped operands (the weights are WGMMA's A operand and
// the tokens its N: decode tiles), a split-K instantiation, an instantiation that gathers A's rows (each row
// read from a row of a source tensor that the call names: grouped_mm_gather), kernels with the gated activation in
// the epilogue (interleaved and concatenated gate and up, gathering too where gather_a is true: grouped_mm_gated),
// m-blocks per raster group (L2 locality; of cluster m-blocks in a cluster along M). Why each exists:
// docs/design.md, "Tile configurations".
#pragma once

// X(Enum, "name", tile_m, tile_n, tile_k, cluster_m, cluster_n, swap_ab, split_k, gather_a, gated, group_m)
#define MOE_GEMM_TILE_CONFIGS(X)                                                           \
  X(k128x256, "128x256", 128, 256, 64, 1, 1, false, false, true, true, 8)                  \
  X(k128x128, "128x128", 128, 128, 64, 1, 1, false, true, true, false, 8)                  \
  X(k128x256Cluster2x1, "128x256c2x1", 128, 256, 64, 2, 1, false, false, false, false, 4)  \
  X(k128x256Cluster1x2, "128x256c1x2", 128, 256, 64, 1, 2, false, false, false, false, 8)  \
  X(k16x128SwapAB, "16x128s", 16, 128, 128, 1, 1, true, true, false, false, 8)             \
  X(k32x128SwapAB, "32x128s", 32, 128, 128, 1, 1, true, true, false, false, 8)

namespace moe_gemm {

// kAuto lets the heuristic (choose_tile_config) pick from host-known shapes.
enum class TileConfig : int {
  kAuto = 0,
#define MOE_GEMM_TILE_CONFIG_ENUM(Enum, ...) Enum,
  MOE_GEMM_TILE_CONFIGS(MOE_GEMM_TILE_CONFIG_ENUM)
#undef MOE_GEMM_TILE_CONFIG_ENUM
};

// One row of the table as a value.
struct TileConfigInfo {
  TileConfig config;
  char const* name;
  int tile_m, tile_n, tile_k;
  int cluster_m, cluster_n;
  bool swap_ab;
  bool split_k;
  bool gather_a;
  bool gated;
  int group_m;
};

inline constexpr TileConfigInfo kTileConfigs[] = {
#define MOE_GEMM_TILE_CONFIG_ROW(Enum, name, tile_m, tile_n, tile_k, cluster_m, cluster_n, swap_ab, split_k, gather_a, \
                                 gated, group_m)                                                                   \
  {TileConfig::Enum, name, tile_m, tile_n, tile_k, cluster_m, cluster_n, swap_ab, split_k, gather_a, gated, group_m},
    MOE_GEMM_TILE_CONFIGS(MOE_GEMM_TILE_CONFIG_ROW)
#undef MOE_GEMM_TILE_CONFIG_ROW
};
inline constexpr int kNumTileConfigs = int(sizeof(kTileConfigs) / sizeof(kTileConfigs[0]));

// The row of a configuration (not kAuto: that has none, and gets the first row).
constexpr TileConfigInfo const& tile_config_info(TileConfig config) {
  for (int i = 0; i < kNumTileConfigs; ++i) {
    if (kTileConfigs[i].config == config) {
      return kTileConfigs[i];
    }
  }
  return kTileConfigs[0];
}

}  // namespace moe_gemm
