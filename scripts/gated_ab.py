"""The gated-epilogue up-projection against the two launches it replaces, on the layer configs (GPU; BENCHMARKS.md,
"The experts layer"): grouped_mm_gated (the activation in the GEMM's epilogue, with and without the pre-activation
output) against grouped_mm (or grouped_mm_gather where the layer gathers) followed by the separate activation
kernel, and the GEMM alone. Times in ms, interleaved in one process; `exact` is bitwise equality of the activation
and of the pre-activation with the two-launch path's.

    python scripts/gated_ab.py
"""
import torch

import moe_gemm  # noqa: F401  (registers the ops)
from moe_gemm import _ops
from moe_gemm.bench.timing import bench_interleaved_ms
from moe_gemm.testing import resolved_gated_plan

ops = torch.ops.moe_gemm
CASES = {  # name: T, d, n, E, K
    "sonic-1": (32768, 4096, 2048, 64, 4), "sonic-2": (32768, 4096, 1024, 128, 8),
    "sonic-3": (32768, 4096, 512, 128, 8), "sonic-4": (32768, 4096, 256, 256, 16),
    "qwen3": (32768, 2048, 768, 128, 8), "deepseek-v3": (4096, 7168, 2048, 256, 8),
}
torch.manual_seed(0)
print(f"{'case':12s} {'gather':>6s} {'config':>8s} {'mm+act':>8s} {'gated':>8s} {'gated+pre':>9s} {'mm only':>8s}"
      "  mm+act/gated+pre  exact")
for name, (T, d, n, E, K) in CASES.items():
    h = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, 2 * n, d, device="cuda", dtype=torch.bfloat16) * 0.02
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    m_sizes, _, _, token_of_row, _ = ops.dispatch_pairs(ids, E)
    gather = _ops.gather_in_gemm(T * K, E, 2 * n)
    x, rows = (h, token_of_row) if gather else (h.index_select(0, token_of_row), None)
    config, fused = resolved_gated_plan(T * K, 2 * n, d, E, True, gather)

    def gemm():
        return ops.grouped_mm_gather(x, rows, w, m_sizes, False) if gather else ops.grouped_mm(x, w, m_sizes, False)

    def unfused():
        gate_up = gemm()
        return _ops.gated_activation_kernel(gate_up, "silu", True), gate_up

    def gated(write_pre):
        return lambda: ops.grouped_mm_gated(x, rows, w, m_sizes, False, "silu", True, write_pre)

    (want, want_pre), (got, got_pre) = unfused(), gated(True)()
    exact = torch.equal(got, want) and torch.equal(got_pre, want_pre) and torch.equal(gated(False)()[0], want)
    t = bench_interleaved_ms([unfused, gated(False), gated(True), gemm], 50, 400)
    print(f"{name:12s} {str(gather):>6s} {config + ('' if fused else '*'):>8s} {t[0]:8.3f} {t[1]:8.3f} {t[2]:9.3f}"
          f" {t[3]:8.3f}  {t[0] / t[2]:6.3f}  {exact}")
print("(* the plan does not fuse: grouped_mm_gated ran the GEMM, then the activation kernel)")
