// The TMA-store epilogue both sm90 kernels share: a tile of float accumulators, as WGMMA leaves them in
// the registers of the MMA warpgroups, goes out kEpiN columns (128-byte rows) at a time through
// kEpiBuffers swizzled shared-memory buffers. Each buffer is rewritten only after the store issued from it
// kEpiBuffers chunks earlier has read it, so a tile's stores drain while the next tile's MMAs run.
// Each warpgroup stores the rows it holds on its own (its barrier, its TMA stores, its wait on them): the
// two warpgroups of a cooperative tile never wait for each other here, and one whose rows are all past the
// expert's end can skip the epilogue.
// 16-bit outputs are written to shared memory with stmatrix (16 x 16 values per instruction): for short
// reductions (a wgrad tile of 8 k-blocks) the epilogue is on the critical path, and this one has a quarter
// of the store instructions of per-pair stores.
#pragma once

#include "cute/arch/copy_sm90.hpp"
#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_conversion.h"

namespace moe_gemm {

// Rows of the tile each warpgroup of the TiledMma holds (the warpgroups split the tile along M): 64 when
// two share a 128-row tile, the whole tile when one holds it. Each warpgroup's TMA store box has these rows.
template <class TiledMma, int kTileM>
constexpr int kRowsPerWarpGroup = kTileM * int(cutlass::NumThreadsPerWarpGroup) / int(cute::size(TiledMma{}));

// smem_d: (kTileM rows, kEpiN columns, kEpiBuffers) in the layout of the TMA store's descriptor.
// issue_store(chunk, smem_box, row_offset) runs on the first thread of each warpgroup once the warpgroup's
// rows [row_offset, row_offset + kRowsPerWarpGroup) of chunk `chunk` are in shared memory at smem_box, and
// must issue their TMA store (or reduce-add) and commit it (tma_store_arrive). store_count counts chunks
// issued so far by this warpgroup (it picks the buffer) and is advanced past this tile's.
// warp_group_barrier spans the 128 threads of the calling warpgroup; thread_idx runs over the TiledMma's.
template <int kTileN, int kEpiN, int kEpiBuffers, class SmemTensorD, class Accumulators, class TiledMma,
          class IssueStore>
CUTLASS_DEVICE void store_tile_through_smem(SmemTensorD const& smem_d, Accumulators const& accumulators,
                                            TiledMma const& tiled_mma, int thread_idx,
                                            cutlass::arch::NamedBarrier const& warp_group_barrier, int& store_count,
                                            IssueStore&& issue_store) {
  using namespace cute;
  using ElementD = typename SmemTensorD::value_type;
  constexpr int kTileM = size<0>(SmemTensorD{});
  constexpr int kGroupRows = kRowsPerWarpGroup<TiledMma, kTileM>;
  static_assert(size<1>(typename TiledMma::ThrLayoutVMNK{}) * kGroupRows == kTileM &&
                    size<2>(typename TiledMma::ThrLayoutVMNK{}) == 1,
                "the warpgroups split the tile along M");
  int const group_row0 = thread_idx / int(cutlass::NumThreadsPerWarpGroup) * kGroupRows;
  bool const group_leader = thread_idx % int(cutlass::NumThreadsPerWarpGroup) == 0;
  // The loops below walk the WGMMA accumulator layout: ((2 columns, 2 row halves, kTileN / 8 column
  // groups), MMA_M, MMA_N) with the whole tile width in one instruction.
  static_assert(size<0, 0>(Accumulators{}) == 2 && size<0, 1>(Accumulators{}) == 2 &&
                size<0, 2>(Accumulators{}) == kTileN / 8 && size<2>(Accumulators{}) == 1);
  static_assert(kTileN % kEpiN == 0 && size<1>(SmemTensorD{}) == kEpiN && size<2>(SmemTensorD{}) == kEpiBuffers);
  static_assert(kEpiN % 16 == 0, "stmatrix.x4 stores 16-column blocks");
  Tensor cD = make_identity_tensor(make_shape(Int<kTileM>{}, Int<kTileN>{}));
  Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);
  using Pair = cutlass::Array<ElementD, 2>;
  cutlass::NumericArrayConverter<ElementD, float, 2> convert;

  CUTLASS_PRAGMA_UNROLL
  for (int chunk = 0; chunk < kTileN / kEpiN; ++chunk) {
    int const buffer = (store_count + chunk) % kEpiBuffers;
    if (group_leader) {
      tma_store_wait<kEpiBuffers - 1>();  // this warpgroup's store from the buffer has read it
    }
    warp_group_barrier.arrive_and_wait();
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < size<1>(accumulators); ++m) {
      if constexpr (sizeof(ElementD) == 2) {
        // 16 rows x 16 columns per stmatrix.x4, a quarter of the instructions of 4-byte stores. Register
        // j holds the thread's pair of matrix j = (row half j % 2, column group j / 2), the layout WGMMA
        // leaves them in; lane l gives the address of row l % 8 of matrix l / 8.
        int const lane = thread_idx % 32;
        int const warp_row0 = get<0>(tCcD(make_coord(make_coord(0, 0, 0), m, 0))) - lane / 4;
        int const address_row = warp_row0 + 8 * ((lane / 8) % 2) + lane % 8;
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kEpiN / 8; g += 2) {
          int const group = chunk * (kEpiN / 8) + g;
          uint32_t packed[4];
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < 4; ++j) {
            cutlass::Array<float, 2> values;
            values[0] = accumulators(make_coord(make_coord(0, j % 2, group + j / 2), m, 0));
            values[1] = accumulators(make_coord(make_coord(1, j % 2, group + j / 2), m, 0));
            Pair const pair = convert(values);
            packed[j] = reinterpret_cast<uint32_t const&>(pair);
          }
          int const address_col = (g + lane / 16) * 8;
          cute::SM90_U32x4_STSM_N::copy(packed[0], packed[1], packed[2], packed[3],
                                        reinterpret_cast<cute::uint128_t&>(smem_d(address_row, address_col, buffer)));
        }
      } else {
        CUTLASS_PRAGMA_UNROLL
        for (int g = 0; g < kEpiN / 8; ++g) {
          CUTLASS_PRAGMA_UNROLL
          for (int half = 0; half < 2; ++half) {
            int const group = chunk * (kEpiN / 8) + g;
            auto const first = make_coord(make_coord(0, half, group), m, 0);
            auto const second = make_coord(make_coord(1, half, group), m, 0);
            auto const coord = tCcD(first);
            cutlass::Array<float, 2> values;
            values[0] = accumulators(first);
            values[1] = accumulators(second);
            *reinterpret_cast<Pair*>(&smem_d(get<0>(coord), get<1>(coord) - chunk * kEpiN, buffer)) =
                convert(values);
          }
        }
      }
    }
    // Generic-proxy writes must be visible to the TMA (async proxy) before it reads them.
    tma_store_fence();
    warp_group_barrier.arrive_and_wait();
    if (group_leader) {
      issue_store(chunk, &smem_d(group_row0, 0, buffer), group_row0);
    }
  }
  store_count += kTileN / kEpiN;
}

}  // namespace moe_gemm
