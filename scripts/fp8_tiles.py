"""Where blockwise FP8 loses to rowwise (GPU; BENCHMARKS.md, "FP8"): moe_gemm's rowwise and blockwise kernels at
128x256 and 128x128 (plan_override) and torch._scaled_grouped_mm rowwise, interleaved in one process, on random
routings; TFLOP/s as 2 * M * N * K over the median time.

    python scripts/fp8_tiles.py
"""
import torch

import moe_gemm
from moe_gemm.bench.timing import bench_interleaved_ms
from moe_gemm.bench.fp8 import rowwise
from moe_gemm.layer_fp8 import quantize_fp8_weight
from moe_gemm.testing import plan_override

torch.manual_seed(0)
CASES = {  # name: T, N, K, E, top_k
    "dsv3-up 16k": (16384, 4096, 7168, 256, 8), "dsv3-down 16k": (16384, 7168, 2048, 256, 8),
    "mixtral-up 4k": (4096, 28672, 4096, 8, 2), "qwen3-up 16k": (16384, 1536, 2048, 128, 8),
    "dsv3-up 4k": (4096, 4096, 7168, 256, 8), "qwen3-down 4k": (4096, 2048, 768, 128, 8),
}
op = torch.ops.moe_gemm.grouped_mm_fp8.default


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
    offs = torch.cumsum(m, 0).int()
    fns = {"row 128x256": with_tile("128x256", lambda: op(xq, xs, wq, ws, m, False, torch.bfloat16)),
           "row 128x128": with_tile("128x128", lambda: op(xq, xs, wq, ws, m, False, torch.bfloat16)),
           "block 128x256": with_tile("128x256", lambda: op(xg, xgs, wb, wbs, m, False, torch.bfloat16)),
           "block 128x128": with_tile("128x128", lambda: op(xg, xgs, wb, wbs, m, False, torch.bfloat16)),
           "torch row": lambda: torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offs=offs,
                                                         out_dtype=torch.bfloat16)}
    t = bench_interleaved_ms(list(fns.values()))
    fl = 2 * M * N * K / 1e9
    print(f"{name:14s} " + "  ".join(f"{n} {fl/ms:6.0f} TF" for n, ms in zip(fns, t)), flush=True)
