"""Tile configurations forced in turn on the GEMMs where the heuristic's choice is in question (GPU; docs/design.md,
"Tile configuration"): the experts layer's down-projections and input gradients at 32k tokens and Mixtral's at 16k,
every expert exactly r rows (`--routed`: the rows of random top-k routing of the layer configs' tokens instead).
Times in ms, interleaved in one process; every configuration's output is checked bitwise against the first's.

    python scripts/tile_ab.py [--routed] [--configs 128x256 128x256c2x1 128x256c1x2 auto]
"""
import argparse

import torch

import moe_gemm
from moe_gemm.bench.suite import routing_counts
from moe_gemm.bench.timing import bench_interleaved_ms
from moe_gemm.testing import plan_override

# name: E, rows per expert r, N, K, weight_transposed (an input gradient reads the weight as [E, K, N]), top-k.
CASES = {
    "mixtral-up": (8, 4096, 28672, 4096, False, 2),
    "mixtral-down": (8, 4096, 4096, 14336, False, 2),
    "mixtral-up-dgrad": (8, 4096, 4096, 28672, True, 2),
    "mixtral-down-dgrad": (8, 4096, 14336, 4096, True, 2),
    "sonic1-down": (64, 2048, 4096, 2048, False, 4),
    "sonic1-up-dgrad": (64, 2048, 4096, 4096, True, 4),
    "sonic2-up-dgrad": (128, 2048, 4096, 2048, True, 8),
    "sonic3-down": (128, 2048, 4096, 512, False, 8),
    "qwen3-down": (128, 2048, 2048, 768, False, 8),
    "qwen3-up-dgrad": (128, 2048, 2048, 1536, True, 8),
    "sonic4-down": (256, 2048, 4096, 256, False, 16),
    "sonic4-up-dgrad": (256, 2048, 4096, 512, True, 16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routed", action="store_true", help="rows of random top-k routing instead of r each")
    parser.add_argument("--configs", nargs="+", default=["128x256", "128x256c2x1", "128x256c1x2", "auto"])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {moe_gemm.build_info()}; {torch.cuda.get_device_name()}; ms; {'routed' if args.routed else 'exact'} rows")
    print(f"{'GEMM':18s} {'E':>4s} {'r':>5s} {'N':>6s} {'K':>6s} " + " ".join(f"{c:>12s}" for c in args.configs))
    for name in args.cases:
        E, r, N, K, transposed, top_k = CASES[name]
        if args.routed:
            counts = routing_counts(E * r // top_k, E, top_k).cuda()
        else:
            counts = torch.full((E,), r, device="cuda", dtype=torch.int64)
        x = torch.randn(int(counts.sum()), K, device="cuda", dtype=torch.bfloat16)
        shape = (E, K, N) if transposed else (E, N, K)
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.05

        def forced(config):
            def run():
                with plan_override(tile_config=config):
                    return moe_gemm.grouped_forward(x, weight, counts, weight_transposed=transposed)
            return run

        fns = [forced(config) for config in args.configs]
        first = fns[0]()
        for config, fn in zip(args.configs[1:], fns[1:]):
            if not torch.equal(fn(), first):
                raise SystemExit(f"{name}: {config}'s output differs from {args.configs[0]}'s")
        times = bench_interleaved_ms(fns, rep_ms=300)
        print(f"{name:18s} {E:4d} {r:5d} {N:6d} {K:6d} " + " ".join(f"{t:12.3f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
