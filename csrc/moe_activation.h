// The gated activations of the MoE layer's up-projection and their backward, shared by the separate kernels
// (moe_layer_kernels.cu) and the GEMM epilogue that fuses the forward (sm90_moe_gated_epilogue.hpp): one formula in
// one place, so that both round the same float32 values and agree bitwise. The enums are plain C++; the device
// formula is compiled by nvcc only.
#pragma once

namespace moe_gemm {

enum class GatedActivation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

// Where gate and up sit in the 2I columns of a gate_up row (and of the up-projection's weight rows):
// interleaved gate0, up0, gate1, up1, ..., or concatenated [gate; up] halves. kNone: a plain GEMM.
enum class GateUpLayout : int { kNone = 0, kInterleaved = 1, kConcatenated = 2 };

#if defined(__CUDACC__)
// act(x) in float32 with PyTorch's CUDA formulas.
template <GatedActivation kAct>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kAct == GatedActivation::kSilu) {
    return x / (1.0f + expf(-x));  // PyTorch's CUDA silu
  } else if constexpr (kAct == GatedActivation::kGelu) {
    return x * 0.5f * (1.0f + erff(x * float(M_SQRT1_2)));  // PyTorch's CUDA gelu, approximate="none"
  } else {
    constexpr float kBeta = float(M_SQRT2 * M_2_SQRTPI * 0.5);
    constexpr float kKappa = 0.044715f;
    float const inner = kBeta * (x + kKappa * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));  // PyTorch's CUDA gelu, approximate="tanh"
  }
}

// d act(x) / dx, with PyTorch's CUDA formulas (silu_backward, gelu_backward).
template <GatedActivation kAct>
__device__ __forceinline__ float activate_derivative(float x) {
  if constexpr (kAct == GatedActivation::kSilu) {
    float const sigmoid = 1.0f / (1.0f + expf(-x));
    return sigmoid * (1.0f + x * (1.0f - sigmoid));
  } else if constexpr (kAct == GatedActivation::kGelu) {
    constexpr float kAlpha = float(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    float const cdf = 0.5f * (1.0f + erff(x * float(M_SQRT1_2)));
    float const pdf = expf(-0.5f * x * x) * kAlpha;
    return cdf + x * pdf;
  } else {
    constexpr float kBeta = float(M_SQRT2 * M_2_SQRTPI * 0.5);
    constexpr float kKappa = 0.044715f;
    float const x_squared = x * x;
    float const tanh_inner = tanhf(kBeta * (x + kKappa * x_squared * x));
    float const left_derivative = 0.5f * (1.0f + tanh_inner);
    float const right_derivative = 0.5f * x * (1.0f - tanh_inner * tanh_inner);
    return left_derivative + right_derivative * kBeta * (1.0f + 3.0f * kKappa * x_squared);
  }
}

// One element of the gated activation's backward, for a routing weight `weight` and the gradient `grad` of the
// activated value act(gate) * up (rounded to 16 bits, as the GEMM that computes it writes it). The forward's
// roundings are redone (act(gate), then act(gate) * up, each through `round`: float32 -> 16 bits -> float32), and
// the gradients are taken for weight * grad. `round` is applied to nothing else: the caller rounds grad_gate,
// grad_up and weighted once each, and adds activated * grad to the routing weight's gradient.
// Example, silu, gate = 1, up = 2, weight = 0.5, grad = 3: activated = silu(1) * 2 = 1.4621, grad_up = 0.5 * 3 *
// silu(1) = 1.0966, grad_gate = 0.5 * 3 * 2 * silu'(1) = 2.7830, weighted = 0.7311 (up to the roundings).
struct GatedGradient {
  float grad_gate;
  float grad_up;
  float weighted;   // weight * activated: the down weight gradient's operand
  float activated;  // for the routing weight's gradient <activated, grad>
};
template <GatedActivation kAct, class Round>
__device__ __forceinline__ GatedGradient gated_gradient(float gate, float up, float grad, float weight,
                                                        Round const& round) {
  float const activated_gate = round(activate<kAct>(gate));
  float const activated = round(activated_gate * up);
  float const weighted_grad = weight * grad;
  return {weighted_grad * up * activate_derivative<kAct>(gate), weighted_grad * activated_gate, weight * activated,
          activated};
}
#endif

}  // namespace moe_gemm
