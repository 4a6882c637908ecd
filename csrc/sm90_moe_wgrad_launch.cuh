// Host side of the weight-gradient kernel: the CUTLASS collective mainloop for (input dtype, output
// dtype), the three TMA descriptors, and the persistent launch. One instantiation per .cu file.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <cuda.h>

#include "cute/tensor.hpp"
#include "cutlass/cuda_host_adapter.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/numeric_types.h"

#include "moe_gemm.h"
#include "sm90_moe_wgrad_kernel.hpp"

namespace moe_gemm {

template <DType kDType, bool kFloat32Out>
struct Sm90MoeWgradConfig {
  using Element = cute::conditional_t<kDType == DType::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;
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
  using Kernel = Sm90MoeWgradKernel<CollectiveMainloop, ElementD>;
};

namespace detail {

// A tiled TMA descriptor over `rank` dimensions (dimension 0 contiguous), 128-byte swizzle.
inline cudaError_t encode_tma(CUtensorMap* map, CUtensorMapDataType type, int element_bytes, void const* base,
                              int rank, uint64_t const* dims, uint64_t const* strides_elements,
                              uint32_t const* box) {
  cuuint64_t global_dims[4];
  cuuint64_t global_strides[3];  // bytes, for dimensions 1..rank-1
  cuuint32_t box_dims[4];
  cuuint32_t element_strides[4] = {1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) {
    global_dims[i] = dims[i];
    box_dims[i] = box[i];
    if (i > 0) {
      global_strides[i - 1] = strides_elements[i] * element_bytes;  // wraps modulo 2^64 like the addresses
    }
  }
  CUresult result = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      map, type, rank, const_cast<void*>(base), global_dims, global_strides, box_dims, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <class T> constexpr CUtensorMapDataType tma_type();
template <> constexpr CUtensorMapDataType tma_type<cutlass::bfloat16_t>() { return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16; }
template <> constexpr CUtensorMapDataType tma_type<cutlass::half_t>() { return CU_TENSOR_MAP_DATA_TYPE_FLOAT16; }
template <> constexpr CUtensorMapDataType tma_type<float>() { return CU_TENSOR_MAP_DATA_TYPE_FLOAT32; }

// The ragged view of a [M, cols] operand (see sm90_moe_wgrad_kernel.hpp): (cols, window, end row, wrap).
// The window and end-row dimensions both step one row; the wrap dimension's stride, 2^34 - ld elements, taken
// kWindow = 2^30 times, wraps the 64-bit address around to kWindow rows before the tensor (the trick of
// Triton's ragged TMA), so the descriptor's base stays the tensor's own address.
template <class T>
cudaError_t encode_ragged_operand(CUtensorMap* map, void const* base, int64_t cols, int64_t ld, uint32_t box_cols,
                                  uint32_t box_rows) {
  constexpr uint64_t kMaxDim = 0x7fff0000;
  uint64_t const dims[4] = {uint64_t(cols), uint64_t(kRaggedWindow), kMaxDim, kMaxDim};
  uint64_t const strides[4] = {1, uint64_t(ld), uint64_t(ld), (uint64_t(1) << 34) - uint64_t(ld)};
  uint32_t const box[4] = {box_cols, box_rows, 1, 1};
  return encode_tma(map, tma_type<T>(), int(sizeof(T)), base, 4, dims, strides, box);
}

}  // namespace detail

template <DType kDType, bool kFloat32Out>
cudaError_t run_sm90_moe_wgrad(GroupedWgradParams const& p, cudaStream_t stream) {
  using Config = Sm90MoeWgradConfig<kDType, kFloat32Out>;
  using Kernel = typename Config::Kernel;
  using Element = typename Config::Element;
  using ElementD = typename Config::ElementD;

  typename Kernel::Params params{};
  cudaError_t status =
      detail::encode_ragged_operand<Element>(&params.tma_l, p.l, p.P, p.ldl, Kernel::kBoxCols, Kernel::kTileK);
  if (status == cudaSuccess) {
    status = detail::encode_ragged_operand<Element>(&params.tma_r, p.r, p.Q, p.ldr, Kernel::kBoxCols, Kernel::kTileK);
  }
  if (status == cudaSuccess) {
    uint64_t const dims[3] = {uint64_t(p.Q), uint64_t(p.P), uint64_t(p.E)};
    uint64_t const strides[3] = {1, uint64_t(p.ldd), uint64_t(p.batch_stride_d)};
    uint32_t const box[3] = {uint32_t(Kernel::kEpiN), uint32_t(Kernel::kTileP), 1};
    status = detail::encode_tma(&params.tma_d, detail::tma_type<ElementD>(), int(sizeof(ElementD)), p.d, 3, dims,
                                strides, box);
  }
  if (status != cudaSuccess) {
    return status;
  }
  params.scheduler.m_sizes = p.m_sizes;
  params.scheduler.m_sizes_int64 = p.m_sizes_int64;
  params.scheduler.num_experts = p.E;
  params.scheduler.rows_total = p.M;
  params.scheduler.tiles_p = int32_t((p.P + Kernel::kTileP - 1) / Kernel::kTileP);
  params.scheduler.tiles_q = int32_t((p.Q + Kernel::kTileQ - 1) / Kernel::kTileQ);
  params.scheduler.group_p = 8;
  params.tile_counter = static_cast<int*>(p.workspace);
  params.accumulate = p.accumulate;

  auto* kernel = &cutlass::device_kernel<Kernel>;
  int const smem_bytes = Kernel::SharedStorageSize;
  int device = 0;
  status = cudaGetDevice(&device);
  if (status != cudaSuccess) {
    return status;
  }
  static std::atomic<int> sm_counts[64] = {};
  int ctas = sm_counts[device % 64].load(std::memory_order_relaxed);
  if (ctas == 0) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (status != cudaSuccess) {
      return status;
    }
    cudaDeviceGetAttribute(&ctas, cudaDevAttrMultiProcessorCount, device);
    sm_counts[device % 64].store(ctas, std::memory_order_relaxed);
  }
  if (p.sm_count > 0) {
    ctas = std::min(ctas, p.sm_count);
  }
  int64_t const tiles = int64_t(params.scheduler.tiles_p) * params.scheduler.tiles_q * p.E;
  unsigned const grid = unsigned(std::max<int64_t>(1, std::min<int64_t>(ctas, tiles)));
  kernel<<<grid, Kernel::MaxThreadsPerBlock, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace moe_gemm

#define MOE_GEMM_INSTANTIATE_WGRAD(DTYPE, FLOAT32_OUT)                                            \
  template cudaError_t moe_gemm::run_sm90_moe_wgrad<moe_gemm::DType::DTYPE, FLOAT32_OUT>(         \
      moe_gemm::GroupedWgradParams const&, cudaStream_t);
