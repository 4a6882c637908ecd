// EXPERIMENT (wip/fp8-rowwise): written by hand, not yet by csrc/generate_instantiations.py.
#include "sm90_moe_gemm_fp8_launch.cuh"

MOE_GEMM_INSTANTIATE_FP8_ROWWISE(k128x128)
