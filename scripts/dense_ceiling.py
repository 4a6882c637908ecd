"""moe_gemm against cuBLAS on equal-sized experts: how far the grouped kernel is from a dense batched GEMM (GPU only).

With every expert given the same number of rows, the grouped GEMM is a batched GEMM, which cuBLAS (`torch.bmm`) runs
with its own tuned kernels: the practical ceiling for a grouped one. Times `torch.bmm`, `torch._grouped_mm` and
moe_gemm (its heuristic, and each configuration forced through ``moe_gemm.testing.plan_override``) in turn in one
process (``moe_gemm.bench.timing.bench_interleaved_ms``), prints TFLOP/s per shape, and names the kernels cuBLAS and
torch launch:

    python scripts/dense_ceiling.py [--configs auto 128x256 128x256c2x1 128x256c1x2] [--shapes NAME ...]
    python scripts/dense_ceiling.py --wgrad [--shapes NAME ...]   (the weight gradient: grad_W[e] = grad_y_e^T x_e)
    python scripts/dense_ceiling.py --suite 256 2048 16384 --configs auto --json ceiling.json
        (every suite model's GEMMs at those token counts, each expert given tokens * top_k / experts rows)
"""

import argparse
import json
import math
import os
import sys

import torch

# Run as a file from a checkout, the package next to scripts/ is the one measured (installed or not).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_gemm.bench.suite import GEMMS, gemm_shape, load_suite  # noqa: E402
from moe_gemm.bench.timing import bench_interleaved_ms  # noqa: E402

# name: (experts, rows per expert, N, K); the suite's 16k-token GEMMs with uniform routing, and one dense square.
SHAPES = {
    "dense-8192": (1, 8192, 8192, 8192),
    "mixtral-up-16k": (8, 4096, 28672, 4096),
    "mixtral-down-16k": (8, 4096, 4096, 14336),
    "deepseek-v3-up-16k": (256, 512, 4096, 7168),
    "deepseek-v3-down-16k": (256, 512, 7168, 2048),
    "gpt-oss-up-16k": (128, 512, 5760, 2880),
    "qwen3-down-16k": (128, 1024, 2048, 768),
}


def with_tile_config(tile_config: str, fn):
    """fn, run with the tile configuration ``tile_config`` ("auto": the heuristic's)."""
    from moe_gemm.testing import plan_override

    def run():
        with plan_override(tile_config=tile_config):
            return fn()

    return run


def kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels one call of fn launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def relative_error(out: torch.Tensor, reference: torch.Tensor, chunk: int = 1 << 28) -> float:
    """||out - reference|| / ||reference|| in float32, a chunk at a time (the weight gradients reach 15 GB)."""
    error = norm = 0.0
    for start in range(0, reference.numel(), chunk):
        ref = reference[start : start + chunk].float()
        error += (out[start : start + chunk].float() - ref).square().sum().item()
        norm += ref.square().sum().item()
    return (error / norm) ** 0.5


def suite_shapes(token_counts: list[int]) -> dict:
    """The suite's GEMMs at these token counts with equal-sized experts: "model-gemm-T" -> (experts, rows, N, K)."""
    shapes = {}
    for model, config in load_suite()["models"].items():
        for tokens in token_counts:
            for gemm in GEMMS:
                n, k = gemm_shape(config, gemm)
                rows = max(1, tokens * config["top_k"] // config["experts"])
                shapes[f"{model}-{gemm}-{tokens}"] = (config["experts"], rows, n, k)
    return shapes


def measure(name: str, args: argparse.Namespace) -> dict:
    """Times one shape, prints its lines and returns {label: ms}."""
    experts, rows, n, k = SHAPES[name]
    x = torch.randn(experts * rows, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    m_sizes = torch.full((experts,), rows, device="cuda", dtype=torch.int32)
    offs = torch.cumsum(m_sizes, 0, dtype=torch.int32)
    x3 = x.view(experts, rows, k)
    if args.wgrad:
        grad_y = torch.randn(experts * rows, n, device="cuda", dtype=torch.bfloat16)
        grad_y3 = grad_y.view(experts, rows, n)
        fns = {
            "torch.bmm": lambda: torch.bmm(grad_y3.transpose(1, 2), x3),
            "torch._grouped_mm": lambda: torch._grouped_mm(grad_y.t(), x, offs=offs),
            "moe_gemm": lambda: torch.ops.moe_gemm.grouped_mm_wgrad(x, grad_y, m_sizes, False),
        }
    else:
        weight_kn = weight.transpose(-2, -1)
        fns = {
            "torch.bmm": lambda: torch.bmm(x3, weight_kn),
            "torch._grouped_mm": lambda: torch._grouped_mm(x, weight_kn, offs=offs),
        }
        for config in args.configs:
            call = lambda: torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, False)  # noqa: E731
            fns[f"moe_gemm {config}"] = with_tile_config(config, call)
    reference = fns["torch.bmm"]().flatten()
    for label, fn in fns.items():
        if label.startswith("moe_gemm"):
            error = relative_error(fn().flatten(), reference)
            assert error < 1e-2, f"{name} {label}: relative error {error:.2e}"
    del reference
    times = bench_interleaved_ms(list(fns.values()), rep_ms=args.rep_ms)
    flops = 2.0 * experts * rows * n * k
    kind = "wgrad" if args.wgrad else "forward"
    print(f"\n{name} {kind}: {experts} experts x {rows} rows, N={n}, K={k}")
    for label, ms in zip(fns, times):
        print(f"  {label:24s} {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  {times[0] / ms:5.3f}x bmm")
    for label in ("torch.bmm", "torch._grouped_mm"):
        print(f"  {label} kernels: {', '.join(kernel_names(fns[label]))}")
    return dict(zip(fns, times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["auto", "128x256", "128x256c2x1", "128x256c1x2"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--wgrad", action="store_true", help="time the weight gradient instead of the forward")
    parser.add_argument("--suite", nargs="+", type=int, metavar="TOKENS",
                        help="instead of --shapes: the suite's GEMMs at these token counts, equal-sized experts")
    parser.add_argument("--json", help="write {shape: {label: ms}} and the geometric means here")
    parser.add_argument("--rep-ms", type=float, default=200)
    args = parser.parse_args()
    if args.suite:
        shapes = suite_shapes(args.suite)
        SHAPES.update(shapes)
        args.shapes = list(shapes)

    import moe_gemm  # noqa: F401  (registers torch.ops.moe_gemm)

    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    for name in args.shapes:
        results[name] = measure(name, args)
        torch.cuda.empty_cache()
    # Geometric mean of each label's speedup over torch._grouped_mm.
    means = {
        label: math.exp(sum(math.log(t["torch._grouped_mm"] / t[label]) for t in results.values()) / len(results))
        for label in next(iter(results.values()))
    }
    print("\ngeometric-mean speedup over torch._grouped_mm: " + ", ".join(f"{l} {v:.3f}" for l, v in means.items()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "shapes": {n: SHAPES[n] for n in results}, "ms": results, "speedup": means}, out,
                      indent=1)


if __name__ == "__main__":
    main()
