"""Decode benchmark: the suite's expert GEMMs at 1 to 64 tokens, where each GEMM is bound by reading the weights of
the experts hit, timed in eager mode and inside a CUDA graph (decode loops run in graphs).

Run on a Hopper GPU with the kernels built::

    python -m moe_gemm.bench --decode [--models NAME ...] [--tokens T ...] [--gemms up down] [--json PATH]

Shapes, routing, the floor and the timer are those of the other tables (``suite``, ``timing``); the default token
counts are ``DECODE_TOKENS`` (``--quick``: ``DECODE_QUICK_TOKENS``). Per shape, after the check against the float32
reference (and the graph's output bitwise equal to the eager one), in microseconds:

- ``moe`` / ``moe_graph``: ``torch.ops.moe_gemm.grouped_mm`` per call, eager and as the replay of a graph holding one
  call; ``nosplit_graph``: the same graph with split-K off (``moe_gemm.testing.plan_override(split_k=1)``), to see
  what split-K gains;
- ``gmm`` / ``gmm_graph``: ``torch._grouped_mm`` likewise (bfloat16 only);
- ``x_floor``: ``moe_graph`` over the floor; ``BW%``: the weight-bound bandwidth reached in the graph, as a
  percentage of the measured copy bandwidth; ``speedup`` / ``speedup_graph``: torch time over moe_gemm time;
- ``host``: CPU time per call of ``moe_gemm.grouped_forward`` (the public wrapper, validation included), and
  ``gmm_host`` of ``torch._grouped_mm``: ``time.perf_counter`` over ``timing.HOST_CALLS`` calls without a sync.

The summary gives geometric means and the slowest speedups per token count, over tokens <= ``DECODE_MAX_TOKENS`` and
over all shapes, and the lowest bandwidth fraction on the shapes with >= ``BANDWIDTH_MIN_EXPERTS`` experts hit.
The pure parts (token counts, problems, summary, table) run on CPU.
"""

import argparse
import math

import torch

import moe_gemm
from moe_gemm.bench import report, timing
from moe_gemm.bench.forward import check_against_reference
from moe_gemm.bench.suite import QUICK_TOKENS, gemm_cost, gemm_shape

DECODE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
DECODE_QUICK_TOKENS = (1, 32)
# The summary's decode group: the shapes with at most this many tokens.
DECODE_MAX_TOKENS = 32
# The summary's bandwidth line: the weight-bound shapes with at least this many experts hit.
BANDWIDTH_MIN_EXPERTS = 64


# ---------------------------------------------------------------------------------------------------------------
# Pure parts.
# ---------------------------------------------------------------------------------------------------------------


def decode_tokens(requested: list[int], suite: dict) -> list[int]:
    """The token counts to run: ``DECODE_TOKENS`` when ``--tokens`` was left at its default (the suite's tokens),
    ``DECODE_QUICK_TOKENS`` for ``--quick``, else what ``--tokens`` asked for."""
    if list(requested) == list(suite["tokens"]):
        return list(DECODE_TOKENS)
    if list(requested) == list(QUICK_TOKENS):
        return list(DECODE_QUICK_TOKENS)
    return list(requested)


def decode_problem(suite: dict, name: str, tokens: int, gemm: str) -> dict:
    """``model``, ``tokens``, ``gemm``, ``E``, ``N``, ``K``, ``top_k`` and ``M = tokens * top_k`` rows of one GEMM."""
    model = suite["models"][name]
    n, k = gemm_shape(model, gemm)
    return {
        "model": name, "tokens": tokens, "gemm": gemm, "E": model["experts"], "N": n, "K": k, "top_k": model["top_k"],
        "M": tokens * model["top_k"],
    }  # fmt: skip


def decode_problems(suite: dict, models: list[str], tokens: list[int], gemms: list[str]) -> list[dict]:
    """One ``decode_problem`` per (model, tokens, gemm), in the order they are measured."""
    return [decode_problem(suite, name, count, gemm) for name in models for count in tokens for gemm in gemms]


def weight_bandwidth_fraction(row: dict, bandwidth_tbs: float) -> float | None:
    """Bytes moved (``row['bytes']``) per graph time, as a fraction of the copy bandwidth; None without a time."""
    us = row.get("moe_graph_us")
    if not us:
        return None
    return row["bytes"] / (us * 1e-6) / (bandwidth_tbs * 1e12)


def summarize_decode(rows: list[dict]) -> dict:
    """Geometric means and the slowest speedups per token count, over tokens <= DECODE_MAX_TOKENS and over all rows
    (``groups``); the lowest bandwidth fraction on the shapes with >= BANDWIDTH_MIN_EXPERTS experts hit
    (``bandwidth_fraction_min``, NaN without such a shape) and how many they are (``bandwidth_shapes``)."""

    def stats(group: list[dict]) -> dict:
        graph_speedups = [r["speedup_graph"] for r in group if r.get("speedup_graph")]
        eager_speedups = [r["speedup"] for r in group if r.get("speedup")]
        return {
            "shapes": len(group),
            "x_floor": report.geomean(r.get("x_floor") for r in group),
            "x_floor_eager": report.geomean(r.get("x_floor_eager") for r in group),
            "speedup": report.geomean(eager_speedups),
            "speedup_graph": report.geomean(graph_speedups),
            "min_speedup": min(eager_speedups, default=math.nan),
            "min_speedup_graph": min(graph_speedups, default=math.nan),
            "host_us": report.geomean(r.get("host_us") for r in group),
        }

    groups = {f"tokens={t}": stats([r for r in rows if r["tokens"] == t]) for t in sorted({r["tokens"] for r in rows})}
    groups[f"tokens<={DECODE_MAX_TOKENS}"] = stats([r for r in rows if r["tokens"] <= DECODE_MAX_TOKENS])
    groups["all"] = stats(rows)

    wide = [r["bw_fraction"] for r in rows if r["active"] >= BANDWIDTH_MIN_EXPERTS and r.get("bw_fraction")]
    return {"groups": groups, "bandwidth_fraction_min": min(wide, default=math.nan), "bandwidth_shapes": len(wide)}


TABLE = (
    "model", "tokens", "gemm", "M", "N", "K", "active", "floor_us", "moe_us", "moe_graph_us", "nosplit_graph_us",
    "gmm_us", "gmm_graph_us", "x_floor", "bw_percent", "speedup", "speedup_graph", "host_us", "gmm_host_us", "check",
)  # fmt: skip


def format_summary(summary: dict) -> str:
    lines = ["geometric means (x floor and speedup in a CUDA graph, eager in parentheses; host = CPU us per call):"]
    for label, s in summary["groups"].items():
        lines.append(
            f"  {label:<12} shapes {s['shapes']:3d}  x floor {s['x_floor']:5.2f} ({s['x_floor_eager']:5.2f})"
            f"  speedup {s['speedup_graph']:5.2f} ({s['speedup']:5.2f})"
            f"  slowest {s['min_speedup_graph']:5.2f} ({s['min_speedup']:5.2f})  host {s['host_us']:5.1f} us"
        )
    if summary["bandwidth_shapes"]:
        lines.append(
            f"at least {100 * summary['bandwidth_fraction_min']:.0f}% of the copy bandwidth (in a CUDA graph) on the "
            f"{summary['bandwidth_shapes']} shapes with >= {BANDWIDTH_MIN_EXPERTS} experts hit"
        )
    else:
        lines.append(f"copy bandwidth: no shape with >= {BANDWIDTH_MIN_EXPERTS} experts hit has a graph time")
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


def measure_decode_shape(problem: dict, weight: torch.Tensor, counts: torch.Tensor, ceilings) -> dict:
    """Check and time one decode GEMM (``counts``: rows per expert on CPU); returns its table row."""
    from moe_gemm.testing import plan_override

    row = problem | gemm_cost(counts, problem["N"], problem["K"], weight.element_size(), ceilings)
    row["floor_us"] = 1e3 * row.pop("floor_ms")
    x = torch.randn(row["M"], row["K"], device=weight.device, dtype=weight.dtype)
    m_sizes = counts.to(weight.device)
    op = torch.ops.moe_gemm.grouped_mm.default

    def moe_call():
        return op(x, weight, m_sizes, False)

    problem_text = None
    try:
        row["rel_error"], problem_text = check_against_reference(x, weight, m_sizes, counts.tolist())
        if problem_text is None:
            eager_out = moe_call()
            graph, graph_out = timing.capture(moe_call)
            graph.replay()
            if not torch.equal(graph_out, eager_out):
                problem_text = "the CUDA graph's output differs from the eager one (not deterministic)"
            else:
                row["moe_us"] = 1e3 * timing.bench_ms(moe_call)
                row["moe_graph_us"] = 1e3 * timing.bench_ms(graph.replay)
                row["host_us"] = timing.host_us_per_call(lambda: moe_gemm.grouped_forward(x, weight, m_sizes))
            del graph
            # The plan is resolved when the call is captured: the graph replays the kernel without split-K.
            with plan_override(split_k=1):
                nosplit_graph, _ = timing.capture(moe_call)
            row["nosplit_graph_us"] = 1e3 * timing.bench_ms(nosplit_graph.replay)
            del nosplit_graph
    except RuntimeError as error:  # a kernel error on one shape should not hide the other rows
        problem_text = f"moe_gemm failed: {report.error_line(error)}"
    row["check"] = "ok" if problem_text is None else "FAIL"
    row["problem"] = problem_text

    if weight.dtype == torch.bfloat16:  # torch._grouped_mm supports bfloat16 only
        offs = torch.cumsum(m_sizes, 0).to(torch.int32)
        weight_kn = weight.transpose(-2, -1)

        def gmm_call():
            return torch._grouped_mm(x, weight_kn, offs=offs)

        row["gmm_us"] = 1e3 * timing.bench_ms(gmm_call)
        gmm_graph, _ = timing.capture(gmm_call)
        row["gmm_graph_us"] = 1e3 * timing.bench_ms(gmm_graph.replay)
        del gmm_graph
        row["gmm_host_us"] = timing.host_us_per_call(gmm_call)
    return finish_row(row, ceilings[1])


def run(args: argparse.Namespace, suite: dict) -> int:
    """The decode table for the arguments of ``python -m moe_gemm.bench``; exit status 1 when a shape fails."""
    if args.plot:
        print(f"--plot {args.plot}: no plot for the decode table")

    def measure(name, count, gemm, weight, counts, ceilings):
        return measure_decode_shape(decode_problem(suite, name, count, gemm), weight, counts, ceilings)

    tokens = decode_tokens(args.tokens, suite)
    rows, ceilings = report.measure_gemm_table("decode, times in us", TABLE, measure, args, suite, tokens)
    summary = summarize_decode(rows)
    return report.finish(args, format_summary(summary), rows, mode="decode", summary=summary, ceilings=ceilings)
