"""A/B of moe_gemm's runtime knobs in one process: each setting and torch._grouped_mm, timed in turn (GPU only).

    python scripts/ab_env.py MOE_GEMM_OVERLAP_EPILOGUE=0 MOE_GEMM_OVERLAP_EPILOGUE=1 \\
        [--kinds forward wgrad dgrad] [--tokens 256 2048 16384] [--models NAME ...] [--balanced] [--json PATH]

A setting is one or more NAME=VALUE pairs joined by commas (e.g. MOE_GEMM_TILE_CONFIG=128x256,MOE_GEMM_GROUP_M=16);
the op reads them at every call, so all settings run against the same inputs in the same process, in turn with
torch (bench.bench_interleaved_ms: L2 flushed, the order reversed every round). Separate runs of the benchmark land
on different machines and power states, which move the large shapes by several percent; this is the comparison to
trust for a change of a few. Prints each setting's speedup over torch per shape and geometric means per kind.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_gemm import bench

KINDS = ("forward", "wgrad", "dgrad")


def parse_setting(text: str) -> dict[str, str]:
    """'A=1,B=x' -> {'A': '1', 'B': 'x'}."""
    setting = {}
    for pair in text.split(","):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE...], got {text!r}")
        setting[name] = value
    return setting


def with_setting(setting: dict[str, str], fn):
    """fn run with the environment variables of `setting` set (and the previous values put back)."""

    def run():
        saved = {name: os.environ.get(name) for name in setting}
        os.environ.update(setting)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return run


def kind_functions(kind: str, x, weight, grad_y, m_sizes, offs):
    """(moe_gemm's call, torch._grouped_mm's call) for one GEMM of a layer."""
    ops = torch.ops.moe_gemm
    if kind == "forward":
        weight_kn = weight.transpose(-2, -1)
        return lambda: ops.grouped_mm(x, weight, m_sizes, False), lambda: torch._grouped_mm(x, weight_kn, offs=offs)
    if kind == "wgrad":
        return lambda: ops.grouped_mm_wgrad(x, grad_y, m_sizes, False), lambda: torch._grouped_mm(grad_y.t(), x, offs=offs)
    return lambda: ops.grouped_mm(grad_y, weight, m_sizes, True), lambda: torch._grouped_mm(grad_y, weight, offs=offs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", type=parse_setting, help="NAME=VALUE[,NAME=VALUE...] per variant")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 2048, 16384])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--balanced", action="store_true",
                        help="every expert gets the same rows (tokens * top_k / experts), not the suite's routed counts")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not hasattr(torch.ops.moe_gemm, "grouped_mm_wgrad"):
        sys.exit("needs a GPU and the built extension")
    suite = bench.load_suite()
    names = [",".join(f"{k}={v}" for k, v in setting.items()) for setting in args.settings]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    for model_name in args.models or list(suite["models"]):
        model = suite["models"][model_name]
        for tokens in args.tokens:
            counts = bench.routing_counts(tokens, model["experts"], model["top_k"], "uniform", generator)
            if args.balanced:
                counts = torch.full_like(counts, tokens * model["top_k"] // model["experts"])
            m_sizes = counts.cuda()
            offs = torch.cumsum(m_sizes, 0).to(torch.int32)
            m = int(counts.sum())
            for gemm in bench.GEMMS:
                n, k = bench.gemm_shape(model, gemm)
                weight = torch.randn(model["experts"], n, k, device="cuda", dtype=torch.bfloat16).mul_(0.02)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                grad_y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
                for kind in args.kinds:
                    ours, theirs = kind_functions(kind, x, weight, grad_y, m_sizes, offs)
                    times = bench.bench_interleaved_ms([theirs] + [with_setting(s, ours) for s in args.settings])
                    row = {"model": model_name, "tokens": tokens, "gemm": gemm, "kind": kind, "torch_ms": times[0],
                           "ms": dict(zip(names, times[1:]))}
                    rows.append(row)
                    print(f"{model_name:18s} {tokens:6d} {gemm:4s} {kind:7s} torch {times[0]:8.3f} ms  "
                          + "  ".join(f"{name} {times[0] / ms:.3f}x" for name, ms in zip(names, times[1:])), flush=True)
                del weight, x, grad_y
                torch.cuda.empty_cache()
    print("geometric-mean speedup over torch._grouped_mm:")
    for kind in args.kinds:
        for tokens in sorted({r["tokens"] for r in rows}) + [None]:
            selected = [r for r in rows if r["kind"] == kind and (tokens is None or r["tokens"] == tokens)]
            label = f"tokens={tokens}" if tokens is not None else "all"
            means = [bench.geomean(r["torch_ms"] / r["ms"][name] for r in selected) for name in names]
            print(f"  {kind:7s} {label:13s} " + "  ".join(f"{name} {mean:.3f}" for name, mean in zip(names, means)))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"settings": names, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
