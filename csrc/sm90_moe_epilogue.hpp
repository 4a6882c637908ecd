// The epilogues of the sm90 kernels.
//
// The TMA-store epilogue both kernels share: a tile of float accumulators, as WGMMA leaves them in
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
//
// The forward kernel's other ways out, at the end of this file: the transposed store of swapped (decode)
// tiles, straight from registers; split-K's partial tiles and their deterministic reduction; and the
// zeroing of the rows of D past the last expert.
#pragma once

#include "cute/arch/copy_sm90.hpp"
#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/array.h"
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
// The identity of pack_tile's `scale`: (row half, column group, column in the pair, row block) -> factor.
struct Unscaled {
  CUTLASS_DEVICE float operator()(int, int, int, int) const { return 1.0f; }
};

template <int kTileN, int kEpiN, class ElementD, class Accumulators, class Scale = Unscaled>
CUTLASS_DEVICE void pack_tile(Accumulators const& accumulators, PackedTile<ElementD, Accumulators>& packed,
                              Scale const& scale = {}) {
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
          values[0] = accumulators(make_coord(make_coord(0, j % 2, group), m, 0)) * scale(j % 2, group, 0, m);
          values[1] = accumulators(make_coord(make_coord(1, j % 2, group), m, 0)) * scale(j % 2, group, 1, m);
          cutlass::Array<ElementD, 2> const pair = convert(values);
          packed.regs[packed_index<kEpiN, kRowBlocks>(chunk, m, store, j)] = reinterpret_cast<uint32_t const&>(pair);
        }
      }
    }
  }
}

// store_chunk_through_smem, store_packed_chunk and store_tile_through_smem take smem_d, issue_store, store_count and
// warp_group_barrier as described at store_tile_through_smem below.
// One chunk of 16-bit outputs: wait until the buffer's previous store has read it, stmatrix, then TMA.
// fragment(m, store)[j] is the thread's pair of matrix j of stmatrix number `store` (over the chunk's 16-column
// blocks) of row block m, as pack_tile orders them (a pointer into a PackedTile, or an array of 4 registers);
// issue_store gets kChunk. kTileN is the MMA tile's width (the rows of its C partition place the stmatrix
// addresses), whatever the chunk's tile.
template <int kChunk, int kTileN, int kEpiN, int kEpiBuffers, int kRowBlocks, class SmemTensorD, class TiledMma,
          class Fragment, class IssueStore>
CUTLASS_DEVICE void store_chunk_through_smem(SmemTensorD const& smem_d, TiledMma const& tiled_mma, int thread_idx,
                                             cutlass::arch::NamedBarrier const& warp_group_barrier, int& store_count,
                                             Fragment&& fragment, IssueStore&& issue_store) {
  using namespace cute;
  constexpr int kTileM = size<0>(SmemTensorD{});
  constexpr int kGroupRows = kRowsPerWarpGroup<TiledMma, kTileM>;
  static_assert(size<1>(typename TiledMma::ThrLayoutVMNK{}) * kGroupRows == kTileM &&
                    size<2>(typename TiledMma::ThrLayoutVMNK{}) == 1,
                "the warpgroups split the tile along M");
  static_assert(size<1>(SmemTensorD{}) == kEpiN && size<2>(SmemTensorD{}) == kEpiBuffers);
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
      auto const regs = fragment(m, store);
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

// Chunk kChunk of a packed tile.
template <int kChunk, int kTileN, int kEpiN, int kEpiBuffers, class SmemTensorD, class Packed, class TiledMma,
          class IssueStore>
CUTLASS_DEVICE void store_packed_chunk(SmemTensorD const& smem_d, Packed const& packed, TiledMma const& tiled_mma,
                                       int thread_idx, cutlass::arch::NamedBarrier const& warp_group_barrier,
                                       int& store_count, IssueStore&& issue_store) {
  constexpr int kRowBlocks = Packed::kRowBlocks;
  store_chunk_through_smem<kChunk, kTileN, kEpiN, kEpiBuffers, kRowBlocks>(
      smem_d, tiled_mma, thread_idx, warp_group_barrier, store_count,
      [&](int m, int store) { return &packed.regs[packed_index<kEpiN, kRowBlocks>(kChunk, m, store, 0)]; },
      issue_store);
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

  template <class Scale = Unscaled>
  CUTLASS_DEVICE void hold(Accumulators const& accumulators, Target const& target, Scale const& scale = {}) {
    pack_tile<kTileN, kEpiN>(accumulators, packed_, scale);
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

// The valid part of an output tile of D: its first element, and the rows and columns to store there.
template <class ElementD>
struct OutputTile {
  ElementD* ptr;
  int64_t ldd;
  int32_t rows;  // the expert's rows in the tile (at most its rows)
  int32_t cols;  // the columns before N (at most its columns)
};

// Swapped tiles: direct stores from the accumulator registers, transposed; rows past the expert and
// columns past N are skipped. Each thread owns pairs of adjacent MMA columns, i.e. two rows of D:
// two 16-bit stores (decode: the output is a small part of the bytes moved). TileShape is the MMA's
// (columns of D, rows of D, k). scale(row, col) of D's tile multiplies each value (rowwise FP8 scales; TileUnscaled
// otherwise), read only for the rows and columns stored.
struct TileUnscaled {
  CUTLASS_DEVICE float operator()(int, int) const { return 1.0f; }
};

template <class TileShape, class ElementD, class Accumulators, class TiledMma, class Scale = TileUnscaled>
CUTLASS_DEVICE void store_tile_transposed(OutputTile<ElementD> const& out, Accumulators const& accumulators,
                                          TiledMma const& tiled_mma, int thread_idx, Scale const& scale = {}) {
  using namespace cute;
  auto thread_mma = tiled_mma.get_thread_slice(thread_idx);
  Tensor tCcD = thread_mma.partition_C(make_identity_tensor(take<0, 2>(TileShape{})));  // MMA coordinates
  static_assert(size<0, 0>(decltype(tCcD){}) == 2, "WGMMA accumulators come in pairs of adjacent columns");
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(accumulators); ++i) {
    int const row = get<1>(tCcD(i)), col = get<0>(tCcD(i));  // MMA (column, row) of D
    if (row < out.rows && col < out.cols) {
      out.ptr[int64_t(row) * out.ldd + col] = ElementD(accumulators(i) * scale(row, col));
    }
  }
}

// A split-K unit's place in the workspace: the partials of its tile (split_k of them, split_stride
// floats apart, each laid out as the D tile), its split, and the tile's arrival counter.
struct SplitKPartials {
  float* tile_partials;
  int64_t split_stride;
  int32_t split;
  int32_t split_k;
  int* arrivals;
};

// Split-K epilogue. Each unit writes the valid rows and columns of its fp32 partial tile to its own
// workspace slot, then counts itself on the tile's arrival counter (threadfence before, so the
// partial is visible to whoever sees the count). The unit that arrives last sums the partials of
// splits 0, 1, ..., split_k - 1 in that order, all from memory (its own included), so the result
// does not depend on which CTA finishes last: bitwise the same from run to run. All the TiledMma's
// threads take part; last_arrival is a flag in shared memory.
template <bool kSwapAB, int kTileN, class TileShape, class ElementD, class Accumulators, class TiledMma>
CUTLASS_DEVICE void reduce_split_k_tile(OutputTile<ElementD> const& out, SplitKPartials const& partials,
                                        Accumulators const& accumulators, TiledMma const& tiled_mma,
                                        int thread_idx, int& last_arrival) {
  using namespace cute;
  constexpr int kThreads = int(size(TiledMma{}));
  float* const own_partial = partials.tile_partials + partials.split * partials.split_stride;

  Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(TileShape{})));
  static_assert(size<0, 0>(decltype(tCcD){}) == 2, "WGMMA accumulators come in pairs of adjacent columns");
  // .cg: through L2 only, where the reducing CTA (maybe on another SM) reads it. The partial is laid
  // out as the D tile (kTileM x kTileN) either way.
  if constexpr (kSwapAB) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); ++i) {
      int const row = get<1>(tCcD(i)), col = get<0>(tCcD(i));
      if (row < out.rows && col < out.cols) {
        __stcg(own_partial + row * kTileN + col, accumulators(i));
      }
    }
  } else {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accumulators); i += 2) {
      int const row = get<0>(tCcD(i)), col = get<1>(tCcD(i));
      if (row < out.rows && col < out.cols) {
        __stcg(reinterpret_cast<float2*>(own_partial + row * kTileN + col),
               make_float2(accumulators(i), accumulators(i + 1)));
      }
    }
  }
  __threadfence();
  cutlass::arch::NamedBarrier epilogue_barrier(kThreads, cutlass::arch::ReservedNamedBarriers::EpilogueBarrier);
  epilogue_barrier.arrive_and_wait();
  if (thread_idx == 0) {
    int const arrived_before = atomicAdd(partials.arrivals, 1);
    last_arrival = arrived_before == partials.split_k - 1;
  }
  epilogue_barrier.arrive_and_wait();
  // Read by all before thread 0 can write it again: that needs the barrier above of the next unit.
  if (!last_arrival) {
    return;
  }
  __threadfence();

  // Linear thread mapping over the valid region, 4 columns per thread (N is a multiple of 8):
  // coalesced, and all threads busy even for a 1-row tile.
  int32_t const vectors_per_row = out.cols / 4;
  int32_t const vectors = out.rows * vectors_per_row;
  cutlass::NumericArrayConverter<ElementD, float, 4> convert;
#pragma unroll 1
  for (int32_t v = thread_idx; v < vectors; v += kThreads) {
    int32_t const row = v / vectors_per_row;
    int32_t const col = (v - row * vectors_per_row) * 4;
    float const* partial = partials.tile_partials + row * kTileN + col;
    float4 sum = __ldcg(reinterpret_cast<float4 const*>(partial));
#pragma unroll 4  // several partials in flight; the adds stay in split order
    for (int32_t other = 1; other < partials.split_k; ++other) {
      float4 const part = __ldcg(reinterpret_cast<float4 const*>(partial + other * partials.split_stride));
      sum.x += part.x;
      sum.y += part.y;
      sum.z += part.z;
      sum.w += part.w;
    }
    cutlass::Array<float, 4> values;
    values[0] = sum.x;
    values[1] = sum.y;
    values[2] = sum.z;
    values[3] = sum.w;
    cutlass::Array<ElementD, 4> const converted = convert(values);
    *reinterpret_cast<uint2*>(out.ptr + row * out.ldd + col) = *reinterpret_cast<uint2 const*>(&converted);
  }
}

// Rows [row_begin, row_end) of D (N columns) belong to no expert: every CTA writes zeros to its share of
// them, with kThreads threads (thread_idx 0 .. kThreads - 1).
template <int kThreads, class ElementD>
CUTLASS_DEVICE void zero_rows(ElementD* d, int64_t ldd, int64_t N, int64_t row_begin, int64_t row_end,
                              int thread_idx) {
  int64_t const rows = row_end - row_begin;
  if (rows <= 0) {
    return;
  }
  using Vector = cutlass::AlignedArray<ElementD, 8>;  // 16 bytes: N is a multiple of 8
  int64_t const vectors_per_row = N / 8;
  int64_t const total = rows * vectors_per_row;
  Vector zeros;
  zeros.fill(ElementD(0));
  for (int64_t v = int64_t(blockIdx.x) * kThreads + thread_idx; v < total; v += int64_t(gridDim.x) * kThreads) {
    int64_t const row = row_begin + v / vectors_per_row;
    int64_t const col = (v % vectors_per_row) * 8;
    *reinterpret_cast<Vector*>(d + row * ldd + col) = zeros;
  }
}

}  // namespace moe_gemm
