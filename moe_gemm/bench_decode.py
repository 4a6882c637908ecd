"""Decode benchmark: the suite's expert GEMMs at 1 to 64 tokens, where each GEMM is bound by reading the weights of
the experts hit, timed in eager mode and inside a CUDA graph (decode loops run in graphs).

Run on a Hopper GPU with the kernels built::

    python -m moe_gemm.bench --decode [--models NAME ...] [--tokens T ...] [--gemms up down] [--json PATH]

Shapes, routing, the floor and the timer are those of ``moe_gemm.bench`` (imported from there); the default token
counts are ``DECODE_TOKENS`` (``--quick``: ``DECODE_QUICK_TOKENS``). Per shape, after the check against the float32
reference (and the graph's output bitwise equal to the eager one), in microseconds:

- ``moe`` / ``moe_graph``: ``torch.ops.moe_gemm.grouped_mm`` per call, eager and as the replay of a graph holding one
  call; ``nosplit_graph``: the same graph with split-K off (``MOE_GEMM_SPLIT_K=1``), to see what split-K gains;
- ``gmm`` / ``gmm_graph``: ``torch._grouped_mm`` likewise (bfloat16 only);
- ``x_floor``: ``moe_graph`` over the floor; ``BW%``: the weight-bound bandwidth reached in the graph, as a
  percentage of the measured copy bandwidth; ``speedup`` / ``speedup_graph``: torch time over moe_gemm time;
- ``host``: CPU time per call of ``moe_gemm.grouped_forward`` (the public wrapper, validation included), and
  ``gmm_host`` of ``torch._grouped_mm``: ``time.perf_counter`` over ``HOST_CALLS`` calls without a sync.

The summary gives geometric means per token count and the issue's targets over tokens <= ``TARGET_MAX_TOKENS``.
The pure parts (token counts, problems, summary, table) run on CPU.
"""

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch

import moe_gemm
from moe_gemm import bench

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
DECODE_QUICK_TOKENS = (1, 32)
HOST_CALLS = 200
# The targets: over tokens <= 32, time <= 1.3x the floor and >= 1.5x faster than torch._grouped_mm on
# geometric mean, no shape slower than it; >= 80% of the copy bandwidth on weight-bound shapes with >= 64 experts hit.
TARGET_MAX_TOKENS = 32
TARGET_X_FLOOR = 1.3
TARGET_SPEEDUP = 1.5
TARGET_BANDWIDTH_FRACTION = 0.8
TARGET_BANDWIDTH_MIN_EXPERTS = 64


# ---------------------------------------------------------------------------------------------------------------
# Pure parts.
# ---------------------------------------------------------------------------------------------------------------


def decode_tokens(requested: list[int], suite: dict) -> list[int]:
    """The token counts to run: ``DECODE_TOKENS`` when ``bench.parse_args`` left its default (the suite's tokens),
    ``DECODE_QUICK_TOKENS`` for ``--quick``, else what ``--tokens`` asked for."""
    if list(requested) == list(suite["tokens"]):
        return list(DECODE_TOKENS)
    if list(requested) == list(bench.QUICK_TOKENS):
        return list(DECODE_QUICK_TOKENS)
    return list(requested)


def decode_problems(suite: dict, models: list[str], tokens: list[int], gemms: list[str]) -> list[dict]:
    """One entry per (model, tokens, gemm): ``E``, ``N``, ``K``, ``top_k`` and ``M = tokens * top_k`` rows."""
    problems = []
    for name in models:
        model = suite["models"][name]
        for count in tokens:
            for gemm in gemms:
                n, k = bench.gemm_shape(model, gemm)
                problems.append(
                    {
                        "model": name,
                        "tokens": count,
                        "gemm": gemm,
                        "E": model["experts"],
                        "N": n,
                        "K": k,
                        "top_k": model["top_k"],
                        "M": count * model["top_k"],
                    }
                )
    return problems


def weight_bandwidth_fraction(row: dict, bandwidth_tbs: float) -> float | None:
    """Bytes moved (``row['bytes']``) per graph time, as a fraction of the copy bandwidth; None without a time."""
    us = row.get("moe_graph_us")
    if not us:
        return None
    return row["bytes"] / (us * 1e-6) / (bandwidth_tbs * 1e12)


def summarize_decode(rows: list[dict]) -> dict:
    """Geometric means per token count and over tokens <= TARGET_MAX_TOKENS, the slowest speedups, the bandwidth on
    shapes with >= TARGET_BANDWIDTH_MIN_EXPERTS experts hit, and whether each target is met."""

    def stats(group: list[dict]) -> dict:
        graph_speedups = [r["speedup_graph"] for r in group if r.get("speedup_graph")]
        eager_speedups = [r["speedup"] for r in group if r.get("speedup")]
        return {
            "shapes": len(group),
            "x_floor": bench.geomean(r.get("x_floor") for r in group),
            "x_floor_eager": bench.geomean(r.get("x_floor_eager") for r in group),
            "speedup": bench.geomean(eager_speedups),
            "speedup_graph": bench.geomean(graph_speedups),
            "min_speedup": min(eager_speedups, default=math.nan),
            "min_speedup_graph": min(graph_speedups, default=math.nan),
            "host_us": bench.geomean(r.get("host_us") for r in group),
        }

    groups = {f"tokens={t}": stats([r for r in rows if r["tokens"] == t]) for t in sorted({r["tokens"] for r in rows})}
    target_rows = [r for r in rows if r["tokens"] <= TARGET_MAX_TOKENS]
    groups[f"tokens<={TARGET_MAX_TOKENS}"] = stats(target_rows)
    groups["all"] = stats(rows)

    wide = [r["bw_fraction"] for r in rows if r["active"] >= TARGET_BANDWIDTH_MIN_EXPERTS and r.get("bw_fraction")]
    target = groups[f"tokens<={TARGET_MAX_TOKENS}"]
    targets = {
        "x_floor": target["x_floor"] <= TARGET_X_FLOOR,
        "speedup": target["speedup_graph"] >= TARGET_SPEEDUP,
        "no_shape_slower": target["min_speedup_graph"] >= 1.0 and target["min_speedup"] >= 1.0,
        "bandwidth": bool(wide) and min(wide) >= TARGET_BANDWIDTH_FRACTION,
    }
    return {
        "groups": groups,
        "bandwidth_fraction_min": min(wide, default=math.nan),
        "bandwidth_shapes": len(wide),
        "targets": targets,
    }


# (header, row key, width, format); a missing value prints as '-'.
COLUMNS = (
    ("model", "model", 18, "s"),
    ("tok", "tokens", 3, "d"),
    ("gemm", "gemm", 4, "s"),
    ("M", "M", 4, "d"),
    ("N", "N", 6, "d"),
    ("K", "K", 6, "d"),
    ("hit", "active", 4, "d"),
    ("floor", "floor_us", 7, ".1f"),
    ("moe", "moe_us", 7, ".1f"),
    ("moe_graph", "moe_graph_us", 9, ".1f"),
    ("nosplit_graph", "nosplit_graph_us", 13, ".1f"),
    ("gmm", "gmm_us", 7, ".1f"),
    ("gmm_graph", "gmm_graph_us", 9, ".1f"),
    ("x_floor", "x_floor", 7, ".2f"),
    ("BW%", "bw_percent", 4, ".0f"),
    ("speedup", "speedup", 7, ".2f"),
    ("speedup_graph", "speedup_graph", 13, ".2f"),
    ("host", "host_us", 6, ".1f"),
    ("gmm_host", "gmm_host_us", 8, ".1f"),
    ("check", "check", 5, "s"),
)


def format_header() -> str:
    return bench.format_header(COLUMNS)


def format_row(row: dict) -> str:
    return bench.format_row(row, COLUMNS)


def format_summary(summary: dict) -> str:
    lines = ["geometric means (x floor and speedup in a CUDA graph, eager in parentheses; host = CPU us per call):"]
    for label, s in summary["groups"].items():
        lines.append(
            f"  {label:<12} shapes {s['shapes']:3d}  x floor {s['x_floor']:5.2f} ({s['x_floor_eager']:5.2f})"
            f"  speedup {s['speedup_graph']:5.2f} ({s['speedup']:5.2f})"
            f"  slowest {s['min_speedup_graph']:5.2f} ({s['min_speedup']:5.2f})  host {s['host_us']:5.1f} us"
        )
    targets = summary["targets"]
    target = summary["groups"][f"tokens<={TARGET_MAX_TOKENS}"]

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    lines.append(
        f"targets over tokens <= {TARGET_MAX_TOKENS} (graph): x floor {target['x_floor']:.2f} <= {TARGET_X_FLOOR} "
        f"{verdict(targets['x_floor'])}; speedup {target['speedup_graph']:.2f} >= {TARGET_SPEEDUP} "
        f"{verdict(targets['speedup'])}; no shape slower than torch._grouped_mm {verdict(targets['no_shape_slower'])}"
    )
    lines.append(
        f"bandwidth on the {summary['bandwidth_shapes']} shapes with >= {TARGET_BANDWIDTH_MIN_EXPERTS} experts hit: "
        f"at least {100 * summary['bandwidth_fraction_min']:.0f}% of the copy bandwidth "
        f"(target {100 * TARGET_BANDWIDTH_FRACTION:.0f}%) {verdict(targets['bandwidth'])}"
    )
    return "\n".join(lines)


def finish_row(row: dict, bandwidth_tbs: float) -> dict:
    """Adds the ratios of the measured times (those missing stay missing)."""
    floor_us = row["floor_us"]
    if row.get("moe_graph_us"):
        row["x_floor"] = row["moe_graph_us"] / floor_us
        row["bw_fraction"] = weight_bandwidth_fraction(row, bandwidth_tbs)
        row["bw_percent"] = 100 * row["bw_fraction"]
        if row.get("gmm_graph_us"):
            row["speedup_graph"] = row["gmm_graph_us"] / row["moe_graph_us"]
    if row.get("moe_us"):
        row["x_floor_eager"] = row["moe_us"] / floor_us
        if row.get("gmm_us"):
            row["speedup"] = row["gmm_us"] / row["moe_us"]
    return row


# ---------------------------------------------------------------------------------------------------------------
# GPU parts.
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` (unset for None) inside the block; the op reads its overrides at each call."""
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def host_us_per_call(fn: Callable[[], object], calls: int = HOST_CALLS) -> float:
    """CPU time per call in microseconds: ``calls`` calls back to back, no sync in between (the launches queue)."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of one call of ``fn`` (warmed up outside first), and its static output."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def measure_decode_shape(problem: dict, weight: torch.Tensor, counts: torch.Tensor, ceilings) -> dict:
    """Check and time one decode GEMM (``counts``: rows per expert on CPU); returns its table row."""
    peak_tflops, bandwidth_tbs = ceilings
    host_counts = counts.tolist()
    m, n, k = sum(host_counts), problem["N"], problem["K"]
    active = sum(1 for count in host_counts if count > 0)
    flops = 2.0 * m * n * k
    num_bytes = bench.gemm_bytes(m, n, k, active, weight.element_size())
    row = dict(problem, M=m, active=active, flops=flops, bytes=num_bytes)
    row["floor_us"] = 1e3 * bench.floor_ms(flops, num_bytes, peak_tflops, bandwidth_tbs)
    x = torch.randn(m, k, device=weight.device, dtype=weight.dtype)
    m_sizes = counts.to(weight.device)
    op = torch.ops.moe_gemm.grouped_mm.default

    def moe_call():
        return op(x, weight, m_sizes, False)

    problem_text = None
    try:
        row["rel_error"], problem_text = bench.check_against_reference(x, weight, m_sizes, host_counts)
        if problem_text is None:
            eager_out = moe_call()
            graph, graph_out = capture(moe_call)
            graph.replay()
            if not torch.equal(graph_out, eager_out):
                problem_text = "the CUDA graph's output differs from the eager one (not deterministic)"
            else:
                row["moe_us"] = 1e3 * bench.bench_ms(moe_call)
                row["moe_graph_us"] = 1e3 * bench.bench_ms(graph.replay)
                row["host_us"] = host_us_per_call(lambda: moe_gemm.grouped_forward(x, weight, m_sizes))
            del graph
            with environment("MOE_GEMM_SPLIT_K", "1"):
                nosplit_graph, _ = capture(moe_call)
            row["nosplit_graph_us"] = 1e3 * bench.bench_ms(nosplit_graph.replay)
            del nosplit_graph
    except RuntimeError as error:  # a kernel error on one shape should not hide the other rows
        problem_text = f"moe_gemm failed: {str(error).splitlines()[0][:160]}"
    row["check"] = "ok" if problem_text is None else "FAIL"
    row["problem"] = problem_text

    if weight.dtype == torch.bfloat16:  # torch._grouped_mm supports bfloat16 only
        offs = torch.cumsum(m_sizes, 0).to(torch.int32)
        weight_kn = weight.transpose(-2, -1)

        def gmm_call():
            return torch._grouped_mm(x, weight_kn, offs=offs)

        row["gmm_us"] = 1e3 * bench.bench_ms(gmm_call)
        gmm_graph, _ = capture(gmm_call)
        row["gmm_graph_us"] = 1e3 * bench.bench_ms(gmm_graph.replay)
        del gmm_graph
        row["gmm_host_us"] = host_us_per_call(gmm_call)
    return finish_row(row, bandwidth_tbs)


def run(args: argparse.Namespace, suite: dict) -> int:
    """The decode table for ``bench.parse_args``'s arguments; exit status 1 when a shape fails its check."""
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    tokens = decode_tokens(args.tokens, suite)
    ceilings = bench.measure_ceilings()
    print(f"# decode: {moe_gemm.build_info()}; device {torch.cuda.get_device_name()}")
    print(f"# ceilings: dense bf16 8192^3 matmul {ceilings[0]:.0f} TFLOP/s, d2d copy {ceilings[1]:.2f} TB/s")
    print(f"# routing {args.routing}, dtype {args.dtype}, seed {args.seed}, times in us")
    if args.plot:
        print(f"--plot {args.plot}: no plot for the decode table")

    problems = decode_problems(suite, args.models, tokens, args.gemms)
    progress = bench._progress(len(problems))
    progress.write(format_header())
    rows = []
    for name in args.models:
        model = suite["models"][name]
        weights = {
            gemm: torch.randn(model["experts"], *bench.gemm_shape(model, gemm), device="cuda", dtype=dtype).mul_(0.02)
            for gemm in args.gemms
        }
        for count in tokens:
            counts = bench.routing_counts(count, model["experts"], model["top_k"], args.routing, generator)
            for problem in (p for p in problems if p["model"] == name and p["tokens"] == count):
                row = measure_decode_shape(problem, weights[problem["gemm"]], counts, ceilings)
                rows.append(row)
                progress.write(format_row(row) + (f"  {row['problem']}" if row["problem"] else ""))
                progress.update()
        del weights
        torch.cuda.empty_cache()
    progress.close()

    summary = summarize_decode(rows)
    print(format_summary(summary))
    failures = [r for r in rows if r["check"] != "ok"]
    if failures:
        print(f"{len(failures)} of {len(rows)} shapes FAILED the check against the reference")
    if args.json:
        bench.write_json(
            args.json, args, mode="decode", rows=rows, summary=summary, peak_tflops=ceilings[0], bandwidth_tbs=ceilings[1]
        )
    return 1 if failures else 0
