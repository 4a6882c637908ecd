// The seam of the fused routing kernel (moe_routing.cu): plain pointers and sizes, no torch types.
// It computes what moe_gemm.route does (moe_gemm/routing.py), one warp per token, in one launch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "moe_dtype.h"

namespace moe_gemm {

enum class RoutingScoring : int {
  kSoftmax = 0,      // softmax over the experts, the top_k largest, optionally renormalised (Mixtral, Qwen-MoE)
  kSoftmaxTopK = 1,  // the top_k largest logits, then a softmax over them (GPT-OSS)
  kSigmoid = 2,      // DeepSeek-V3: biased, optionally grouped, top-k on sigmoid scores
};

// Limits of the kernel: a lane holds up to 32 experts, one chosen expert, and one group score.
constexpr int kRoutingMaxExperts = 1024;
constexpr int kRoutingMaxTopK = 32;
constexpr int kRoutingMaxGroups = 32;

// For each token t: ids[t, :] are the top_k experts in descending order of the selection score (equal
// scores go to the lower expert index, also among groups), weights[t, :] their float32 weights.
// NaN logits count as -inf. See moe_gemm.route for the scorings.
struct RoutingParams {
  void const* logits = nullptr;                   // [T, E], rows logits_row_stride elements apart, inner stride 1
  int64_t logits_row_stride = 0;
  DType dtype = DType::kFloat32;
  float const* e_score_correction_bias = nullptr;  // [E] float32, kSigmoid only; null: no bias
  float* weights = nullptr;                       // [T, top_k] contiguous
  int64_t* ids = nullptr;                         // [T, top_k] contiguous
  int64_t T = 0;
  int32_t E = 0;
  int32_t top_k = 0;
  RoutingScoring scoring = RoutingScoring::kSoftmax;
  bool renormalize = false;
  int32_t n_group = 0;                            // kSigmoid only; 0: no groups
  int32_t topk_group = 0;
  float routed_scaling_factor = 1.0f;
};

// Nullptr when the kernel can run these params, else a sentence saying what is wrong.
char const* check_routing(RoutingParams const& params);

// Launches the routing kernel on `stream` (nothing when T == 0). Asynchronous; returns the launch status.
cudaError_t run_routing(RoutingParams const& params, cudaStream_t stream);

}  // namespace moe_gemm
