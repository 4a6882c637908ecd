// The MoE layer's small kernels: dispatch (a stable counting sort of the (token, slot) pairs by expert), the gated
// activation and its backward, combine, and the FP8 quantization of activations and of expert weights. See
// moe_layer_kernels.h for what each computes.
//
// NOTES: at decode sizes these replace about twenty-five PyTorch ops (each a few microseconds of host time)
// by three launches; at prefill sizes they read and write each activation once instead of once per op.
// The forward arithmetic follows PyTorch's ops (float32 math, rounding to the element type where they round), so
// results agree with the composition of ops to the last bit or nearly: combine sums the slots in order,
// which PyTorch's reduction may not. The activation's backward rounds each output once (PyTorch's ops round
// the intermediate products too): it is at least as close to the exact gradient.
#include "moe_layer_kernels.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace moe_gemm {

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kDispatchMaxWarps = 32;
// Elements per thread and vector access in the elementwise kernels: 16 bytes of a 16-bit type.
constexpr int kVector = 8;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename Element>
__device__ __forceinline__ Element from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename Element>
struct alignas(sizeof(Element) * kVector) Vector {
  Element values[kVector];
};

// ---------------------------------------------------------------------------------------------------------------
// Dispatch

// The bucket of pair p: its expert, or E for dropped ids.
__device__ __forceinline__ int bucket_of(int64_t id, int num_experts) {
  return (id >= 0 && id < num_experts) ? static_cast<int>(id) : num_experts;
}

// Block-wide exclusive scan of values[0, count) in place; returns the total. All threads call it.
__device__ int block_exclusive_scan(int* values, int count) {
  __shared__ int warp_totals[kDispatchMaxWarps];
  int const per_thread = (count + blockDim.x - 1) / blockDim.x;
  int const begin = min(count, static_cast<int>(threadIdx.x) * per_thread);
  int const end = min(count, begin + per_thread);
  int sum = 0;
  for (int i = begin; i < end; ++i) {
    sum += values[i];
  }
  // Inclusive scan of the thread sums: within each warp, then over the warps.
  int const lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int inclusive = sum;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    int const other = __shfl_up_sync(kFullMask, inclusive, offset);
    inclusive += lane >= offset ? other : 0;
  }
  if (lane == kWarpSize - 1) {
    warp_totals[warp] = inclusive;
  }
  __syncthreads();
  int const num_warps = blockDim.x / kWarpSize;
  int warp_offset = 0, total = 0;
  for (int w = 0; w < num_warps; ++w) {
    warp_offset += w < warp ? warp_totals[w] : 0;
    total += warp_totals[w];
  }
  int running = warp_offset + inclusive - sum;
  for (int i = begin; i < end; ++i) {
    int const value = values[i];
    values[i] = running;
    running += value;
  }
  __syncthreads();
  return total;
}

// The CTA's pairs [begin, end): warp w owns [begin + w * chunk, begin + (w + 1) * chunk) and the counters
// counts(w)[0..E], which end up as the number of the CTA's pairs of each bucket in earlier warps; totals()[b] ends up
// as the CTA's number of pairs of bucket b. Shared memory: (warps + 1) * (E + 1) ints.
struct DispatchCta {
  int* shared;
  int num_buckets, num_warps, lane, warp;
  int64_t chunk_begin, chunk_end;

  __device__ DispatchCta(int* shared_memory, DispatchParams const& params, int64_t begin, int64_t end, int64_t chunk)
      : shared(shared_memory),
        num_buckets(params.E + 1),
        num_warps(blockDim.x / kWarpSize),
        lane(threadIdx.x % kWarpSize),
        warp(threadIdx.x / kWarpSize),
        chunk_begin(min(end, begin + warp * chunk)),
        chunk_end(min(end, begin + (warp + 1) * chunk)) {}

  __device__ int* counts(int w) const { return shared + w * num_buckets; }
  __device__ int* totals() const { return shared + num_warps * num_buckets; }

  __device__ void count(DispatchParams const& params) const {
    for (int i = threadIdx.x; i < (num_warps + 1) * num_buckets; i += blockDim.x) {
      shared[i] = 0;
    }
    __syncthreads();
    // Each warp's histogram of its chunk.
    for (int64_t p = chunk_begin + lane; p < chunk_end; p += kWarpSize) {
      atomicAdd(&counts(warp)[bucket_of(params.ids[p], params.E)], 1);
    }
    __syncthreads();
    // Per bucket, the exclusive prefix over the warps (in warp order, which is pair order) and the total.
    for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) {
      int running = 0;
      for (int w = 0; w < num_warps; ++w) {
        int const count = counts(w)[b];
        counts(w)[b] = running;
        running += count;
      }
      totals()[b] = running;
    }
    __syncthreads();
  }

  // Each warp places its pairs in order: a pair's row is first_rows[bucket] (where the CTA's pairs of the bucket
  // begin), plus the pairs of earlier warps and earlier steps in that bucket (counts), plus the lower lanes of this
  // step in that bucket.
  __device__ void place(DispatchParams const& params, int const* first_rows) const {
    int* warp_counts = counts(warp);
    unsigned const lower_lanes = (1u << lane) - 1u;
    for (int64_t step = chunk_begin; step < chunk_end; step += kWarpSize) {
      int64_t const p = step + lane;
      bool const active = p < chunk_end;
      // Inactive lanes take a bucket of their own, so that every lane can join the match.
      int const bucket = active ? bucket_of(params.ids[p], params.E) : num_buckets + lane;
      unsigned const peers = __match_any_sync(kFullMask, bucket);
      if (active) {
        int64_t const row = int64_t(first_rows[bucket]) + warp_counts[bucket] + __popc(peers & lower_lanes);
        params.pair_of_row[row] = p;
        params.token_of_row[row] = p / params.top_k;
        params.expert_of_row[row] = bucket;
        params.row_of_pair[p] = row;
      }
      __syncwarp();
      if (active && __ffs(peers) - 1 == lane) {
        warp_counts[bucket] += __popc(peers);
      }
      __syncwarp();
    }
  }
};

// All P pairs in one CTA (decode sizes: one launch).
__global__ void moe_dispatch_kernel(DispatchParams const params, int64_t const chunk) {
  extern __shared__ int shared[];
  DispatchCta const cta(shared, params, 0, params.P, chunk);
  cta.count(params);
  for (int b = threadIdx.x; b < params.E; b += blockDim.x) {
    params.m_sizes[b] = cta.totals()[b];
  }
  block_exclusive_scan(cta.totals(), cta.num_buckets);  // the first row of each bucket
  cta.place(params, cta.totals());
}

// Several CTAs, step 1: each CTA's bucket counts into block_counts[cta][bucket].
__global__ void moe_dispatch_count_kernel(DispatchParams const params, int64_t const chunk) {
  extern __shared__ int shared[];
  int64_t const begin = blockIdx.x * kDispatchPairsPerBlock;
  DispatchCta const cta(shared, params, begin, min(params.P, begin + kDispatchPairsPerBlock), chunk);
  cta.count(params);
  for (int b = threadIdx.x; b < cta.num_buckets; b += blockDim.x) {
    params.block_counts[int64_t(blockIdx.x) * cta.num_buckets + b] = cta.totals()[b];
  }
}

// Step 2, one CTA: block_counts[cta][bucket] becomes the first row of the CTA's pairs of that bucket (the bucket's
// first row plus the pairs of earlier CTAs in it), and m_sizes the buckets' totals.
__global__ void moe_dispatch_scan_kernel(DispatchParams const params, int const num_blocks) {
  extern __shared__ int first_rows[];
  int const num_buckets = params.E + 1;
  for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) {
    int running = 0;
    for (int block = 0; block < num_blocks; ++block) {
      int* count = &params.block_counts[int64_t(block) * num_buckets + b];
      int const value = *count;
      *count = running;
      running += value;
    }
    first_rows[b] = running;
    if (b < params.E) {
      params.m_sizes[b] = running;
    }
  }
  __syncthreads();
  block_exclusive_scan(first_rows, num_buckets);
  for (int b = threadIdx.x; b < num_buckets; b += blockDim.x) {
    for (int block = 0; block < num_blocks; ++block) {
      params.block_counts[int64_t(block) * num_buckets + b] += first_rows[b];
    }
  }
}

// Step 3: each CTA counts its pairs again (per warp) and places them from its first rows.
__global__ void moe_dispatch_place_kernel(DispatchParams const params, int64_t const chunk) {
  extern __shared__ int shared[];
  int64_t const begin = blockIdx.x * kDispatchPairsPerBlock;
  DispatchCta const cta(shared, params, begin, min(params.P, begin + kDispatchPairsPerBlock), chunk);
  cta.count(params);
  cta.place(params, params.block_counts + int64_t(blockIdx.x) * cta.num_buckets);
}

// ---------------------------------------------------------------------------------------------------------------
// Gated activation

// The gate and up values of columns [column, column + kVector) of a gate_up row, in either layout.
template <typename Element, bool kConcatenated>
__device__ __forceinline__ void load_gate_up(Element const* row, int64_t I, int64_t column, Element (&gate)[kVector],
                                             Element (&up)[kVector]) {
  if constexpr (kConcatenated) {
    auto const gate_vector = *reinterpret_cast<Vector<Element> const*>(row + column);
    auto const up_vector = *reinterpret_cast<Vector<Element> const*>(row + I + column);
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      gate[i] = gate_vector.values[i];
      up[i] = up_vector.values[i];
    }
  } else {
    auto const first = *reinterpret_cast<Vector<Element> const*>(row + 2 * column);
    auto const second = *reinterpret_cast<Vector<Element> const*>(row + 2 * column + kVector);
#pragma unroll
    for (int i = 0; i < kVector / 2; ++i) {
      gate[i] = first.values[2 * i];
      up[i] = first.values[2 * i + 1];
      gate[i + kVector / 2] = second.values[2 * i];
      up[i + kVector / 2] = second.values[2 * i + 1];
    }
  }
}

template <typename Element, bool kConcatenated>
__device__ __forceinline__ void store_gate_up(Element* row, int64_t I, int64_t column, Element const (&gate)[kVector],
                                              Element const (&up)[kVector]) {
  if constexpr (kConcatenated) {
    Vector<Element> gate_vector, up_vector;
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      gate_vector.values[i] = gate[i];
      up_vector.values[i] = up[i];
    }
    *reinterpret_cast<Vector<Element>*>(row + column) = gate_vector;
    *reinterpret_cast<Vector<Element>*>(row + I + column) = up_vector;
  } else {
    Vector<Element> first, second;
#pragma unroll
    for (int i = 0; i < kVector / 2; ++i) {
      first.values[2 * i] = gate[i];
      first.values[2 * i + 1] = up[i];
      second.values[2 * i] = gate[i + kVector / 2];
      second.values[2 * i + 1] = up[i + kVector / 2];
    }
    *reinterpret_cast<Vector<Element>*>(row + 2 * column) = first;
    *reinterpret_cast<Vector<Element>*>(row + 2 * column + kVector) = second;
  }
}

template <typename Element, GatedActivation kAct, bool kConcatenated>
__global__ void moe_gated_activation_kernel(GatedActivationParams const params) {
  int64_t const vectors_per_row = params.I / kVector;
  int64_t const num_vectors = params.rows * vectors_per_row;
  auto const* gate_up = static_cast<Element const*>(params.gate_up);
  auto* out = static_cast<Element*>(params.out);
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < num_vectors;
       v += int64_t(gridDim.x) * blockDim.x) {
    int64_t const row = v / vectors_per_row, column = (v % vectors_per_row) * kVector;
    Element gate[kVector], up[kVector];
    load_gate_up<Element, kConcatenated>(gate_up + row * 2 * params.I, params.I, column, gate, up);
    Vector<Element> result;
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      // Rounded after the activation, then after the product: act(gate) * up in the element type.
      Element const activated = from_float<Element>(activate<kAct>(to_float(gate[i])));
      result.values[i] = from_float<Element>(to_float(activated) * to_float(up[i]));
    }
    *reinterpret_cast<Vector<Element>*>(out + row * params.I + column) = result;
  }
}

// One warp per row: its lanes walk the row's columns kVector at a time, then reduce the row's dot product.
template <typename Element, GatedActivation kAct, bool kConcatenated>
__global__ void moe_gated_activation_backward_kernel(GatedActivationBackwardParams const params) {
  int const lane = threadIdx.x % kWarpSize;
  int64_t const warps_per_block = blockDim.x / kWarpSize;
  int64_t const vectors_per_row = params.I / kVector;
  auto const* grad_activated = static_cast<Element const*>(params.grad_activated);
  auto const* gate_up = static_cast<Element const*>(params.gate_up);
  auto* grad_gate_up = static_cast<Element*>(params.grad_gate_up);
  auto* weighted_activated = static_cast<Element*>(params.weighted_activated);
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; row < params.rows;
       row += int64_t(gridDim.x) * warps_per_block) {
    float const weight = params.row_weights[row];
    float dot = 0.0f;
    for (int64_t v = lane; v < vectors_per_row; v += kWarpSize) {
      int64_t const column = v * kVector;
      Element gate[kVector], up[kVector];
      load_gate_up<Element, kConcatenated>(gate_up + row * 2 * params.I, params.I, column, gate, up);
      auto const grad = *reinterpret_cast<Vector<Element> const*>(grad_activated + row * params.I + column);
      Element grad_gate[kVector], grad_up[kVector];
      Vector<Element> weighted;
#pragma unroll
      for (int i = 0; i < kVector; ++i) {
        float const g = to_float(grad.values[i]);
        GatedGradient const out = gated_gradient<kAct>(
            to_float(gate[i]), to_float(up[i]), g, weight, [](float x) { return to_float(from_float<Element>(x)); });
        dot = fmaf(out.activated, g, dot);
        weighted.values[i] = from_float<Element>(out.weighted);
        grad_up[i] = from_float<Element>(out.grad_up);
        grad_gate[i] = from_float<Element>(out.grad_gate);
      }
      store_gate_up<Element, kConcatenated>(grad_gate_up + row * 2 * params.I, params.I, column, grad_gate, grad_up);
      *reinterpret_cast<Vector<Element>*>(weighted_activated + row * params.I + column) = weighted;
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      dot += __shfl_xor_sync(kFullMask, dot, offset);
    }
    if (lane == 0) {
      params.grad_row_weights[row] = dot;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Combine

template <typename Element, typename Weight>
__global__ void moe_combine_kernel(CombineParams const params) {
  int64_t const token = blockIdx.x;
  int64_t const column = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * kVector;
  if (column >= params.H) {
    return;
  }
  auto const* y = static_cast<Element const*>(params.y);
  auto const* weights = static_cast<Weight const*>(params.weights);
  float sum[kVector] = {};
  for (int j = 0; j < params.top_k; ++j) {
    int64_t const pair = token * params.top_k + j;
    int64_t const id = params.ids[pair];
    if (id < 0 || id >= params.E) {
      continue;  // a dropped pair adds nothing, whatever its row holds
    }
    float const weight = to_float(weights[pair]);
    auto const rows = *reinterpret_cast<Vector<Element> const*>(y + params.row_of_pair[pair] * params.H + column);
#pragma unroll
    for (int i = 0; i < kVector; ++i) {
      // Product then sum, each rounded (no fused multiply-add), as PyTorch's mul and sum are.
      sum[i] = __fadd_rn(sum[i], __fmul_rn(to_float(rows.values[i]), weight));
    }
  }
  Vector<Element> result;
#pragma unroll
  for (int i = 0; i < kVector; ++i) {
    result.values[i] = from_float<Element>(sum[i]);
  }
  *reinterpret_cast<Vector<Element>*>(static_cast<Element*>(params.out) + token * params.H + column) = result;
}

// ---------------------------------------------------------------------------------------------------------------
// FP8 quantization

// max that propagates NaN from either side, as torch's amax does (fmaxf drops it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_nan_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = nan_max(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

// The block's NaN-propagating max of every thread's value, returned to every thread; warp_max holds one float per
// warp. The caller synchronizes again before warp_max is written next.
template <int kThreads>
__device__ __forceinline__ float block_nan_max(float value, float* warp_max) {
  value = warp_nan_max(value);
  if (threadIdx.x % kWarpSize == 0) {
    warp_max[threadIdx.x / kWarpSize] = value;
  }
  __syncthreads();
  value = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / kWarpSize; ++w) {
    value = nan_max(value, warp_max[w]);
  }
  return value;
}

// amax / 448 floored at FLT_MIN, NaN kept (torch's clamp_min keeps it). A product with the reciprocal, as
// _ops.fp8_scale writes it (torch on CUDA divides by a Python number that way): the division can differ in the
// last bit.
__device__ __forceinline__ float fp8_scale(float amax) {
  float const scale = __fmul_rn(amax, 1.0f / 448.0f);
  return scale < FLT_MIN ? FLT_MIN : scale;
}

// Saturation to +-448 then round to nearest even, as clamp then .to(torch.float8_e4m3fn); NaN stays NaN.
__device__ __forceinline__ uint8_t to_e4m3(float value) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3));
}

// Groups of 128 columns: one warp per (row, group), lane l holding columns 32 i + l of it, so that each warp access
// is one contiguous run and a short input (decode's few rows) still spreads over every SM.
template <typename Element>
__global__ void moe_quantize_fp8_groups_kernel(QuantizeFp8Params const params) {
  int const lane = threadIdx.x % kWarpSize;
  int64_t const warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  int64_t const groups = (params.K + 127) / 128;
  for (int64_t item = blockIdx.x * int64_t(blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
       item < params.rows * groups; item += warps) {
    int64_t const row = item / groups;
    int64_t const first = (item % groups) * 128;
    Element const* x = static_cast<Element const*>(params.x) + row * params.ld;
    uint8_t* out = params.x_fp8 + row * params.K;
    float values[4];
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int64_t const c = first + i * kWarpSize + lane;
      values[i] = c < params.K ? to_float(x[c]) : 0.0f;
      amax = nan_max(amax, fabsf(values[i]));
    }
    float const scale = fp8_scale(warp_nan_max(amax));
    if (lane == 0) {
      params.scale[item] = scale;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int64_t const c = first + i * kWarpSize + lane;
      if (c < params.K) {
        out[c] = to_e4m3(__fdiv_rn(values[i], scale));
      }
    }
  }
}

// One scale per row: one block per row, the block's max over shared memory, then a second read of the row (from L1
// or L2) to write it.
template <typename Element, int kThreads>
__global__ void moe_quantize_fp8_rows_kernel(QuantizeFp8Params const params) {
  __shared__ float warp_amax[kThreads / kWarpSize];
  for (int64_t row = blockIdx.x; row < params.rows; row += gridDim.x) {
    Element const* x = static_cast<Element const*>(params.x) + row * params.ld;
    uint8_t* out = params.x_fp8 + row * params.K;
    float amax = 0.0f;
    for (int64_t c = threadIdx.x; c < params.K; c += kThreads) {
      amax = nan_max(amax, fabsf(to_float(x[c])));
    }
    amax = block_nan_max<kThreads>(amax, warp_amax);
    __syncthreads();  // warp_amax is rewritten by the next row
    float const scale = fp8_scale(amax);
    if (threadIdx.x == 0) {
      params.scale[row] = scale;
    }
    for (int64_t c = threadIdx.x; c < params.K; c += kThreads) {
      out[c] = to_e4m3(__fdiv_rn(to_float(x[c]), scale));
    }
  }
}

// QuantizeFp8WeightParams: a persistent kernel. Each thread block quantizes weight blocks blockIdx.x, blockIdx.x +
// gridDim.x, ... (numbered e, then i, then j), and has the next one's loads in flight (cp.async into the other of two
// shared buffers) while it quantizes the current one: a block that loaded, then quantized, then exited left the
// memory idle for its whole arithmetic, 1.5 TB/s of bytes moved on an H200.
constexpr int kWeightBlock = 128;
constexpr int kWeightThreads = 256;

template <typename Element>
constexpr int weight_kernel_shared_bytes(bool transposed) {
  return 2 * kWeightBlock * kWeightBlock * int(sizeof(Element)) + (transposed ? kWeightBlock * kWeightBlock : 0);
}

// 16 bytes from global to shared memory, asynchronously; zeros where !valid (nothing is read then).
__device__ __forceinline__ void copy_async_16(void* shared, void const* global, bool valid) {
  auto const address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid ? 16 : 0));
}

template <typename Element, bool kTransposed>
__global__ void __launch_bounds__(kWeightThreads) moe_quantize_fp8_weight_kernel(QuantizeFp8WeightParams const params) {
  constexpr int kWidth = 16 / sizeof(Element);  // values per vector: 8 of a 16-bit type, 4 floats
  constexpr int kVectorsPerRow = kWeightBlock / kWidth;
  constexpr int kVectorsPerThread = kWeightBlock * kVectorsPerRow / kWeightThreads;
  extern __shared__ __align__(16) uint8_t weight_shared[];
  // buffers[2][a][b]: the stored block, as loaded; then, for `transposed`, tile[a][b]: its fp8 values.
  Element* const buffers = reinterpret_cast<Element*>(weight_shared);
  uint8_t* const tile = weight_shared + 2 * kWeightBlock * kWeightBlock * sizeof(Element);
  __shared__ float warp_amax[kWeightThreads / kWarpSize];
  int64_t const blocks_a = (params.A + kWeightBlock - 1) / kWeightBlock;
  int64_t const blocks_b = (params.B + kWeightBlock - 1) / kWeightBlock;
  int64_t const total = params.E * blocks_a * blocks_b;
  // A vector lies wholly inside the weight or wholly past its edge (B is a multiple of 8); past it, zeros, as the
  // PyTorch path's padding.
  auto load = [&](int64_t block, int buffer) {
    if (block < total) {
      int64_t const e = block / (blocks_a * blocks_b);
      int64_t const a0 = block / blocks_b % blocks_a * kWeightBlock, b0 = block % blocks_b * kWeightBlock;
      Element const* weight = static_cast<Element const*>(params.weight) + e * params.stride_e;
#pragma unroll
      for (int i = 0; i < kVectorsPerThread; ++i) {
        int const v = threadIdx.x + i * kWeightThreads;
        int const a = v / kVectorsPerRow, b = (v % kVectorsPerRow) * kWidth;
        bool const valid = a0 + a < params.A && b0 + b < params.B;
        copy_async_16(buffers + (buffer * kWeightBlock + a) * kWeightBlock + b,
                      valid ? weight + (a0 + a) * params.stride_a + b0 + b : weight, valid);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  load(blockIdx.x, 0);
  int buffer = 0;
  for (int64_t block = blockIdx.x; block < total; block += gridDim.x, buffer ^= 1) {
    load(block + gridDim.x, buffer ^ 1);
    asm volatile("cp.async.wait_group 1;\n" ::);  // this block's loads have landed; the next one's are in flight
    __syncthreads();
    int64_t const e = block / (blocks_a * blocks_b);
    int64_t const i = block / blocks_b % blocks_a, j = block % blocks_b;
    int64_t const a0 = i * kWeightBlock, b0 = j * kWeightBlock;
    uint4 loaded[kVectorsPerThread];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < kVectorsPerThread; ++k) {
      int const v = threadIdx.x + k * kWeightThreads;
      int const a = v / kVectorsPerRow, b = (v % kVectorsPerRow) * kWidth;
      loaded[k] = *reinterpret_cast<uint4 const*>(buffers + (buffer * kWeightBlock + a) * kWeightBlock + b);
      Element const* values = reinterpret_cast<Element const*>(&loaded[k]);
#pragma unroll
      for (int w = 0; w < kWidth; ++w) {
        amax = nan_max(amax, fabsf(to_float(values[w])));
      }
    }
    // (The loop's last barrier orders this block's writes of warp_amax after the previous block's reads.)
    float const scale = fp8_scale(block_nan_max<kWeightThreads>(amax, warp_amax));
    if (threadIdx.x == 0) {
      params.scale[kTransposed ? (e * blocks_b + j) * blocks_a + i : (e * blocks_a + i) * blocks_b + j] = scale;
    }
    using Packed = std::conditional_t<kWidth == 8, uint2, uint32_t>;  // kWidth fp8 values
#pragma unroll
    for (int k = 0; k < kVectorsPerThread; ++k) {
      Element const* values = reinterpret_cast<Element const*>(&loaded[k]);
      uint32_t words[kWidth / 4] = {};
#pragma unroll
      for (int w = 0; w < kWidth; ++w) {
        words[w / 4] |= uint32_t(to_e4m3(__fdiv_rn(to_float(values[w]), scale))) << (8 * (w % 4));
      }
      int const v = threadIdx.x + k * kWeightThreads;
      int const a = v / kVectorsPerRow, b = (v % kVectorsPerRow) * kWidth;
      if constexpr (kTransposed) {
        *reinterpret_cast<Packed*>(tile + a * kWeightBlock + b) = *reinterpret_cast<Packed const*>(words);
      } else if (a0 + a < params.A && b0 + b < params.B) {
        *reinterpret_cast<Packed*>(params.values + (e * params.A + a0 + a) * params.B + b0 + b) =
            *reinterpret_cast<Packed const*>(words);
      }
    }
    if constexpr (kTransposed) {
      __syncthreads();
      // Thread t writes column b = t % 128 of the stored block, rows a .. a + 7 for eight a in its half: a warp's
      // shared-memory reads are 32 consecutive bytes of one row; its stores, 8 bytes into each of 32 output rows.
      int const b = threadIdx.x % kWeightBlock;
      constexpr int kHalf = kWeightBlock / (kWeightThreads / kWeightBlock);
      int const first = threadIdx.x / kWeightBlock * kHalf;
      for (int a = first; b0 + b < params.B && a < first + kHalf && a0 + a < params.A; a += 8) {
        uint32_t words[2] = {};
#pragma unroll
        for (int w = 0; w < 8; ++w) {
          words[w / 4] |= uint32_t(tile[(a + w) * kWeightBlock + b]) << (8 * (w % 4));
        }
        *reinterpret_cast<uint2*>(params.values + (e * params.B + b0 + b) * params.A + a0 + a) =
            make_uint2(words[0], words[1]);
      }
    }
    __syncthreads();  // the buffer is loaded again, and the tile rewritten, for the block after next
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
}

// ---------------------------------------------------------------------------------------------------------------
// Type dispatch

template <typename Function>
cudaError_t with_element(DType dtype, Function&& function) {
  switch (dtype) {
    case DType::kFloat32:
      return function(float{});
    case DType::kBFloat16:
      return function(__nv_bfloat16{});
    case DType::kFloat16:
      return function(__half{});
  }
  return cudaErrorInvalidValue;
}

int elementwise_blocks(int64_t num_vectors, int threads) {
  // A grid-stride loop; a few waves of blocks are enough to keep every SM busy.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((num_vectors + threads - 1) / threads, 8192)));
}


// PullRowsParams: block (x, s) copies rows x * kPullRowsPerBlock .. + kPullRowsPerBlock of source s, 16 bytes per
// thread per step. The loads cross NVLink: the CTA keeps kPullRowsPerBlock rows of requests in flight.
constexpr int kPullRowsPerBlock = 4;
constexpr int kPullThreads = 256;
constexpr int kPullLoadsInFlight = 4;

__global__ void __launch_bounds__(kPullThreads) moe_pull_rows_kernel(PullRowsParams params) {
  int const source = int(blockIdx.y);
  int64_t const count = params.counts[source];
  int64_t const first = int64_t(blockIdx.x) * kPullRowsPerBlock;
  if (first >= count) {
    return;
  }
  int64_t const rows = count - first < kPullRowsPerBlock ? count - first : kPullRowsPerBlock;
  char const* const peer = static_cast<char const*>(params.peer_ptrs[source]) + params.region_offset;
  char const* const from = peer + (params.src_start[source] + first) * params.row_bytes;
  char* const to = static_cast<char*>(params.out) + (params.dst_start[source] + first) * params.row_bytes;
  int64_t const chunks = rows * params.row_bytes / 16;  // the rows are contiguous on both sides
  // kPullLoadsInFlight loads before their stores: one 16-byte load at a time would wait out NVLink's latency each.
  for (int64_t c = threadIdx.x; c < chunks; c += kPullLoadsInFlight * kPullThreads) {
    uint4 values[kPullLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kPullLoadsInFlight; ++u) {
      if (c + u * kPullThreads < chunks) {
        values[u] = reinterpret_cast<uint4 const*>(from)[c + u * kPullThreads];
      }
    }
#pragma unroll
    for (int u = 0; u < kPullLoadsInFlight; ++u) {
      if (c + u * kPullThreads < chunks) {
        reinterpret_cast<uint4*>(to)[c + u * kPullThreads] = values[u];
      }
    }
  }
}
}  // namespace

cudaError_t run_dispatch(DispatchParams const& params, cudaStream_t stream) {
  if (params.P == 0) {
    if (params.E > 0) {
      return cudaMemsetAsync(params.m_sizes, 0, sizeof(int64_t) * params.E, stream);
    }
    return cudaSuccess;
  }
  if (params.E < 0 || params.E > kDispatchMaxExperts || params.top_k < 1 || params.P > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  int const num_buckets = params.E + 1;
  int64_t const num_blocks = (params.P + kDispatchPairsPerBlock - 1) / kDispatchPairsPerBlock;
  // Per CTA, as many warps as the counters of (warps + 1) buckets rows fit in shared memory, and the pairs need.
  int64_t const pairs_per_block = std::min<int64_t>(params.P, kDispatchPairsPerBlock);
  int64_t const warps_for_pairs = (pairs_per_block + kWarpSize - 1) / kWarpSize;
  int const warps_that_fit = kDispatchSharedBytes / (4 * num_buckets) - 1;
  int const num_warps = static_cast<int>(std::min<int64_t>({kDispatchMaxWarps, warps_that_fit, warps_for_pairs}));
  int64_t const chunk = (pairs_per_block + num_warps - 1) / num_warps;
  size_t const shared_bytes = sizeof(int) * size_t(num_warps + 1) * num_buckets;
  if (num_blocks == 1) {
    moe_dispatch_kernel<<<1, num_warps * kWarpSize, shared_bytes, stream>>>(params, chunk);
    return cudaGetLastError();
  }
  if (params.block_counts == nullptr) {
    return cudaErrorInvalidValue;
  }
  auto const grid = static_cast<unsigned>(num_blocks);
  moe_dispatch_count_kernel<<<grid, num_warps * kWarpSize, shared_bytes, stream>>>(params, chunk);
  moe_dispatch_scan_kernel<<<1, kDispatchMaxWarps * kWarpSize, sizeof(int) * num_buckets, stream>>>(
      params, static_cast<int>(num_blocks));
  moe_dispatch_place_kernel<<<grid, num_warps * kWarpSize, shared_bytes, stream>>>(params, chunk);
  return cudaGetLastError();
}

// Calls function(element, act, concatenated) with the element type and the two options as compile-time
// constants (std::integral_constant), the template arguments of the activation kernels.
template <typename Function>
cudaError_t with_activation(DType dtype, GatedActivation act, bool concatenated, Function&& function) {
  return with_element(dtype, [&](auto element) {
    auto with_layout = [&](auto act_constant) {
      return concatenated ? function(element, act_constant, std::true_type{})
                          : function(element, act_constant, std::false_type{});
    };
    switch (act) {
      case GatedActivation::kSilu:
        return with_layout(std::integral_constant<GatedActivation, GatedActivation::kSilu>{});
      case GatedActivation::kGelu:
        return with_layout(std::integral_constant<GatedActivation, GatedActivation::kGelu>{});
      case GatedActivation::kGeluTanh:
        return with_layout(std::integral_constant<GatedActivation, GatedActivation::kGeluTanh>{});
    }
    return cudaErrorInvalidValue;
  });
}

cudaError_t run_gated_activation(GatedActivationParams const& params, cudaStream_t stream) {
  if (params.rows == 0 || params.I == 0) {
    return cudaSuccess;
  }
  if (params.I % kVector != 0) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;
  int const blocks = elementwise_blocks(params.rows * (params.I / kVector), kThreads);
  return with_activation(params.dtype, params.act, params.concatenated, [&](auto element, auto act, auto layout) {
    moe_gated_activation_kernel<decltype(element), act.value, layout.value><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t run_gated_activation_backward(GatedActivationBackwardParams const& params, cudaStream_t stream) {
  if (params.rows == 0) {
    return cudaSuccess;
  }
  if (params.I % kVector != 0) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;  // 8 rows at a time per block
  int const blocks = elementwise_blocks(params.rows, kThreads / kWarpSize);
  return with_activation(params.dtype, params.act, params.concatenated, [&](auto element, auto act, auto layout) {
    moe_gated_activation_backward_kernel<decltype(element), act.value, layout.value>
        <<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t run_combine(CombineParams const& params, cudaStream_t stream) {
  if (params.T == 0 || params.H == 0) {
    return cudaSuccess;
  }
  if (params.H % kVector != 0 || params.T > 0x7fffffff || params.top_k < 1) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 128;
  int64_t const column_blocks = (params.H / kVector + kThreads - 1) / kThreads;
  dim3 const grid(static_cast<unsigned>(params.T), static_cast<unsigned>(column_blocks));
  return with_element(params.dtype, [&](auto element) {
    using Element = decltype(element);
    return with_element(params.weights_dtype, [&](auto weight) {
      using Weight = decltype(weight);
      moe_combine_kernel<Element, Weight><<<grid, kThreads, 0, stream>>>(params);
      return cudaGetLastError();
    });
  });
}

cudaError_t run_quantize_fp8(QuantizeFp8Params const& params, cudaStream_t stream) {
  if (params.rows == 0 || (params.K == 0 && params.group != 0)) {
    return cudaSuccess;
  }
  if (params.group != 0 && params.group != 128) {
    return cudaErrorInvalidValue;
  }
  return with_element(params.dtype, [&](auto element) {
    using Element = decltype(element);
    constexpr int kThreads = 256;
    if (params.group == 0) {
      int const blocks = static_cast<int>(std::min<int64_t>(params.rows, 65536));
      moe_quantize_fp8_rows_kernel<Element, kThreads><<<blocks, kThreads, 0, stream>>>(params);
    } else {
      int64_t const items = params.rows * ((params.K + 127) / 128);
      constexpr int kWarps = kThreads / kWarpSize;
      int const blocks = static_cast<int>(std::min<int64_t>((items + kWarps - 1) / kWarps, 65536));
      moe_quantize_fp8_groups_kernel<Element><<<blocks, kThreads, 0, stream>>>(params);
    }
    return cudaGetLastError();
  });
}

cudaError_t run_quantize_fp8_weight(QuantizeFp8WeightParams const& params, cudaStream_t stream) {
  if (params.E == 0 || params.A == 0 || params.B == 0) {
    return cudaSuccess;
  }
  bool const aligned = reinterpret_cast<uintptr_t>(params.weight) % 16 == 0 && params.stride_e % 8 == 0 &&
                       params.stride_a % 8 == 0 && params.B % 8 == 0 && (!params.transposed || params.A % 8 == 0);
  if (!aligned) {
    return cudaErrorInvalidValue;
  }
  int64_t const blocks = params.E * ((params.A + kWeightBlock - 1) / kWeightBlock) *
                         ((params.B + kWeightBlock - 1) / kWeightBlock);
  return with_element(params.dtype, [&](auto element) {
    using Element = decltype(element);
    auto launch = [&](auto kernel) {
      int const shared_bytes = weight_kernel_shared_bytes<Element>(params.transposed);
      int device = 0, sms = 0, per_sm = 0;
      cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
      if (status == cudaSuccess) status = cudaGetDevice(&device);
      if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      if (status == cudaSuccess) {
        status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWeightThreads, shared_bytes);
      }
      if (status != cudaSuccess) {
        return status;
      }
      auto const grid = static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{std::max(1, per_sm)} * sms));
      kernel<<<grid, kWeightThreads, shared_bytes, stream>>>(params);
      return cudaGetLastError();
    };
    return params.transposed ? launch(moe_quantize_fp8_weight_kernel<Element, true>)
                             : launch(moe_quantize_fp8_weight_kernel<Element, false>);
  });
}

cudaError_t run_pull_rows(PullRowsParams const& params, cudaStream_t stream) {
  if (params.max_rows == 0 || params.num_sources == 0) {
    return cudaSuccess;
  }
  dim3 const grid(unsigned((params.max_rows + kPullRowsPerBlock - 1) / kPullRowsPerBlock), unsigned(params.num_sources));
  moe_pull_rows_kernel<<<grid, kPullThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace moe_gemm
