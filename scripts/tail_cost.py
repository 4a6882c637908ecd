"""What an expert's partial last m-block costs (GPU only): every expert gets the same r rows, for r at and just
past multiples of 128, and each tile configuration (and torch._grouped_mm) is timed in turn in one process.

    python scripts/tail_cost.py [--rows 512 513 576 577 640 641] [--configs 128x256c1x2 128x256] [--shapes ds-up ...]

A config may carry other settings after a comma (e.g. 128x256c1x2,MOE_GEMM_PARTIAL_TOKEN_LOADS=0).

Prints the time and the time per row relative to the first r (1.000: a row costs what it costs with whole m-blocks;
r = 513 at 1.125 would mean the one-row tail costs half a tile, as the idle-warpgroup path intends).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_env import parse_setting, with_setting  # noqa: E402
from moe_gemm import bench  # noqa: E402

# name: (experts, N, K), the forward GEMMs of three suite models (DeepSeek-V3 with 64 of its 256 experts).
SHAPES = {"ds-up": (64, 4096, 7168), "qwen3-up": (128, 1536, 2048), "gptoss-up": (128, 5760, 2880)}


def config_setting(text: str) -> dict[str, str]:
    """'128x256c1x2' or '128x256c1x2,NAME=VALUE,...' -> the environment of that run."""
    config, _, rest = text.partition(",")
    return {"MOE_GEMM_TILE_CONFIG": config, **(parse_setting(rest) if rest else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[512, 513, 576, 577, 640, 641])
    parser.add_argument("--configs", nargs="+", default=["128x256c1x2", "128x256"])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available() or not hasattr(torch.ops.moe_gemm, "grouped_mm"):
        sys.exit("needs a GPU and the built extension")
    labels = ["torch"] + args.configs
    for name in args.shapes:
        experts, n, k = SHAPES[name]
        weight = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16).mul_(0.02)
        weight_kn = weight.transpose(-2, -1)
        first = None
        for rows in args.rows:
            m_sizes = torch.full((experts,), rows, device="cuda", dtype=torch.int32)
            offs = torch.cumsum(m_sizes, 0).to(torch.int32)
            x = torch.randn(experts * rows, k, device="cuda", dtype=torch.bfloat16)
            fns = [lambda: torch._grouped_mm(x, weight_kn, offs=offs)]
            ours = lambda: torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, False)  # noqa: E731
            fns += [with_setting(config_setting(c), ours) for c in args.configs]
            times = bench.bench_interleaved_ms(fns)
            per_row = [t / rows for t in times]
            first = first or per_row
            print(f"{name:10s} r={rows:5d}  " + "  ".join(
                f"{label} {t:7.3f} ms ({p / f:5.3f})" for label, t, p, f in zip(labels, times, per_row, first)),
                flush=True)
            del x
        del weight, weight_kn
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
