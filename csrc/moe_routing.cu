// Fused top-k routing: one warp per token, one launch for all three scorings of moe_gemm.route.
//
// Lane l holds the scores of experts l, l + 32, l + 64, ... in registers (kPerLane of them, coalesced
// loads). The top-k is k rounds of a warp arg-max over (score desc, expert index asc), which is the
// order of the reference's stable descending sort, so the ids agree exactly; lane i keeps the i-th
// choice and writes it. Every quantity the lanes agree on (maxima, chosen ids, sums broadcast from
// lane 0) is bitwise the same in all lanes, so the warp never diverges on a data-dependent branch.
//
// NOTES: the arithmetic is that of the reference's tensor ops on CUDA, so that ids agree exactly:
// sigmoid is 1 / (1 + expf(-x)) in float32 (PyTorch's CUDA sigmoid), the group score is the float32
// sum of a group's two best biased scores, NaN logits become -inf before anything else. Weights
// agree to rounding only: the sums run in another order than PyTorch's reductions.
#include "moe_routing.h"

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moe_gemm {

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;
// The index of "no candidate": loses every comparison, even to a legitimate -inf score.
constexpr int kNoExpert = 0x7fffffff;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// The logit as the reference reads it: float32, NaN -> -inf (torch.nan_to_num(nan=-inf)).
template <typename Element>
__device__ __forceinline__ float load_logit(Element const* row, int expert) {
  float const x = to_float(row[expert]);
  return isnan(x) ? -INFINITY : x;
}

// PyTorch's CUDA sigmoid for float32, written the same way so that it rounds the same way.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// (value, index) a beats (value, index) b: larger value, or equal value and lower index.
__device__ __forceinline__ bool beats(float a_value, int a_index, float b_value, int b_index) {
  return a_value > b_value || (a_value == b_value && a_index < b_index);
}

// Warp-wide arg-max of (value desc, index asc); every lane returns the same winner.
__device__ __forceinline__ void warp_argmax(float& value, int& index) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    float const other_value = __shfl_xor_sync(kFullMask, value, offset);
    int const other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (beats(other_value, other_index, value, index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// The float32 sum over the warp, as lane 0 computes it, in every lane.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  // Butterfly sums may differ in their last bit between lanes; lane 0's is the one all use.
  return __shfl_sync(kFullMask, x, 0);
}

template <typename Element, int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize) moe_routing_kernel(RoutingParams const params) {
  int const lane = threadIdx.x % kWarpSize;
  int64_t const token = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (token >= params.T) {
    return;  // the whole warp leaves together: the token index is the same in all its lanes
  }
  Element const* row = static_cast<Element const*>(params.logits) + token * params.logits_row_stride;
  int const num_experts = params.E;
  bool const is_sigmoid = params.scoring == RoutingScoring::kSigmoid;

  // ---- Load: selection scores in registers; slots past E are "absent" from the start. ----
  float score[kPerLane];
  uint32_t absent = 0;  // bit j: slot j holds no expert, or its expert was already chosen
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    int const expert = lane + j * kWarpSize;
    if (expert < num_experts) {
      float const logit = load_logit(row, expert);
      score[j] = logit;
      if (is_sigmoid) {
        score[j] = sigmoid(logit);
        if (params.e_score_correction_bias != nullptr) {
          score[j] += params.e_score_correction_bias[expert];
        }
      }
    } else {
      score[j] = -INFINITY;
      absent |= 1u << j;
    }
  }
  uint32_t const valid = ~absent;

  // ---- DeepSeek-V3 groups: score each group, keep the topk_group best, mask the others to -inf. ----
  if (is_sigmoid && params.n_group > 0) {
    int const group_size = num_experts / params.n_group;
    float my_group_score = -INFINITY;  // lane g holds the score of group g
    for (int group = 0; group < params.n_group; ++group) {
      // The two largest values of the group, as a multiset (a tie counts twice): all the sum needs.
      float best = -INFINITY, second = -INFINITY;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        int const expert = lane + j * kWarpSize;
        if ((valid >> j & 1u) && expert / group_size == group) {
          if (score[j] > best) {
            second = best;
            best = score[j];
          } else if (score[j] > second) {
            second = score[j];
          }
        }
      }
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        float const other_best = __shfl_xor_sync(kFullMask, best, offset);
        float const other_second = __shfl_xor_sync(kFullMask, second, offset);
        second = fmaxf(fminf(best, other_best), fmaxf(second, other_second));
        best = fmaxf(best, other_best);
      }
      if (lane == group) {
        my_group_score = group_size == 1 ? best : best + second;
      }
    }
    // topk_group rounds of arg-max over the lanes' group scores; ties go to the lower group.
    uint32_t kept_groups = 0;
    float candidate = lane < params.n_group ? my_group_score : -INFINITY;
    int candidate_group = lane < params.n_group ? lane : kNoExpert;
    for (int round = 0; round < params.topk_group; ++round) {
      float value = candidate;
      int group = candidate_group;
      warp_argmax(value, group);
      kept_groups |= 1u << group;
      if (lane == group) {
        candidate = -INFINITY;
        candidate_group = kNoExpert;
      }
    }
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      int const expert = lane + j * kWarpSize;
      if ((valid >> j & 1u) && !(kept_groups >> (expert / group_size) & 1u)) {
        score[j] = -INFINITY;
      }
    }
  }

  // ---- Top-k: k rounds of warp arg-max; lane i keeps choice i. ----
  float my_value = -INFINITY;  // selection score of choice `lane`
  int my_expert = 0;
  float top_value = -INFINITY;  // the largest score of all: the softmax's max
  for (int choice = 0; choice < params.top_k; ++choice) {
    float value = -INFINITY;
    int expert = kNoExpert;
    // Slots come in increasing expert order, so the first of equal scores is the lower index.
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (!(absent >> j & 1u) && (expert == kNoExpert || score[j] > value)) {
        value = score[j];
        expert = lane + j * kWarpSize;
      }
    }
    warp_argmax(value, expert);
    if (lane == expert % kWarpSize) {
      absent |= 1u << (expert / kWarpSize);
    }
    if (lane == choice) {
      my_value = value;
      my_expert = expert;
    }
    if (choice == 0) {
      top_value = value;
    }
  }

  // ---- Weights of the chosen experts. ----
  bool const writes = lane < params.top_k;
  float weight = 0.0f;
  if (params.scoring == RoutingScoring::kSoftmax) {
    // softmax(x)_e = exp(x_e - max) / sum_e' exp(x_e' - max), the scores being the logits here; an all
    // -inf row or a +inf logit gives NaN, as in PyTorch (-inf - -inf and inf - inf are NaN).
    float partial = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (valid >> j & 1u) {
        partial += expf(score[j] - top_value);
      }
    }
    float const denominator = warp_sum(partial);
    weight = writes ? expf(my_value - top_value) / denominator : 0.0f;
    if (params.renormalize) {
      weight = weight / warp_sum(weight);
    }
  } else if (params.scoring == RoutingScoring::kSoftmaxTopK) {
    float const numerator = writes ? expf(my_value - top_value) : 0.0f;
    weight = numerator / warp_sum(numerator);
  } else {
    // Weights are the unbiased sigmoid scores, recomputed from the logit (the registers hold biased ones).
    weight = writes ? sigmoid(load_logit(row, my_expert)) : 0.0f;
    if (params.renormalize) {
      weight = weight / (warp_sum(weight) + 1e-20f);
    }
  }
  if (writes) {
    int64_t const out = token * params.top_k + lane;
    params.weights[out] = weight * params.routed_scaling_factor;
    params.ids[out] = my_expert;
  }
}

template <typename Element, int kPerLane>
cudaError_t launch(RoutingParams const& params, cudaStream_t stream) {
  int64_t const blocks = (params.T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  moe_routing_kernel<Element, kPerLane><<<dim3(static_cast<unsigned>(blocks)), kWarpsPerBlock * kWarpSize, 0,
                                          stream>>>(params);
  return cudaGetLastError();
}

// The smallest register array that holds E experts per warp: 32, 64, 128, ..., 1024 experts.
template <typename Element>
cudaError_t launch_for_experts(RoutingParams const& params, cudaStream_t stream) {
  int const per_lane = (params.E + kWarpSize - 1) / kWarpSize;
  if (per_lane <= 1) return launch<Element, 1>(params, stream);
  if (per_lane <= 2) return launch<Element, 2>(params, stream);
  if (per_lane <= 4) return launch<Element, 4>(params, stream);
  if (per_lane <= 8) return launch<Element, 8>(params, stream);
  if (per_lane <= 16) return launch<Element, 16>(params, stream);
  return launch<Element, 32>(params, stream);
}

}  // namespace

char const* check_routing(RoutingParams const& p) {
  if (p.T < 0) {
    return "the number of tokens must not be negative";
  }
  if (p.E < 1 || p.E > kRoutingMaxExperts) {
    return "the kernel takes 1 to 1024 experts";
  }
  if (p.top_k < 1 || p.top_k > p.E || p.top_k > kRoutingMaxTopK) {
    return "the kernel takes 1 <= top_k <= min(E, 32)";
  }
  if (p.T > 0 && (p.logits == nullptr || p.weights == nullptr || p.ids == nullptr)) {
    return "logits, weights and ids must not be null";
  }
  // blockIdx.x is at most 2^31 - 1.
  if ((p.T + kWarpsPerBlock - 1) / kWarpsPerBlock > 0x7fffffff) {
    return "too many tokens for one launch";
  }
  if (p.scoring != RoutingScoring::kSigmoid) {
    if (p.n_group != 0 || p.e_score_correction_bias != nullptr) {
      return "groups and e_score_correction_bias apply to the sigmoid scoring only";
    }
  } else if (p.n_group != 0) {
    if (p.n_group < 0 || p.n_group > kRoutingMaxGroups || p.E % p.n_group != 0) {
      return "the kernel takes n_group dividing E, at most 32";
    }
    if (p.topk_group < 1 || p.topk_group > p.n_group) {
      return "topk_group must be in [1, n_group]";
    }
  }
  return nullptr;
}

cudaError_t run_routing(RoutingParams const& params, cudaStream_t stream) {
  if (check_routing(params) != nullptr) {
    return cudaErrorInvalidValue;
  }
  if (params.T == 0) {
    return cudaSuccess;
  }
  switch (params.dtype) {
    case DType::kFloat32:
      return launch_for_experts<float>(params, stream);
    case DType::kBFloat16:
      return launch_for_experts<__nv_bfloat16>(params, stream);
    case DType::kFloat16:
      return launch_for_experts<__half>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe_gemm
