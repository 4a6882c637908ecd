// Ragged TMA descriptors: one descriptor over a [rows, cols] tensor whose bounds check stops at a row
// chosen per copy (an expert's last row), so that experts packed one after another in A and D need
// neither a descriptor each nor masking. Views are (cols, window, end row, wrap):
//   - the window and end-row dimensions both step one row;
//   - the wrap dimension's stride is 2^34 - ld elements: taken kRaggedWindow = 2^30 times it moves
//     the address kRaggedWindow rows back, modulo 2^64 (the trick of Triton's ragged TMA), so the
//     descriptor's base stays the tensor's own address.
// A box of rows [r, r + box) of a group that ends at row `end`, with n = end - r, is addressed at
//   (col, kRaggedWindow - n, end, kRaggedWindow)
// box row j lands on row r + j, and the bounds check on the window dimension (coordinate < 2^30)
// drops (store) or zero-fills (load) exactly the rows at or past `end`. n must be below 2^30.
#pragma once

#include <cstdint>

#include <cuda.h>

#include "cutlass/cuda_host_adapter.hpp"
#include "cutlass/numeric_types.h"

namespace moe_gemm {

constexpr int32_t kRaggedWindow = int32_t(1) << 30;

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

// The ragged view of a [rows, cols] tensor with leading dimension ld, boxes of box_cols x box_rows.
// The end-row and wrap dimensions span 2^31 so that every int32 coordinate is in bounds there.
template <class T>
cudaError_t encode_ragged(CUtensorMap* map, void const* base, int64_t cols, int64_t ld, uint32_t box_cols,
                          uint32_t box_rows) {
  constexpr uint64_t kCoordinateSpan = uint64_t(1) << 31;
  uint64_t const dims[4] = {uint64_t(cols), uint64_t(kRaggedWindow), kCoordinateSpan, kCoordinateSpan};
  uint64_t const strides[4] = {1, uint64_t(ld), uint64_t(ld), (uint64_t(1) << 34) - uint64_t(ld)};
  uint32_t const box[4] = {box_cols, box_rows, 1, 1};
  return encode_tma(map, tma_type<T>(), int(sizeof(T)), base, 4, dims, strides, box);
}

}  // namespace detail
}  // namespace moe_gemm
