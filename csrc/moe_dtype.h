// The element types of the tensors the kernels read and write, shared by every seam (moe_gemm.h,
// moe_routing.h, moe_layer_kernels.h). Plain C++, no CUDA or torch types.
#pragma once

namespace moe_gemm {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

}  // namespace moe_gemm
