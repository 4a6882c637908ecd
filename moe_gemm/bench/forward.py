"""The forward benchmark (``python -m moe_gemm.bench``): moe_gemm against ``torch._grouped_mm`` and a per-expert loop
on the expert GEMMs of the suite.

Each moe_gemm output is first checked against the float32 reference (relative Frobenius error <= ``MAX_REL_ERROR``,
no NaN in a NaN-poisoned output buffer). Then moe_gemm, ``torch._grouped_mm`` and the loop are timed in turn, run by
run (``bench_interleaved_ms``), so that all see the same clock. The moe_gemm time is that of the op
``torch.ops.moe_gemm.grouped_mm`` (the public wrapper's Python-side validation is not timed), comparable to the
``torch._grouped_mm`` call beside it. 'x floor' is how far moe_gemm is from the floor; 'speedup' is
``torch._grouped_mm`` time / moe_gemm time.
"""

import argparse
import math
from collections.abc import Callable

import torch

import moe_gemm
from moe_gemm.bench import report, timing
from moe_gemm.bench.suite import MAX_REL_ERROR, gemm_cost
from moe_gemm.reference import grouped_mm_reference

# A per-expert loop slower than this on one call is not timed (DeepSeek-V3 runs 256 experts' matmuls).
LOOP_MAX_MS = 50.0
TABLE = (
    "model", "tokens", "gemm", "M", "N", "K", "active", "moe_gemm_ms", "tflops", "tbs", "x_floor", "grouped_mm_ms",
    "speedup", "loop_ms", "check",
)  # fmt: skip


def summarize(rows: list[dict]) -> dict:
    """Geometric means of 'speedup' and 'x_floor' per token count and over all rows, and of 'speedup' over the rows
    with >= 256 tokens."""
    groups = {f"tokens={t}": [r for r in rows if r["tokens"] == t] for t in sorted({r["tokens"] for r in rows})}
    groups["all"] = rows
    return {
        "groups": {
            label: {
                "shapes": len(group),
                "speedup": report.geomean(r.get("speedup") for r in group),
                "x_floor": report.geomean(r.get("x_floor") for r in group),
            }
            for label, group in groups.items()
        },
        "speedup_tokens_ge_256": report.geomean(r.get("speedup") for r in rows if r["tokens"] >= 256),
    }


def format_summary(summary: dict) -> str:
    lines = ["geometric means (speedup = torch._grouped_mm ms / moe_gemm ms):"]
    for label, stats in summary["groups"].items():
        lines.append(
            f"  {label:<14} shapes {stats['shapes']:3d}  speedup {stats['speedup']:6.2f}  x floor {stats['x_floor']:6.2f}"
        )
    lines.append(f"  speedup over shapes with >= 256 tokens: {summary['speedup_tokens_ge_256']:.2f}")
    return "\n".join(lines)


def check_against_reference(x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, host_counts: list[int]):
    """Run the public wrapper into a NaN-poisoned buffer and compare with the float32 reference.

    Returns (relative Frobenius error, problem or None).
    """
    # Freeing a NaN-filled block of the output's size right before the call makes the caching allocator hand that
    # block to the op: any output element the kernel fails to write stays NaN.
    poison = torch.full((x.shape[0], weight.shape[1]), math.nan, dtype=x.dtype, device=x.device)
    del poison
    out = moe_gemm.grouped_forward(x, weight, m_sizes)
    if not torch.isfinite(out).all():
        return math.nan, "NaN or Inf in the output (unwritten or overflowed elements)"
    ref = grouped_mm_reference(x, weight, host_counts, dtype=torch.float32)
    ref_norm = torch.linalg.vector_norm(ref).item()
    rel_error = torch.linalg.vector_norm(out.float() - ref).item() / max(ref_norm, 1e-30)
    if rel_error > MAX_REL_ERROR:
        return rel_error, f"relative error {rel_error:.2e} > {MAX_REL_ERROR:g}"
    return rel_error, None


def _loop_if_fast(x: torch.Tensor, weight: torch.Tensor, host_counts: list[int]) -> Callable[[], object] | None:
    """The per-expert torch.mm loop with host-side sizes (the best an eager user gets), or None when a call of it
    after the first takes longer than LOOP_MAX_MS (then it is not timed)."""

    def loop():
        start, outs = 0, []
        for expert, count in enumerate(host_counts):
            if count:
                outs.append(x[start : start + count] @ weight[expert].t())
            start += count
        return outs

    loop()  # the first call pays for cuBLAS's choice of kernels, one per new row count
    return loop if timing.time_once_ms(loop, x.device) <= LOOP_MAX_MS else None


def measure_shape(model: str, tokens: int, gemm: str, weight: torch.Tensor, counts: torch.Tensor, ceilings) -> dict:
    """Check and time one GEMM on the weight's device (``counts``: rows per expert, on CPU); returns its table row."""
    num_experts, n, k = weight.shape
    row = {"model": model, "tokens": tokens, "gemm": gemm, "E": num_experts, "N": n, "K": k}
    row |= gemm_cost(counts, n, k, weight.element_size(), ceilings)
    host_counts = counts.tolist()
    x = torch.randn(row["M"], k, device=weight.device, dtype=weight.dtype)
    m_sizes = counts.to(weight.device)
    timed = {}  # row key -> function; timed in turn (bench_interleaved_ms)
    try:
        row["rel_error"], problem = check_against_reference(x, weight, m_sizes, host_counts)
        if problem is None:
            op = torch.ops.moe_gemm.grouped_mm.default
            timed["moe_gemm_ms"] = lambda: op(x, weight, m_sizes, False)
    except RuntimeError as error:  # a kernel error on one shape should not hide the other rows
        problem = f"moe_gemm failed: {report.error_line(error)}"
    if weight.dtype == torch.bfloat16:  # torch._grouped_mm supports bfloat16 only
        offs = torch.cumsum(m_sizes, 0).to(torch.int32)
        weight_kn = weight.transpose(-2, -1)
        timed["grouped_mm_ms"] = lambda: torch._grouped_mm(x, weight_kn, offs=offs)
    # The loop is timed in the same rounds: timed on its own, it ran in another power state and looked faster than
    # it is beside the others.
    loop = _loop_if_fast(x, weight, host_counts)
    if loop is not None:
        timed["loop_ms"] = loop
    row["loop_ms"] = None
    try:
        row.update(zip(timed, timing.bench_interleaved_ms(list(timed.values()))))
    except RuntimeError as error:
        problem = problem or f"moe_gemm failed while timed: {report.error_line(error)}"
        row.pop("moe_gemm_ms", None)
    row["check"] = "ok" if problem is None else "FAIL"
    row["problem"] = problem

    if row.get("moe_gemm_ms"):
        ms = row["moe_gemm_ms"]
        row.update(tflops=row["flops"] / ms / 1e9, tbs=row["bytes"] / ms / 1e9, x_floor=ms / row["floor_ms"])
        if row.get("grouped_mm_ms"):
            row["speedup"] = row["grouped_mm_ms"] / ms
    return row


def run(args: argparse.Namespace, suite: dict) -> int:
    """The forward table for the arguments of ``python -m moe_gemm.bench``; exit status 1 when a shape fails."""
    rows, ceilings = report.measure_gemm_table("forward", TABLE, measure_shape, args, suite, args.tokens)
    summary = summarize(rows)
    status = report.finish(args, format_summary(summary), rows, mode="forward", summary=summary, ceilings=ceilings)
    if args.plot:
        report.plot_speedups(rows, args.plot)
    return status
