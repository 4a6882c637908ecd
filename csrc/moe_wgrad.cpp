// Host dispatch of the weight-gradient kernel: argument checks, the empty cases, and the switch over
// the explicit instantiations (csrc/instantiations/sm90_moe_wgrad_*.cu: input dtype x output dtype, and the
// kernels that gather L's or R's rows, for gradients in the input dtype). Plain C++.
#include <cstdint>

#include "cuda_context.h"
#include "moe_gemm.h"

namespace moe_gemm {

template <DType kDType, bool kFloat32Out, WgradGather kGather>
cudaError_t run_sm90_moe_wgrad(GroupedWgradParams const& params, GroupedWgradPlan const& plan, cudaStream_t stream);

namespace {

// The operand the params gather (both: kL, which check_grouped_wgrad refuses).
WgradGather gathered_operand(GroupedWgradParams const& p) {
  return p.l_rows != nullptr ? WgradGather::kL : p.r_rows != nullptr ? WgradGather::kR : WgradGather::kNone;
}

}  // namespace

char const* check_grouped_wgrad(GroupedWgradParams const& p) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) {
    return "the kernel takes bfloat16 or float16 inputs";
  }
  if (p.M < 0 || p.P < 0 || p.Q < 0 || p.E < 0) {
    return "sizes must be non-negative";
  }
  // The ragged descriptors' window (sm90_moe_wgrad_kernel.hpp) holds up to 2^30 rows.
  if (p.M > (int64_t(1) << 30) || p.P >= (int64_t(1) << 31) || p.Q >= (int64_t(1) << 31)) {
    return "M must be at most 2^30 and N, K below 2^31 (TMA coordinates)";
  }
  if (p.P % 8 != 0 || p.Q % 8 != 0) {
    return "N and K must be multiples of 8 (rows of 16 bytes for TMA)";
  }
  int64_t const d_align = p.d_float32 ? 4 : 8;  // 16 bytes
  if (p.ldl % 8 != 0 || p.ldr % 8 != 0 || p.ldd % d_align != 0 || p.batch_stride_d % d_align != 0) {
    return "row and expert strides must be multiples of 16 bytes";
  }
  if (!aligned16(p.l) || !aligned16(p.r) || !aligned16(p.d)) {
    return "x, grad_y and the gradient must start at 16-byte aligned addresses";
  }
  if (p.accumulate && !p.d_float32) {
    return "accumulation needs a float32 gradient buffer";
  }
  if (p.E > 0 && p.m_sizes == nullptr) {
    return "m_sizes is null";
  }
  if (p.l_rows != nullptr && p.r_rows != nullptr) {
    return "only one of x and grad_y can be gathered in one call";
  }
  if (gathered_operand(p) != WgradGather::kNone) {
    // Instantiated for the MoE layer's gradients, in the input dtype (moe_wgrad instantiations *_gather_*.cu).
    if (p.d_float32 || p.accumulate) {
      return "a gathered operand needs a gradient in the input dtype (accumulation into a float32 main_grad does "
             "not gather)";
    }
    int64_t const source_rows = p.l_rows != nullptr ? p.l_source_rows : p.r_source_rows;
    if (p.M > 0 && (source_rows < 1 || source_rows >= (int64_t(1) << 31))) {
      return "the gathered operand's source must have 1 to 2^31 - 1 rows (TMA coordinates)";
    }
    int64_t const ld = p.l_rows != nullptr ? p.ldl : p.ldr;
    if (p.M > 0 && (ld < 0 || ld >= (int64_t(1) << 31))) {
      return "the gathered operand's source rows must be 0 to 2^31 - 1 elements apart";
    }
  }
  // The scheduler numbers the 128x256 tiles of all experts' gradients with int32s.
  if (((p.P + 127) / 128) * ((p.Q + 255) / 256) * int64_t(p.E) >= (int64_t(1) << 31) - (int64_t(1) << 20)) {
    return "the gradient has too many tiles (over 2^31 of 128 x 256 elements)";
  }
  return nullptr;
}

GroupedWgradPlan plan_grouped_wgrad(GroupedWgradParams const& p) {
  GroupedWgradPlan plan;
  plan.gather = gathered_operand(p);
  if (p.M > 0 && p.P > 0 && p.Q > 0 && p.E > 0) {
    plan.sm_count = p.sm_count > 0 ? p.sm_count : current_sm_count();
    // The tile counter: ragged experts take unequal times, so tiles are always handed out dynamically.
    plan.workspace = workspace_layout(p.M, p.P, p.E, 128, 256, /*dynamic=*/true, /*split_k=*/1);
  }
  return plan;
}

cudaError_t run_grouped_wgrad(GroupedWgradParams const& p, GroupedWgradPlan const& plan, cudaStream_t stream) {
  if (check_grouped_wgrad(p) != nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.P == 0 || p.Q == 0 || p.E == 0) {
    return cudaSuccess;
  }
  if (p.M == 0) {
    // Every expert sums over no rows: zero, or nothing to add.
    if (p.accumulate) {
      return cudaSuccess;
    }
    size_t const element = p.d_float32 ? 4 : 2;
    bool const dense = p.batch_stride_d == p.P * p.ldd;
    for (int32_t e = 0; e < (dense ? 1 : p.E); ++e) {
      void* expert_d = static_cast<char*>(p.d) + e * p.batch_stride_d * element;
      cudaError_t status = cudaMemset2DAsync(expert_d, p.ldd * element, 0, p.Q * element,
                                             dense ? p.P * p.E : p.P, stream);
      if (status != cudaSuccess) {
        return status;
      }
    }
    return cudaSuccess;
  }
  if (plan.workspace.total_bytes == 0 || plan.gather != gathered_operand(p)) {
    return cudaErrorInvalidValue;  // not this call's plan: a call with rows has a tile counter
  }
  if (cudaError_t status = prepare_launch(plan.workspace, p.workspace, stream); status != cudaSuccess) {
    return status;
  }
  return with_16bit_dtype_and_flag(p.dtype, p.d_float32, [&](auto dtype, auto float32_out) {
    constexpr DType kDType = decltype(dtype)::value;
    if constexpr (decltype(float32_out)::value) {
      return run_sm90_moe_wgrad<kDType, true, WgradGather::kNone>(p, plan, stream);  // never gathers (checked)
    } else {
      switch (plan.gather) {
        case WgradGather::kL:
          return run_sm90_moe_wgrad<kDType, false, WgradGather::kL>(p, plan, stream);
        case WgradGather::kR:
          return run_sm90_moe_wgrad<kDType, false, WgradGather::kR>(p, plan, stream);
        default:
          return run_sm90_moe_wgrad<kDType, false, WgradGather::kNone>(p, plan, stream);
      }
    }
  });
}

}  // namespace moe_gemm
