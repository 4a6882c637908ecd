// The gated activations of the MoE layer's up-projection, shared by the separate activation kernel
// (moe_layer_kernels.cu) and the GEMM epilogue that fuses it (sm90_moe_gated_epilogue.hpp): one formula in
// one place, so that both round the same float32 value and agree bitwise. The enums are plain C++; the device
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
#endif

}  // namespace moe_gemm
