"""The fused layer's backward reading its gathered rows in place against copying them (GPU; BENCHMARKS.md, "The
backward's gathered rows"): ``experts_forward`` forward+backward on the layer configs with every weight gradient
gathering (through ``grouped_mm_wgrad_gather``; the down-projection's only where ``gather_in_gemm`` lets its input
gradient read ``g``'s rows in place too, through ``grouped_mm_gather``) and none (``index_select`` copies), timed in
turn in one process against ``gather_in_wgrad``'s rule, with each step's peak memory and the largest relative
difference of the gradients to the copying backward's. Then the weight-gradient kernels alone:
``grouped_mm_wgrad_gather`` against ``index_select`` + ``grouped_mm_wgrad`` and ``grouped_mm_wgrad`` of contiguous
rows, the gathered operand as L (``[E, K, N]`` weights) and as R (``[E, N, K]``).

    python scripts/backward_ab.py [--configs sonic-1 sonic-2 sonic-3 sonic-4 qwen3-30b-a3b]
"""
import argparse

import torch

import moe_gemm
from moe_gemm import _ops
from moe_gemm.bench.layer import load_layer_configs
from moe_gemm.bench.timing import bench_interleaved_ms

ops = torch.ops.moe_gemm
NEVER = 1 << 62


def layer_ab(T, d, n, E, K):
    options = {"device": "cuda", "dtype": torch.bfloat16}
    hidden = torch.randn(T, d, **options, requires_grad=True)
    gate_up = (torch.randn(E, 2 * n, d, **options) * 0.02).requires_grad_()
    down = (torch.randn(E, d, n, **options) * 0.02).requires_grad_()
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    weights = torch.rand(T, K, device="cuda").softmax(dim=1).requires_grad_()
    grad_out = torch.randn(T, d, **options)
    leaves = (hidden, weights, gate_up, down)
    default = (_ops.WGRAD_GATHER_MIN_ROWS_PER_EXPERT, _ops.WGRAD_GATHER_MAX_READS)
    variants = {"rule": default, "all": (0, NEVER), "copy": (NEVER, 0)}

    def step(variant):
        _ops.WGRAD_GATHER_MIN_ROWS_PER_EXPERT, _ops.WGRAD_GATHER_MAX_READS = variants[variant]
        try:
            out = moe_gemm.experts_forward(hidden, ids, weights, gate_up, down)
            return torch.autograd.grad(out, leaves, grad_out)
        finally:
            _ops.WGRAD_GATHER_MIN_ROWS_PER_EXPERT, _ops.WGRAD_GATHER_MAX_READS = default

    copied = step("copy")
    differences = [((a.float() - b.float()).norm() / b.float().norm()).item()
                   for variant in ("rule", "all") for a, b in zip(step(variant), copied)]  # fmt: skip
    del copied
    peaks = {}
    for variant in variants:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant)
        torch.cuda.synchronize()
        peaks[variant] = (torch.cuda.max_memory_allocated() - base) / 1e9
    times = bench_interleaved_ms([lambda v=v: step(v) for v in variants], 50, 600)
    return dict(zip(variants, times)), peaks, max(differences)


def wgrad_ab(T, d, n, E, K):
    h = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    m_sizes, _, _, rows, _ = ops.dispatch_pairs(ids, E)
    g = torch.randn(T * K, 2 * n, device="cuda", dtype=torch.bfloat16)
    xs = h.index_select(0, rows)
    results = {}
    for side, transposed in (("R", False), ("L", True)):
        exact = torch.equal(ops.grouped_mm_wgrad_gather(h, g, m_sizes, transposed, rows, None),
                            ops.grouped_mm_wgrad(xs, g, m_sizes, transposed))  # fmt: skip
        results[side] = (*bench_interleaved_ms([
            lambda: ops.grouped_mm_wgrad(h.index_select(0, rows), g, m_sizes, transposed),
            lambda: ops.grouped_mm_wgrad_gather(h, g, m_sizes, transposed, rows, None),
            lambda: ops.grouped_mm_wgrad(xs, g, m_sizes, transposed),
        ], 20, 300), exact)  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["sonic-1", "sonic-2", "sonic-3", "sonic-4", "qwen3-30b-a3b"])
    args = parser.parse_args()
    configs = load_layer_configs()["configs"]
    torch.manual_seed(0)
    print("layer forward+backward, ms and peak GB of the step: gather_in_wgrad's rule / every weight gradient gathering"
          " / every one copying; copy's time over the rule's; largest relative gradient difference to the copy's")
    for name in args.configs:
        c = configs[name]
        times, peaks, difference = layer_ab(c["T"], c["d"], c["n"], c["E"], c["K"])
        print(f"  {name:14s} {times['rule']:8.3f} / {times['all']:8.3f} / {times['copy']:8.3f} ms  "
              f"{times['copy'] / times['rule']:5.3f}x   peak {peaks['rule']:5.2f} / {peaks['all']:5.2f} / "
              f"{peaks['copy']:5.2f} GB   grad diff {difference:.1e}", flush=True)
        torch.cuda.empty_cache()
    print("gate/up weight gradient alone, ms: copy + wgrad / gathered / wgrad of contiguous rows (copy / gathered)")
    for name in args.configs:
        c = configs[name]
        for side, (copy, gather, alone, exact) in wgrad_ab(c["T"], c["d"], c["n"], c["E"], c["K"]).items():
            print(f"  {name:14s} x as {side}: {copy:7.3f} / {gather:7.3f} / {alone:7.3f}  {copy / gather:5.3f}x  "
                  f"bitwise {exact}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
