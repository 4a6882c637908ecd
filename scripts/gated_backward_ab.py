"""The activation's backward in the down-projection's input-gradient GEMM against the two launches it replaces (GPU;
BENCHMARKS.md, "The activation's backward in the input-gradient epilogue"), timed in turn in one process:

1. the op alone, on the layer configs: ``grouped_mm_gated_backward`` against ``grouped_mm_gather`` (``grouped_mm``
   where the layer copies ``g``'s rows) followed by the separate ``gated_activation_backward`` kernel, and the GEMM
   alone; `exact` is bitwise equality of grad_gate_up and weight * activated with the two launches', and `dots` the
   largest relative difference of the routing weights' gradients (summed in another order);
2. the layer's forward+backward (``experts_forward``, bf16, silu, ``[gate; up]`` halves) with the fused backward and
   without (``_ops.GATED_BACKWARD_KERNEL_BUILT`` off), ms, peak GB of the step, and the largest relative difference
   of the gradients.

    python scripts/gated_backward_ab.py [--configs sonic-1 sonic-2 sonic-3 sonic-4 qwen3-30b-a3b deepseek-v3]
"""
import argparse

import torch

import moe_gemm
from moe_gemm import _ops
from moe_gemm.bench.layer import load_layer_configs
from moe_gemm.bench.timing import bench_interleaved_ms

ops = torch.ops.moe_gemm


def op_ab(T, d, n, E, K):
    options = {"device": "cuda", "dtype": torch.bfloat16}
    g = torch.randn(T, d, **options)
    down = torch.randn(E, d, n, **options) * 0.02  # [E, H, I], read as [E, K, N] (the input gradient's layout)
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    m_sizes, _, _, token_of_row, _ = ops.dispatch_pairs(ids, E)
    gate_up = torch.randn(T * K, 2 * n, **options)
    row_weights = torch.rand(T * K, device="cuda")
    gather = _ops.gather_in_gemm(T * K, E, n)
    rows_source, rows = (g, token_of_row) if gather else (g.index_select(0, token_of_row), None)

    def gemm():
        if gather:
            return ops.grouped_mm_gather(rows_source, rows, down, m_sizes, True)
        return ops.grouped_mm(rows_source, down, m_sizes, True)

    def unfused():
        return _ops.gated_activation_backward_kernel(gemm(), gate_up, row_weights, "silu", True)

    def fused():
        return ops.grouped_mm_gated_backward(rows_source, rows, down, m_sizes, True, gate_up, row_weights, "silu", True)

    want, got = unfused(), fused()
    exact = torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    dots = ((want[2] - got[2]).abs().max() / want[2].abs().max()).item()
    return (*bench_interleaved_ms([unfused, fused, gemm], 50, 400), gather, exact, dots)


def layer_ab(T, d, n, E, K):
    options = {"device": "cuda", "dtype": torch.bfloat16}
    hidden = torch.randn(T, d, **options, requires_grad=True)
    gate_up = (torch.randn(E, 2 * n, d, **options) * 0.02).requires_grad_()
    down = (torch.randn(E, d, n, **options) * 0.02).requires_grad_()
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    weights = torch.rand(T, K, device="cuda").softmax(dim=1).requires_grad_()
    grad_out = torch.randn(T, d, **options)
    leaves = (hidden, weights, gate_up, down)
    built = _ops.GATED_BACKWARD_KERNEL_BUILT

    def step(fused):
        _ops.GATED_BACKWARD_KERNEL_BUILT = fused
        try:
            out = moe_gemm.experts_forward(hidden, ids, weights, gate_up, down)
            return torch.autograd.grad(out, leaves, grad_out)
        finally:
            _ops.GATED_BACKWARD_KERNEL_BUILT = built

    unfused, fused = step(False), step(True)
    difference = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(fused, unfused))
    del unfused, fused
    peaks = []
    for variant in (True, False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(variant)
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 1e9)
    times = bench_interleaved_ms([lambda: step(True), lambda: step(False)], 50, 600)
    return times, peaks, difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+",
        default=["sonic-1", "sonic-2", "sonic-3", "sonic-4", "qwen3-30b-a3b", "deepseek-v3"],
    )  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=["op", "layer"], default=["op", "layer"])
    args = parser.parse_args()
    if not _ops.GATED_BACKWARD_KERNEL_BUILT:
        raise SystemExit("the extension has no grouped_mm_gated_backward kernel: build it first")
    configs = load_layer_configs()["configs"]
    torch.manual_seed(0)
    print("the op, ms: GEMM + separate kernel / fused / GEMM alone; two launches over fused; gathers; bitwise; dots")
    for name in args.configs if "op" in args.parts else ():
        c = configs[name]
        two, fused, gemm, gather, exact, dots = op_ab(c["T"], c["d"], c["n"], c["E"], c["K"])
        print(f"  {name:14s} {two:7.3f} / {fused:7.3f} / {gemm:7.3f}  {two / fused:5.3f}x  gather {gather!s:5s} "
              f"bitwise {exact}  dots {dots:.1e}", flush=True)
        torch.cuda.empty_cache()
    print("layer forward+backward, ms and peak GB of the step: fused / unfused backward; unfused over fused; largest "
          "relative gradient difference")
    for name in args.configs if "layer" in args.parts else ():
        c = configs[name]
        (fused, unfused), peaks, difference = layer_ab(c["T"], c["d"], c["n"], c["E"], c["K"])
        print(f"  {name:14s} {fused:8.3f} / {unfused:8.3f} ms  {unfused / fused:5.3f}x   peak {peaks[0]:5.2f} / "
              f"{peaks[1]:5.2f} GB   grad diff {difference:.1e}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
