"""Time tile configurations x raster group sizes on large suite shapes, next to torch._grouped_mm (GPU only).

    python scripts/sweep_group_m.py [--json PATH] [--configs 128x256 128x256c1x2 ...] [--groups 0 8 16 ...]

Each configuration is forced through MOE_GEMM_TILE_CONFIG and the group size (m-blocks taken together before the
n-block moves; 0 = the configuration's default) through MOE_GEMM_GROUP_M, both read by the op at every call. Inputs
are randn, as in the benchmark; each line prints every time as a fraction of torch's (lower is better). Runs of the
same setting differ by 5% or more on the largest shapes (power state), so read single differences with care.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_gemm import bench

CASES = [("mixtral-8x7b", 16384), ("mixtral-8x7b", 2048), ("deepseek-v3", 16384), ("qwen3-30b-a3b", 16384),
         ("gpt-oss-120b", 16384)]


def time_shape(weight: torch.Tensor, counts: torch.Tensor, configs: list[str], groups: list[int]) -> dict:
    """torch._grouped_mm's time and each (configuration, group size)'s, in ms."""
    x = torch.randn(int(counts.sum()), weight.shape[2], device="cuda", dtype=weight.dtype)
    m_sizes = counts.cuda()
    offs = torch.cumsum(m_sizes, 0).to(torch.int32)
    weight_kn = weight.transpose(-2, -1)
    times = {"torch_ms": bench.bench_ms(lambda: torch._grouped_mm(x, weight_kn, offs=offs))}
    for config in configs:
        for group in groups:
            os.environ["MOE_GEMM_TILE_CONFIG"] = config
            os.environ["MOE_GEMM_GROUP_M"] = str(group)
            times[f"{config}/g{group}"] = bench.bench_ms(lambda: torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, False))
    for key in ("MOE_GEMM_TILE_CONFIG", "MOE_GEMM_GROUP_M"):
        os.environ.pop(key, None)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["128x256", "128x256c1x2", "128x256c2x1"])
    parser.add_argument("--groups", nargs="+", type=int, default=[0, 4, 16, 32])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not hasattr(torch.ops.moe_gemm, "grouped_mm"):
        sys.exit("needs a GPU and the built extension")
    suite = bench.load_suite()
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, tokens in CASES:
        model = suite["models"][name]
        counts = bench.routing_counts(tokens, model["experts"], model["top_k"], "uniform", generator)
        for gemm in ("up", "down"):
            shape = bench.gemm_shape(model, gemm)
            weight = torch.randn(model["experts"], *shape, device="cuda", dtype=torch.bfloat16).mul_(0.02)
            line = {"model": name, "tokens": tokens, "gemm": gemm, **time_shape(weight, counts, args.configs, args.groups)}
            timed = [key for key in line if "/" in key]
            best = min(timed, key=line.get)
            print(f"{name:18s} {tokens:6d} {gemm:4s} torch {line['torch_ms']:.3f} ms  "
                  + " ".join(f"{key}={line[key] / line['torch_ms']:.3f}" for key in timed) + f"  best {best}",
                  flush=True)
            results.append(line)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
