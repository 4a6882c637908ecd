"""The gathering kernels against the copy they replace, on the layer configs' up-projection (GPU; BENCHMARKS.md,
"Gathered rows"): copy + grouped_mm against grouped_mm_gather and grouped_mm on contiguous rows (the
heuristic's configuration and the other tiles, COLUMNS below), then index_select + grouped_mm_wgrad against
grouped_mm_wgrad_gather and grouped_mm_wgrad alone. Times in ms, interleaved in one process; `exact`: every gathering
kernel's result equals grouped_mm's on the copied rows with the same tile, bit for bit.

    python scripts/gather_ab.py [--skip-wgrad]
"""
import sys

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


def forced(config, op, *args):
    """``op(*args)`` on tile configuration ``config`` (``None``: the heuristic's)."""
    if config is None:
        return op(*args)
    with plan_override(tile_config=config):
        return op(*args)


# Columns: the copy + grouped_mm (heuristic), the gathering kernel with the heuristic's configuration (128x256 where
# grouped_mm takes a cluster: the gathering kernels have none) and forced to 128x128, grouped_mm on contiguous rows
# with the heuristic's configuration and forced to 128x256.
COLUMNS = [("copy+mm", None, "copy"), ("gather", None, "gather"), ("g128x128", "128x128", "gather"),
           ("mm", None, "mm"), ("mm128x256", "128x256", "mm")]
print(" ".join([f"{'case':12s}"] + [f"{name:>9s}" for name, _, _ in COLUMNS]) + "  copy/gather  exact")
for name, (T, d, n, E, K) in CASES.items():
    h = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, 2 * n, d, device="cuda", dtype=torch.bfloat16) * 0.02
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    m_sizes, _, _, token_of_row, _ = ops.dispatch_pairs(ids, E)
    x_sorted = h.index_select(0, token_of_row)

    def run(config, kind):
        if kind == "copy":
            return forced(config, ops.grouped_mm, h.index_select(0, token_of_row), w, m_sizes, False)
        if kind == "gather":
            return forced(config, ops.grouped_mm_gather, h, token_of_row, w, m_sizes, False)
        return forced(config, ops.grouped_mm, x_sorted, w, m_sizes, False)

    # Every gathering kernel equals grouped_mm on the copied rows with the same tile, bit for bit.
    exact = all(torch.equal(run(config, "gather"), run(config, "mm")) for config in ("128x256", "128x128"))
    t = bench_interleaved_ms([lambda c=config, k=kind: run(c, k) for _, config, kind in COLUMNS], 50, 400)
    print(" ".join([f"{name:12s}"] + [f"{v:9.3f}" for v in t]) + f"  {t[0] / t[1]:6.3f}       {exact}")

if "--skip-wgrad" in sys.argv:
    raise SystemExit(0)
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
