// Host side of the weight-gradient kernel: the CUTLASS collective mainloop for (input dtype, output
// dtype), the kernel for (that, the gathered operand), and its persistent launch. One instantiation per .cu file.
#pragma once

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"

#include "moe_gemm.h"
#include "sm90_moe_wgrad_kernel.hpp"
#include "sm90_persistent_launch.cuh"

namespace moe_gemm {

template <DType kDType, bool kFloat32Out, WgradGather kGather = WgradGather::kNone>
struct Sm90MoeWgradConfig {
  using Element = typename CutlassElement<kDType>::type;
  using ElementD = cute::conditional_t<kFloat32Out, float, Element>;
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  // Operand A is L^T (P x rows) and B is R (rows x Q in CUTLASS's K x N naming): both contiguous
  // along P and Q, i.e. A column-major and B row-major.
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::ColumnMajor, 8,
      Element, cutlass::layout::RowMajor, 8,
      float, TileShape, cute::Shape<cute::_1, cute::_1, cute::_1>,
      cutlass::gemm::collective::StageCountAutoCarveout<wgrad_epilogue_smem_bytes(128)>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = Sm90MoeWgradKernel<CollectiveMainloop, ElementD, kGather == WgradGather::kL,
                                    kGather == WgradGather::kR>;
};

template <DType kDType, bool kFloat32Out, WgradGather kGather>
cudaError_t run_sm90_moe_wgrad(GroupedWgradParams const& p, GroupedWgradPlan const& plan, cudaStream_t stream) {
  using Kernel = typename Sm90MoeWgradConfig<kDType, kFloat32Out, kGather>::Kernel;
  char* const workspace = static_cast<char*>(p.workspace);
  typename Kernel::Arguments const args{
      p.l, p.ldl, p.r, p.ldr, p.d, p.ldd, p.batch_stride_d, p.m_sizes, p.m_sizes_int64, p.M, p.P, p.Q, p.E,
      p.accumulate, reinterpret_cast<int*>(workspace + plan.workspace.tile_counter_offset),
      kGather == WgradGather::kL ? p.l_rows : p.r_rows,
      kGather == WgradGather::kL ? p.l_source_rows : p.r_source_rows};
  typename Kernel::Params params{};
  if (cudaError_t status = Kernel::to_underlying_arguments(args, params); status != cudaSuccess) {
    return status;
  }
  return launch_persistent<Kernel>(params, Kernel::num_tiles(args), plan.sm_count, stream);
}

}  // namespace moe_gemm

#define MOE_GEMM_INSTANTIATE_WGRAD(DTYPE, FLOAT32_OUT, GATHER)                                         \
  template cudaError_t                                                                                  \
  moe_gemm::run_sm90_moe_wgrad<moe_gemm::DType::DTYPE, FLOAT32_OUT, moe_gemm::WgradGather::GATHER>(     \
      moe_gemm::GroupedWgradParams const&, moe_gemm::GroupedWgradPlan const&, cudaStream_t);
