"""A/B of moe_gemm variants in one process: each variant and ``torch._grouped_mm``, timed in turn (GPU only).

    python scripts/ab.py VARIANT [VARIANT ...] [--kinds forward dgrad wgrad] [--tokens 256 2048 16384 | --decode]
        [--models NAME ...] [--baseline PATH] [--balanced] [--repeats N] [--json PATH]

Example, before (the commit b12abfa) against after (this tree), torch beside both, three times::

    bash scripts/build_baseline.sh b12abfa /tmp/base && python scripts/ab.py --baseline /tmp/base/moe_gemm/_C*.so \
        --repeats 3 --json ab.json

A variant is

- ``current``: this build of moe_gemm, its heuristic deciding (the default variant);
- a plan override of this build, ``FIELD=VALUE`` pairs joined by commas, e.g.
  ``tile_config=128x128,split_k=1,dynamic=0`` (fields ``tile_config``, ``split_k``, ``dynamic`` 0, 1 or auto; see
  ``moe_gemm.testing.PlanOverride``);
- ``baseline``: the same ops from another build of moe_gemm, loaded from ``--baseline PATH``, a ``.so`` whose op
  namespace is ``moe_gemm_base`` (``scripts/build_baseline.sh REF OUTDIR`` builds one from a git ref).

With ``--baseline`` and no variant named, the variants are ``baseline current``.

Per GEMM of the suite (each model's 'up' and 'down' at each token count, uniform routing drawn from the seed) and per
kind (forward: ``y = x @ W[e]^T``; dgrad: ``grad_x = grad_y @ W[e]``; wgrad: ``grad_W[e] = grad_y_e^T @ x_e``), every
variant's output is checked against torch's, then all are timed with ``torch._grouped_mm`` in turn
(``moe_gemm.bench.timing.bench_interleaved_ms``: L2 flushed, the order reversed every round). Separate runs of the
benchmark land on different machines and power states, which move the large shapes by several percent; this is the
comparison to trust for a change of a few. Prints each variant's speedup over torch per shape, then geometric means
per kind and token count over the GEMMs that every variant ran; ``--repeats N`` runs the whole comparison N times.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

# Run as a file from a checkout, the package next to scripts/ is the one measured (installed or not).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_gemm.bench.decode import DECODE_TOKENS  # noqa: E402
from moe_gemm.bench.report import geomean  # noqa: E402
from moe_gemm.bench.suite import GEMMS, gemm_shape, load_suite, routing_counts  # noqa: E402
from moe_gemm.bench.timing import bench_interleaved_ms  # noqa: E402

KINDS = ("forward", "dgrad", "wgrad")
DEFAULT_TOKENS = (256, 2048, 16384)
BASELINE_NAMESPACE = "moe_gemm_base"
# The schemas of the baseline's GEMM ops, for a baseline whose C++ only implements them (the schemas of moe_gemm are
# declared in Python, which the baseline's .so does not carry).
BASELINE_SCHEMAS = {
    "grouped_mm": "(Tensor x, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor",
    "grouped_mm_wgrad": "(Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> Tensor",
}
# Plan override fields as written in a variant -> the keyword of moe_gemm.testing.plan_override.
OVERRIDE_FIELDS = {"tile_config": "tile_config", "split_k": "split_k", "dynamic": "dynamic_schedule"}
MAX_REL_ERROR = 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: variants, arguments, summary, lines.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One build and plan of moe_gemm: ``override`` holds ``plan_override``'s keywords (empty: the heuristic)."""

    name: str
    override: dict = field(default_factory=dict)
    baseline: bool = False


def parse_variant(text: str) -> Variant:
    """'current', 'baseline', or 'FIELD=VALUE[,FIELD=VALUE...]' with the fields of ``OVERRIDE_FIELDS``."""
    if text in ("current", "baseline"):
        return Variant(text, baseline=text == "baseline")
    override = {}
    for pair in text.split(","):
        name, sep, value = pair.partition("=")
        if not sep or name not in OVERRIDE_FIELDS:
            raise argparse.ArgumentTypeError(
                f"expected 'current', 'baseline' or FIELD=VALUE[,...] with FIELD one of {', '.join(OVERRIDE_FIELDS)}, "
                f"got {text!r}"
            )
        keyword = OVERRIDE_FIELDS[name]
        if keyword in override:
            raise argparse.ArgumentTypeError(f"{name} given twice in {text!r}")
        override[keyword] = _override_value(name, value, text)
    return Variant(text, override)


def _override_value(name: str, value: str, text: str):
    if name == "tile_config":
        if not value:
            raise argparse.ArgumentTypeError(f"tile_config: expected a configuration name in {text!r}")
        return value
    if name == "split_k":
        if not value.isdigit():
            raise argparse.ArgumentTypeError(f"split_k: expected an integer >= 0 in {text!r}, got {value!r}")
        return int(value)
    choices = {"auto": None, "0": False, "1": True}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"dynamic: expected 0, 1 or auto in {text!r}, got {value!r}")
    return choices[value]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/ab.py", description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", type=parse_variant, metavar="VARIANT",
                        help="current, baseline, or FIELD=VALUE[,...] (default: current; with --baseline: baseline "
                             "current)")  # fmt: skip
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS), help="token counts T")
    tokens.add_argument("--decode", action="store_const", dest="tokens", const=list(DECODE_TOKENS),
                        help=f"the decode benchmark's token counts, {list(DECODE_TOKENS)}")  # fmt: skip
    parser.add_argument("--models", nargs="+", help="suite models (default: all)")
    parser.add_argument("--baseline", metavar="PATH", help="the .so of another build, ops in namespace moe_gemm_base")
    parser.add_argument("--balanced", action="store_true",
                        help="every expert gets the same rows (tokens * top_k / experts), not routed counts")
    parser.add_argument("--repeats", type=int, default=1, metavar="N", help="run the whole comparison N times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the variants and every run's rows and summary")
    args = parser.parse_args(argv)
    if not args.variants:
        args.variants = [parse_variant(name) for name in (("baseline", "current") if args.baseline else ("current",))]
    names = [variant.name for variant in args.variants]
    if len(set(names)) != len(names):
        parser.error(f"a variant is named twice: {' '.join(names)}")
    if any(variant.baseline for variant in args.variants) and not args.baseline:
        parser.error("the variant 'baseline' needs --baseline PATH")
    if args.repeats < 1:
        parser.error("--repeats: expected N >= 1")
    suite_models = list(load_suite()["models"])
    unknown = sorted(set(args.models or []) - set(suite_models))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; the suite has {', '.join(suite_models)}")
    args.models = args.models or suite_models
    return args


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Per kind, per token count and over all: how many GEMMs, and each variant's geometric-mean speedup over torch,
    over the GEMMs on which every variant has a time (so that all the means are over the same GEMMs)."""
    summary = {}
    for kind in dict.fromkeys(row["kind"] for row in rows):
        complete = [r for r in rows if r["kind"] == kind and all(r["speedup"].get(name) for name in names)]
        token_counts = sorted({r["tokens"] for r in complete})
        groups = {f"tokens={t}": [r for r in complete if r["tokens"] == t] for t in token_counts}
        groups["all"] = complete
        summary[kind] = {
            label: {"shapes": len(group)} | {name: geomean(r["speedup"][name] for r in group) for name in names}
            for label, group in groups.items()
        }
    return summary


def format_row(row: dict, names: list[str]) -> str:
    speedups = "  ".join(f"{name} {_cell(row['speedup'].get(name), '.3f')}x" for name in names)
    problems = "; ".join(f"{name}: {problem}" for name, problem in row.get("problems", {}).items())
    return (
        f"{row['model']:18s} {row['tokens']:6d} {row['gemm']:4s} {row['kind']:7s} "
        f"torch {_cell(row.get('torch_ms'), '8.3f')} ms  {speedups}" + (f"  {problems}" if problems else "")
    )


def format_summary(summary: dict, names: list[str]) -> str:
    lines = ["geometric-mean speedup over torch._grouped_mm (over the GEMMs every variant ran):"]
    for kind, groups in summary.items():
        for label, stats in groups.items():
            means = "  ".join(f"{name} {_cell(stats[name], '.3f')}" for name in names)
            lines.append(f"  {kind:7s} {label:13s} shapes {stats['shapes']:3d}  {means}")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# ---------------------------------------------------------------------------------------------------------------
# GPU parts.
# ---------------------------------------------------------------------------------------------------------------


def load_baseline(path: str):
    """The ops of the baseline build: ``torch.ops.moe_gemm_base``, with the GEMM schemas defined here when the
    baseline's C++ only implements them."""
    torch.ops.load_library(path)
    namespace = getattr(torch.ops, BASELINE_NAMESPACE)
    for name, schema in BASELINE_SCHEMAS.items():
        qualified = f"{BASELINE_NAMESPACE}::{name}"
        if not hasattr(namespace, name):
            torch.library.define(qualified, schema)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"):
            raise SystemExit(f"{path} registers no CUDA kernel for {qualified}")
    return namespace


def moe_call(kind: str, ops, x, weight, grad_y, m_sizes):
    """One GEMM of ``kind`` with the ops of one build (``torch.ops.moe_gemm`` or the baseline's)."""
    if kind == "forward":
        return lambda: ops.grouped_mm.default(x, weight, m_sizes, False)
    if kind == "dgrad":
        return lambda: ops.grouped_mm.default(grad_y, weight, m_sizes, True)
    return lambda: ops.grouped_mm_wgrad.default(x, grad_y, m_sizes, False)


def torch_call(kind: str, x, weight, grad_y, offs):
    if kind == "forward":
        weight_kn = weight.transpose(-2, -1)
        return lambda: torch._grouped_mm(x, weight_kn, offs=offs)
    if kind == "dgrad":
        return lambda: torch._grouped_mm(grad_y, weight, offs=offs)
    return lambda: torch._grouped_mm(grad_y.t(), x, offs=offs)


def with_override(override: dict, fn):
    """``fn`` run under ``moe_gemm.testing.plan_override(**override)``; ``fn`` itself for an empty override."""
    if not override:
        return fn
    from moe_gemm.testing import plan_override

    def run():
        with plan_override(**override):
            return fn()

    return run


def relative_error(out: torch.Tensor, reference: torch.Tensor, chunk: int = 1 << 28) -> float:
    """||out - reference|| / ||reference|| in float32, a chunk at a time (weight gradients reach 15 GB)."""
    out, reference = out.flatten(), reference.flatten()
    error = norm = 0.0
    for start in range(0, reference.numel(), chunk):
        ref = reference[start : start + chunk].float()
        error += (out[start : start + chunk].float() - ref).square().sum().item()
        norm += ref.square().sum().item()
    return math.sqrt(error / norm) if norm > 0 else math.sqrt(error)


def measure(kind: str, variants: list[Variant], builds: dict, tensors: tuple, offs) -> dict:
    """Check every variant against torch, then time those that pass with torch in turn: {name: ms}, torch's ms and
    the problems."""
    theirs = torch_call(kind, *tensors[:3], offs)
    reference = theirs()
    fns, problems = {}, {}
    for variant in variants:
        fn = with_override(variant.override, moe_call(kind, builds[variant.baseline], *tensors))
        try:
            error = relative_error(fn(), reference)
        except RuntimeError as error_raised:
            problems[variant.name] = str(error_raised).splitlines()[0][:160]
            continue
        if not error <= MAX_REL_ERROR:
            problems[variant.name] = f"relative error {error:.2e} against torch"
        else:
            fns[variant.name] = fn
    del reference
    times = bench_interleaved_ms([theirs, *fns.values()])
    return {"torch_ms": times[0], "ms": dict(zip(fns, times[1:])), "problems": problems}


def run_once(args: argparse.Namespace, suite: dict, builds: dict) -> list[dict]:
    """One whole comparison: a row per (model, tokens, gemm, kind), printed as it comes."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    rows = []
    for model_name in args.models:
        model = suite["models"][model_name]
        for tokens in args.tokens:
            counts = routing_counts(tokens, model["experts"], model["top_k"], "uniform", generator)
            if args.balanced:
                counts = torch.full_like(counts, tokens * model["top_k"] // model["experts"])
            m_sizes = counts.cuda()
            offs = torch.cumsum(m_sizes, 0).to(torch.int32)
            m = int(counts.sum())
            for gemm in GEMMS:
                n, k = gemm_shape(model, gemm)
                weight = torch.randn(model["experts"], n, k, device="cuda", dtype=torch.bfloat16).mul_(0.02)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                grad_y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
                for kind in args.kinds:
                    measured = measure(kind, args.variants, builds, (x, weight, grad_y, m_sizes), offs)
                    row = {"model": model_name, "tokens": tokens, "gemm": gemm, "kind": kind, **measured}
                    row["speedup"] = {name: row["torch_ms"] / ms for name, ms in row["ms"].items()}
                    rows.append(row)
                    print(format_row(row, [v.name for v in args.variants]), flush=True)
                del weight, x, grad_y
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import moe_gemm
    from moe_gemm._ops import kernels_unavailable_reason

    reason = kernels_unavailable_reason()
    if reason is not None:
        print(f"scripts/ab.py needs a GPU with the built kernels: {reason}", file=sys.stderr)
        return 2
    builds = {False: torch.ops.moe_gemm}
    if args.baseline:
        builds[True] = load_baseline(args.baseline)
    names = [variant.name for variant in args.variants]
    print(f"# {moe_gemm.build_info()}; device {torch.cuda.get_device_name()}; baseline {args.baseline or '-'}")
    print(f"# variants: {' '.join(names)}; kinds {' '.join(args.kinds)}; tokens {args.tokens}"
          + ("; balanced experts" if args.balanced else ""))  # fmt: skip
    suite = load_suite()
    runs = []
    for repeat in range(args.repeats):
        if args.repeats > 1:
            print(f"\n## run {repeat + 1} of {args.repeats}")
        rows = run_once(args, suite, builds)
        summary = summarize(rows, names)
        print(format_summary(summary, names))
        runs.append({"rows": rows, "summary": summary})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"build": moe_gemm.build_info(), "device": torch.cuda.get_device_name(),
                       "baseline": args.baseline, "variants": names, "kinds": args.kinds, "tokens": args.tokens,
                       "balanced": args.balanced, "runs": runs}, out, indent=1)  # fmt: skip
        print(f"results written to {args.json}")
    failed = any(row["problems"] for run in runs for row in run["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
