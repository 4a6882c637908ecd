"""The gathering kernels against the copy they replace, on the layer configs' up-projection (GPU; BENCHMARKS.md,
"Gathered rows"): copy + grouped_mm against grouped_mm_gather and grouped_mm on contiguous rows (the heuristic's
configuration and 128x256, the gathering kernel's), then index_select + grouped_mm_wgrad against
grouped_mm_wgrad_gather and grouped_mm_wgrad alone. Times in ms, interleaved in one process; `exact` is bitwise
equality with the copy's result.

    python scripts/gather_ab.py
"""
import torch

import moe_gemm  # noqa: F401  (registers the ops)
from moe_gemm.bench.timing import bench_interleaved_ms
from moe_gemm.testing import plan_override
ops = torch.ops.moe_gemm
CASES = {  # name: T, d, n, E, K
    "sonic-1": (32768, 4096, 2048, 64, 4), "sonic-3": (32768, 4096, 512, 128, 8), "sonic-4": (32768, 4096, 256, 256, 16),
    "qwen3": (32768, 2048, 768, 128, 8), "deepseek-v3": (4096, 7168, 2048, 256, 8), "qwen3-2k": (2048, 2048, 768, 128, 8),
}
torch.manual_seed(0)
print(f"{'case':12s} {'copy+mm':>9s} {'gather':>9s} {'mm only':>9s} {'mm128x256':>9s}  ratio copy/gather  exact")
for name, (T, d, n, E, K) in CASES.items():
    h = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, 2 * n, d, device="cuda", dtype=torch.bfloat16) * 0.02
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    m_sizes, _, _, token_of_row, _ = ops.dispatch_pairs(ids, E)
    x_sorted = h.index_select(0, token_of_row)
    a = ops.grouped_mm(h.index_select(0, token_of_row), w, m_sizes, False)
    b = ops.grouped_mm_gather(h, token_of_row, w, m_sizes, False)
    with plan_override(tile_config="128x256"):
        c = ops.grouped_mm(x_sorted, w, m_sizes, False)
    exact = torch.equal(b, c)
    def f128():
        with plan_override(tile_config="128x256"):
            return ops.grouped_mm(x_sorted, w, m_sizes, False)
    t = bench_interleaved_ms([lambda: ops.grouped_mm(h.index_select(0, token_of_row), w, m_sizes, False),
                              lambda: ops.grouped_mm_gather(h, token_of_row, w, m_sizes, False),
                              lambda: ops.grouped_mm(x_sorted, w, m_sizes, False), f128], 50, 400)
    print(f"{name:12s} {t[0]:9.3f} {t[1]:9.3f} {t[2]:9.3f} {t[3]:9.3f}  {t[0]/t[1]:6.3f}  {exact} rel {((a.float()-b.float()).norm()/a.float().norm()).item():.1e}")

print("\nwgrad of the up-projection: grouped_mm_wgrad(x[rows]) with the copy against grouped_mm_wgrad_gather")
print(f"{'case':12s} {'copy+wgrad':>10s} {'gather':>9s} {'wgrad only':>10s}  ratio  exact")
for name, (T, d, n, E, K) in CASES.items():
    h = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    m_sizes, _, _, token_of_row, _ = ops.dispatch_pairs(ids, E)
    g = torch.randn(T * K, 2 * n, device="cuda", dtype=torch.bfloat16)
    x_sorted = h.index_select(0, token_of_row)
    a = ops.grouped_mm_wgrad(x_sorted, g, m_sizes, False)
    b = ops.grouped_mm_wgrad_gather(h, g, m_sizes, False, token_of_row, None)
    t = bench_interleaved_ms([lambda: ops.grouped_mm_wgrad(h.index_select(0, token_of_row), g, m_sizes, False),
                              lambda: ops.grouped_mm_wgrad_gather(h, g, m_sizes, False, token_of_row, None),
                              lambda: ops.grouped_mm_wgrad(x_sorted, g, m_sizes, False)], 20, 200)
    print(f"{name:12s} {t[0]:10.3f} {t[1]:9.3f} {t[2]:10.3f}  {t[0]/t[1]:5.3f}  {torch.equal(a, b)}")
