// The TMA-store epilogue both sm90 kernels share: a tile of float accumulators, as WGMMA leaves them in
// the registers of the MMA warpgroups, goes out kEpiN columns (128-byte rows) at a time through
// kEpiBuffers swizzled shared-memory buffers. Each buffer is rewritten only after the store issued from it
// kEpiBuffers chunks earlier has read it, so a tile's stores drain while the next tile's MMAs run.
// Each warpgroup stores the rows it holds on its own (its barrier, its TMA stores, its wait on them): the
// two warpgroups of a cooperative tile never wait for each other here, and one whose rows are all past the
// expert's end can skip the epilogue.
// 16-bit outputs are written to shared memory with stmatrix (16 x 16 values per instruction): for short
// reductions (a wgrad tile of 8 k-blocks) the epilogue is on the critical path, and this one has a quarter
// of the store instructions of per-pair stores. Either a whole tile at once (store_tile_through_smem) or,
// packed to 16 bits and held in registers, a chunk at a time under the next tile's MMAs (pack_tile,
// store_packed_chunk; sm90_moe_mainloop.hpp).
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

// The 16-bit tile, packed: each thread's accumulators converted to pairs of 16-bit values (one 32-bit
// register per pair) in the order the stmatrix stores below take them, chunk by chunk: half the registers
// of the float accumulators. A tile held this way can wait in registers while the next tile's MMAs run,
// and be stored under them (sm90_moe_mainloop.hpp).
template <class ElementD, class Accumulators>
struct PackedTile {
  static_assert(sizeof(ElementD) == 2, "stmatrix stores 16-bit tiles");
  static constexpr int kRowBlocks = cute::size<1>(Accumulators{});  // WGMMA's 64-row blocks per warpgroup
  uint32_t regs[cute::size(Accumulators{}) / 2];
};

// The register of PackedTile that holds matrix j (0..3) of stmatrix number `store` (over the chunk's
// 16-column blocks) of row block m in chunk `chunk`.
template <int kEpiN, int kRowBlocks>
constexpr int packed_index(int chunk, int m, int store, int j) {
  return ((chunk * kRowBlocks + m) * (kEpiN / 16) + store) * 4 + j;
}

// Accumulators -> PackedTile. Register j of each stmatrix.x4 holds the thread's pair of matrix j = (row
// half j % 2, column group j / 2), the layout WGMMA leaves them in. The loops walk the WGMMA accumulator
// layout: ((2 columns, 2 row halves, kTileN / 8 column groups), MMA_M, MMA_N), the whole tile width in one
// instruction.
template <int kTileN, int kEpiN, class ElementD, class Accumulators>
CUTLASS_DEVICE void pack_tile(Accumulators const& accumulators, PackedTile<ElementD, Accumulators>& packed) {
  using namespace cute;
  static_assert(size<0, 0>(Accumulators{}) == 2 && size<0, 1>(Accumulators{}) == 2 &&
                size<0, 2>(Accumulators{}) == kTileN / 8 && size<2>(Accumulators{}) == 1);
  static_assert(kTileN % kEpiN == 0 && kEpiN % 16 == 0, "stmatrix.x4 stores 16-column blocks");
  constexpr int kRowBlocks = size<1>(Accumulators{});
  cutlass::NumericArrayConverter<ElementD, float, 2> convert;
  CUTLASS_PRAGMA_UNROLL
  for (int chunk = 0; chunk < kTileN / kEpiN; ++chunk) {
    CUTLASS_PRAGMA_UNROLL
    for (int m = 0; m < kRowBlocks; ++m) {
      CUTLASS_PRAGMA_UNROLL
      for (int store = 0; store < kEpiN / 16; ++store) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j) {
          int const group = chunk * (kEpiN / 8) + 2 * store + j / 2;
          cutlass::Array<float, 2> values;
          values[0] = accumulators(make_coord(make_coord(0, j % 2, group), m, 0));
          values[1] = accumulators(make_coord(make_coord(1, j % 2, group), m, 0));
          cutlass::Array<ElementD, 2> const pair = convert(values);
          packed.regs[packed_index<kEpiN, kRowBlocks>(chunk, m, store, j)] = reinterpret_cast<uint32_t const&>(pair);
        }
      }
    }
  }
}

// store_packed_chunk and store_tile_through_smem take smem_d, issue_store, store_count and
// warp_group_barrier as described at store_tile_through_smem below.
// Chunk kChunk of a packed tile: wait until the buffer's previous store has read it, stmatrix, then TMA.
template <int kChunk, int kTileN, int kEpiN, int kEpiBuffers, class SmemTensorD, class Packed, class TiledMma,
          class IssueStore>
CUTLASS_DEVICE void store_packed_chunk(SmemTensorD const& smem_d, Packed const& packed, TiledMma const& tiled_mma,
                                       int thread_idx, cutlass::arch::NamedBarrier const& warp_group_barrier,
                                       int& store_count, IssueStore&& issue_store) {
  using namespace cute;
  constexpr int kTileM = size<0>(SmemTensorD{});
  constexpr int kGroupRows = kRowsPerWarpGroup<TiledMma, kTileM>;
  static_assert(size<1>(typename TiledMma::ThrLayoutVMNK{}) * kGroupRows == kTileM &&
                    size<2>(typename TiledMma::ThrLayoutVMNK{}) == 1,
                "the warpgroups split the tile along M");
  static_assert(size<1>(SmemTensorD{}) == kEpiN && size<2>(SmemTensorD{}) == kEpiBuffers);
  constexpr int kRowBlocks = Packed::kRowBlocks;
  int const group_row0 = thread_idx / int(cutlass::NumThreadsPerWarpGroup) * kGroupRows;
  bool const group_leader = thread_idx % int(cutlass::NumThreadsPerWarpGroup) == 0;
  int const buffer = store_count % kEpiBuffers;
  ++store_count;
  if (group_leader) {
    tma_store_wait<kEpiBuffers - 1>();  // this warpgroup's store from the buffer has read it
  }
  warp_group_barrier.arrive_and_wait();
  // Lane l gives the address of row l % 8 of matrix l / 8 (rows 8 ((l / 8) % 2) + l % 8 of the warp's 16,
  // columns 8 (l / 16) of the 16-column block); the warp's first row comes from the MMA's C partition.
  Tensor cD = make_identity_tensor(make_shape(Int<kTileM>{}, Int<kTileN>{}));
  Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);
  int const lane = thread_idx % 32;
  CUTLASS_PRAGMA_UNROLL
  for (int m = 0; m < kRowBlocks; ++m) {
    int const warp_row0 = get<0>(tCcD(make_coord(make_coord(0, 0, 0), m, 0))) - lane / 4;
    int const address_row = warp_row0 + 8 * ((lane / 8) % 2) + lane % 8;
    CUTLASS_PRAGMA_UNROLL
    for (int store = 0; store < kEpiN / 16; ++store) {
      int const address_col = (2 * store + lane / 16) * 8;
      uint32_t const* regs = &packed.regs[packed_index<kEpiN, kRowBlocks>(kChunk, m, store, 0)];
      cute::SM90_U32x4_STSM_N::copy(regs[0], regs[1], regs[2], regs[3],
                                    reinterpret_cast<cute::uint128_t&>(smem_d(address_row, address_col, buffer)));
    }
  }
  // Generic-proxy writes must be visible to the TMA (async proxy) before it reads them.
  tma_store_fence();
  warp_group_barrier.arrive_and_wait();
  if (group_leader) {
    issue_store(kChunk, &smem_d(group_row0, 0, buffer), group_row0);
  }
}

// Calls f(Int<i>{}) for the one compile-time i in [0, kCount) equal to the runtime `index` (none if out of
// range): a runtime chunk index for code that must index registers at compile time.
template <int kCount, int kFirst = 0, class F>
CUTLASS_DEVICE void with_static_index(int index, F&& f) {
  if constexpr (kFirst < kCount) {
    if (index == kFirst) {
      f(cute::Int<kFirst>{});
    } else {
      with_static_index<kCount, kFirst + 1>(index, static_cast<F&&>(f));
    }
  }
}

// A finished 16-bit tile held in registers, packed, until it is stored a chunk at a time (under the next tile's
// MMAs), and where it goes: Target is the kernel's, with a member `active` (false: nothing to store).
template <int kTileN, int kEpiN, int kEpiBuffers, class ElementD, class Accumulators, class Target>
class PendingTile {
 public:
  static constexpr int kChunks = kTileN / kEpiN;

  CUTLASS_DEVICE void hold(Accumulators const& accumulators, Target const& target) {
    pack_tile<kTileN, kEpiN>(accumulators, packed_);
    target_ = target;
  }

  // Stores chunks [first, last) of the held tile, if any; once the last chunk is out, holds none. make_issue(target)
  // returns the issue_store of store_tile_through_smem (below), whose other arguments these are too.
  template <class SmemTensorD, class TiledMma, class MakeIssue>
  CUTLASS_DEVICE void store(int first, int last, SmemTensorD const& smem_d, TiledMma const& tiled_mma, int thread_idx,
                            cutlass::arch::NamedBarrier const& warp_group_barrier, int& store_count,
                            MakeIssue const& make_issue) {
    if (!target_.active) {
      return;
    }
    for (int chunk = first; chunk < last; ++chunk) {
      with_static_index<kChunks>(chunk, [&](auto static_chunk) {
        store_packed_chunk<decltype(static_chunk)::value, kTileN, kEpiN, kEpiBuffers>(
            smem_d, packed_, tiled_mma, thread_idx, warp_group_barrier, store_count, make_issue(target_));
      });
    }
    if (last >= kChunks) {
      target_.active = false;
    }
  }

 private:
  PackedTile<ElementD, Accumulators> packed_;
  Target target_{};
};

// What a kernel holds when it does not defer its stores: nothing, and stores nothing.
struct NoPendingTile {
  template <class... Args>
  CUTLASS_DEVICE void hold(Args const&...) {}
  template <class... Args>
  CUTLASS_DEVICE void store(Args&&...) {}
};

template <bool kDefer, int kTileN, int kEpiN, int kEpiBuffers, class ElementD, class Accumulators, class Target>
using MaybePendingTile =
    cute::conditional_t<kDefer, PendingTile<kTileN, kEpiN, kEpiBuffers, ElementD, Accumulators, Target>, NoPendingTile>;

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
