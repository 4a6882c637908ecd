// The element types of the tensors the kernels read and write, shared by every seam (moe_gemm.h,
// moe_routing.h, moe_layer_kernels.h). Plain C++, no CUDA or torch types.
#pragma once

namespace moe_gemm {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

// How FP8 operands are scaled back (the float32 scales multiply the float8_e4m3fn values): kRowwise, one scale per
// row of x and per output channel of the weight; kBlockwise, one per 128 x 128 block of the weight and per row
// and 128 columns of x (or per row). kNone: 16-bit operands, no scales.
enum class Fp8Scales : int { kNone = 0, kRowwise = 1, kBlockwise = 2 };

}  // namespace moe_gemm
