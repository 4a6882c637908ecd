// The gated-activation epilogue of the forward kernel (kGateUp, a separate instantiation): the up-projection's
// tile of gate_up = x @ W_gate_up^T leaves as activated = act(gate) * up ([rows, I]) and, when the caller keeps
// it for the backward, as the pre-activation gate_up itself ([rows, 2I]).
//
// Pairing gate and up in registers. WGMMA leaves thread q (lane % 4) of each quad the columns 8 g + 2 q and
// 8 g + 2 q + 1 of every 8-column group g of the tile, in both row halves:
//   - interleaved columns (gate0, up0, gate1, up1, ...): each such pair is (gate, up) of output column 4 g + q.
//     stmatrix wants thread q to hold output columns 8 G + 2 q, 8 G + 2 q + 1 of the half-width tile, which the
//     lanes 2 (q % 2) and 2 (q % 2) + 1 of the quad computed in group 2 G + q / 2: two shuffles per pair;
//   - concatenated halves ([gate; up]): the producer loads n-block j's B tile as gate rows
//     [j tn/2, (j + 1) tn/2) over up rows [I + j tn/2, ...) (GateUpHalves, sm90_moe_gemm_kernel.hpp), so
//     column c < tn/2 of the tile is gate and c + tn/2 the up of the same output column: group g + tn/16 of
//     the same thread.
// The roundings are those of the separate kernel (moe_layer_kernels.cu) run on the GEMM's 16-bit output: gate
// and up rounded to 16 bits, act(gate) in float32 (moe_activation.h) rounded, times up, rounded. So the fused
// and the unfused paths agree bitwise.
//
// Both outputs are 16-bit, stored in 64-column chunks through shared memory. The tile is packed as the GEMM's own
// output is (PackedTile: the rounded pre-activation, 64 registers of a 128x256 tile); the kTileN / 64 chunks of the
// pre-activation are stored at once when written; the activation is computed from the packed registers and held
// (32 registers) until its kTileN / 128 chunks are stored under the next tile's MMAs (PendingGatedTile).
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/arch/barrier.h"
#include "cutlass/array.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"

#include "moe_activation.h"
#include "sm90_moe_epilogue.hpp"

namespace moe_gemm {

// The two 16-bit values of a packed register: the even column in the low half.
template <class ElementD>
CUTLASS_DEVICE ElementD packed_half(uint32_t reg, int half) {
  return ElementD::bitcast(uint16_t(half == 0 ? reg & 0xffffu : reg >> 16));
}
template <class ElementD>
CUTLASS_DEVICE uint32_t pack_halves(ElementD low, ElementD high) {
  return uint32_t(low.raw()) | (uint32_t(high.raw()) << 16);
}

// act(gate) * up of 16-bit gate and up, rounded after the activation and after the product.
template <GatedActivation kAct, class ElementD>
CUTLASS_DEVICE ElementD gated_value(ElementD gate, ElementD up) {
  ElementD const activated(activate<kAct>(float(gate)));
  return ElementD(float(activated) * float(up));
}

// The packed register of the thread's pair in 8-column group g (of the whole tile), row block m, row half h.
template <int kEpiN, class Packed>
CUTLASS_DEVICE uint32_t packed_reg(Packed const& packed, int g, int m, int h) {
  constexpr int kGroupsPerChunk = kEpiN / 8;
  return packed.regs[packed_index<kEpiN, Packed::kRowBlocks>(g / kGroupsPerChunk, m, (g % kGroupsPerChunk) / 2,
                                                             2 * (g % 2) + h)];
}

// The activated tile's registers for stmatrix number `store` of row block m in chunk kChunk (of the half-width
// tile), from the packed pre-activation: regs[j] holds the thread's pair of matrix j = (row half j % 2, output
// column group j / 2), as pack_tile orders a tile's own registers.
template <GatedActivation kAct, GateUpLayout kLayout, int kTileN, int kEpiN, int kChunk, class ElementD, class Packed>
CUTLASS_DEVICE void gated_fragment(Packed const& packed, int m, int store, cutlass::Array<uint32_t, 4>& regs) {
  constexpr int kGroupsPerChunk = kEpiN / 8;
  // (Helpers are functions, not lambdas: lambdas are not force-inlined, and a call would put the packed tile on
  // the stack.)
  CUTLASS_PRAGMA_UNROLL
  for (int j = 0; j < 4; ++j) {
    int const group = kChunk * kGroupsPerChunk + 2 * store + j / 2;  // of the activated tile
    int const h = j % 2;
    if constexpr (kLayout == GateUpLayout::kConcatenated) {
      uint32_t const gate = packed_reg<kEpiN>(packed, group, m, h),
                     up = packed_reg<kEpiN>(packed, group + kTileN / 16, m, h);
      regs[j] = pack_halves(gated_value<kAct>(packed_half<ElementD>(gate, 0), packed_half<ElementD>(up, 0)),
                            gated_value<kAct>(packed_half<ElementD>(gate, 1), packed_half<ElementD>(up, 1)));
    } else {
      // Each lane's (gate, up) pairs of groups 2 G and 2 G + 1 give its outputs 8 G + q and 8 G + 4 + q; lane q
      // takes outputs 8 G + 2 q + p from lane 2 (q % 2) + p, of group 2 G + q / 2 (the low or high half).
      uint32_t const first = packed_reg<kEpiN>(packed, 2 * group, m, h);
      uint32_t const second = packed_reg<kEpiN>(packed, 2 * group + 1, m, h);
      uint32_t const mine =
          pack_halves(gated_value<kAct>(packed_half<ElementD>(first, 0), packed_half<ElementD>(first, 1)),
                      gated_value<kAct>(packed_half<ElementD>(second, 0), packed_half<ElementD>(second, 1)));
      int const lane = int(threadIdx.x) % 32;
      int const q = lane % 4;
      int const quad = lane - q;
      uint32_t const even = __shfl_sync(0xffffffff, mine, quad + 2 * (q % 2));
      uint32_t const odd = __shfl_sync(0xffffffff, mine, quad + 2 * (q % 2) + 1);
      int const half = q / 2;
      regs[j] = pack_halves(packed_half<ElementD>(even, half), packed_half<ElementD>(odd, half));
    }
  }
}

// A finished tile of gate_up: its pre-activation stored at once (when written), its activation computed and held
// in registers, packed, until its chunks are stored under the next tile's MMAs. Holding only the activation (a
// quarter of the float accumulators' registers) leaves the next tile's accumulators room: holding the packed
// pre-activation and computing the activation from it under the next MMAs needed a 368-392 byte stack frame at
// 128x256.
// Target is the kernel's, with a member `active`. store() takes chunks [first, last) of the held activation.
template <GateUpLayout kLayout, int kTileN, int kEpiN, int kEpiBuffers, class ElementD, class Accumulators,
          class Target>
class PendingGatedTile {
 public:
  static_assert(kLayout != GateUpLayout::kNone);
  static_assert(kTileN % (2 * kEpiN) == 0, "the activated tile is whole chunks wide");
  static constexpr int kChunks = kTileN / kEpiN;      // of the pre-activation
  static constexpr int kActChunks = kChunks / 2;      // of the activation: the deferred stores
  using Packed = PackedTile<ElementD, Accumulators>;
  static constexpr int kRowBlocks = Packed::kRowBlocks;

  // make_issue_pre(target) returns the issue_store of a pre-activation chunk (store_chunk_through_smem). write_pre
  // and act are the call's, the same for every tile.
  template <class SmemTensorD, class TiledMma, class MakeIssuePre>
  CUTLASS_DEVICE void hold(Accumulators const& accumulators, Target const& target, bool write_pre, GatedActivation act,
                           SmemTensorD const& smem_d, TiledMma const& tiled_mma, int thread_idx,
                           cutlass::arch::NamedBarrier const& warp_group_barrier, int& store_count,
                           MakeIssuePre const& make_issue_pre) {
    Packed packed;
    pack_tile<kTileN, kEpiN>(accumulators, packed);
    if (write_pre) {
      store_pre_chunks<0>(packed, smem_d, tiled_mma, thread_idx, warp_group_barrier, store_count,
                          make_issue_pre(target));
    }
    // One switch per tile: a switch per chunk or per fragment kept all three activations' temporaries live together.
    switch (act) {
      case GatedActivation::kGelu:
        activate_tile<GatedActivation::kGelu>(packed);
        break;
      case GatedActivation::kGeluTanh:
        activate_tile<GatedActivation::kGeluTanh>(packed);
        break;
      default:
        activate_tile<GatedActivation::kSilu>(packed);
        break;
    }
    target_ = target;
  }

  // make_issue_act(target) returns the issue_store of an activated chunk.
  template <class SmemTensorD, class TiledMma, class MakeIssueAct>
  CUTLASS_DEVICE void store(int first, int last, SmemTensorD const& smem_d, TiledMma const& tiled_mma, int thread_idx,
                            cutlass::arch::NamedBarrier const& warp_group_barrier, int& store_count,
                            MakeIssueAct const& make_issue_act) {
    if (!target_.active) {
      return;
    }
    for (int chunk = first; chunk < min(last, kActChunks); ++chunk) {
      with_static_index<kActChunks>(chunk, [&](auto static_chunk) __attribute__((always_inline)) {
        constexpr int kChunk = decltype(static_chunk)::value;
        store_chunk_through_smem<kChunk, kTileN, kEpiN, kEpiBuffers, kRowBlocks>(
            smem_d, tiled_mma, thread_idx, warp_group_barrier, store_count,
            [&](int m, int store) { return &activated_[packed_index<kEpiN, kRowBlocks>(kChunk, m, store, 0)]; },
            make_issue_act(target_));
      });
    }
    if (last >= kActChunks) {
      target_.active = false;
    }
  }

 private:
  template <int kChunk, class SmemTensorD, class TiledMma, class IssueStore>
  CUTLASS_DEVICE void store_pre_chunks(Packed const& packed, SmemTensorD const& smem_d, TiledMma const& tiled_mma,
                                       int thread_idx, cutlass::arch::NamedBarrier const& warp_group_barrier,
                                       int& store_count, IssueStore const& issue_store) {
    if constexpr (kChunk < kChunks) {
      store_packed_chunk<kChunk, kTileN, kEpiN, kEpiBuffers>(smem_d, packed, tiled_mma, thread_idx, warp_group_barrier,
                                                             store_count, issue_store);
      store_pre_chunks<kChunk + 1>(packed, smem_d, tiled_mma, thread_idx, warp_group_barrier, store_count,
                                   issue_store);
    }
  }

  // activated_ from the packed pre-activation, in store order: chunk, row block, stmatrix, matrix.
  template <GatedActivation kAct>
  CUTLASS_DEVICE void activate_tile(Packed const& packed) {
    activate_chunk<kAct, 0>(packed);
  }
  template <GatedActivation kAct, int kChunk>
  CUTLASS_DEVICE void activate_chunk(Packed const& packed) {
    if constexpr (kChunk < kActChunks) {
      CUTLASS_PRAGMA_UNROLL
      for (int m = 0; m < kRowBlocks; ++m) {
        CUTLASS_PRAGMA_UNROLL
        for (int store = 0; store < kEpiN / 16; ++store) {
          cutlass::Array<uint32_t, 4> regs;
          gated_fragment<kAct, kLayout, kTileN, kEpiN, kChunk, ElementD>(packed, m, store, regs);
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < 4; ++j) {
            activated_[packed_index<kEpiN, kRowBlocks>(kChunk, m, store, j)] = regs[j];
          }
        }
      }
      activate_chunk<kAct, kChunk + 1>(packed);
    }
  }

  uint32_t activated_[kActChunks * kRowBlocks * (kEpiN / 16) * 4];
  Target target_{};
};

}  // namespace moe_gemm
