"""Experiment (branch exp/blockwise-smem-scales): blockwise FP8 with the scales copied into each stage by the
producer's warps 1-3 (this build, moe_gemm) against main's, whose MMA warps load them from global memory
(`bash scripts/build_baseline.sh main DIR`, loaded as moe_gemm_base beside this one). Outputs asserted bitwise equal;
timed interleaved with rowwise 128x256 and 128x128 of this build; TFLOP/s as 2 * M * N * K.

    python scripts/fp8_stage_scales_ab.py "$(bash scripts/build_baseline.sh main /tmp/moe_gemm_base)"
"""
import sys

import torch

import moe_gemm
from moe_gemm.bench.fp8 import rowwise
from moe_gemm.bench.timing import bench_interleaved_ms
from moe_gemm.layer_fp8 import quantize_fp8_weight
from moe_gemm.testing import plan_override

torch.ops.load_library(sys.argv[1])
base_library = torch.library.Library("moe_gemm_base", "FRAGMENT")
base_library.define("_grouped_mm_fp8_kernel(Tensor x, Tensor x_scale, Tensor weight, Tensor w_scale, Tensor m_sizes) "
                    "-> Tensor")
base = torch.ops.moe_gemm_base._grouped_mm_fp8_kernel.default
current = torch.ops.moe_gemm._grouped_mm_fp8_kernel.default
op = torch.ops.moe_gemm.grouped_mm_fp8.default

torch.manual_seed(0)
CASES = {"dsv3-up 16k": (16384, 4096, 7168, 256, 8), "dsv3-down 16k": (16384, 7168, 2048, 256, 8),
         "qwen3-up 16k": (16384, 1536, 2048, 128, 8), "mixtral-up 4k": (4096, 28672, 4096, 8, 2),
         "gptoss-up 4k (K=2880)": (4096, 5760, 2880, 128, 4), "dsv3-up 4k": (4096, 4096, 7168, 256, 8),
         "qwen3-down 4k": (4096, 2048, 768, 128, 8)}


def with_tile(tile, fn):
    def run():
        with plan_override(tile_config=tile):
            return fn()
    return run


for name, (T, N, K, E, k) in CASES.items():
    ids = torch.rand(T, E, device="cuda").topk(k, dim=1).indices
    m = torch.bincount(ids.flatten(), minlength=E).int()
    M = T * k
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16)
    xq, xs = rowwise(x)
    wq, ws = rowwise(w)
    xg, xgs = moe_gemm.quantize_fp8(x)
    wb, wbs = quantize_fp8_weight(w)
    same = torch.equal(current(xg, xgs, wb, wbs, m), base(xg, xgs, wb, wbs, m))
    fns = {"row 128x256": with_tile("128x256", lambda: op(xq, xs, wq, ws, m, False, torch.bfloat16)),
           "row 128x128": with_tile("128x128", lambda: op(xq, xs, wq, ws, m, False, torch.bfloat16)),
           "block main": lambda: base(xg, xgs, wb, wbs, m),
           "block stage scales": lambda: current(xg, xgs, wb, wbs, m)}
    t = bench_interleaved_ms(list(fns.values()))
    fl = 2 * M * N * K / 1e9
    print(f"{name:22s} bitwise {same}  " + "  ".join(f"{n} {fl / ms:6.0f}" for n, ms in zip(fns, t))
          + f"  stage/main {t[2] / t[3]:.3f}x", flush=True)
