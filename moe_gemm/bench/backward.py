"""Backward benchmark (``python -m moe_gemm.bench --backward``): the two backward GEMMs of each suite shape and the
whole forward+backward under autograd, moe_gemm against ``torch._grouped_mm`` in the same process.

Per shape (x ``[M, K]``, weight ``[E, N, K]``, grad_y ``[M, N]``):

- wgrad: ``grad_W[e] = grad_y_e.T @ x_e``, a K-grouped GEMM. moe_gemm's kernel reads the sizes on the GPU;
  ``torch._grouped_mm(grad_y.T, x, offs)`` is the same grouping in torch. Its floor counts all ``E * N * K``
  gradient elements written (experts without rows get zeros) plus both inputs read.
- dgrad: ``grad_x = grad_y @ W[e]``: the forward kernel reading the weight in the other layout, against
  ``torch._grouped_mm(grad_y, W, offs)``.
- fwd+bwd: ``grouped_forward(x, W, sizes)`` then ``.backward(grad_y)`` against the same with ``torch._grouped_mm``.

The wgrad output is checked first: every element finite (the output buffer is NaN-poisoned) and the relative
error against a float32 reference on 16 experts spread over the range. Speedup = torch ms / moe_gemm ms; each pair
is timed in turn, run by run (``timing.bench_interleaved_ms``).
"""

import argparse
import math
from collections.abc import Callable

import torch

import moe_gemm
from moe_gemm.bench import report, timing
from moe_gemm.bench.suite import MAX_REL_ERROR, floor_ms

KINDS = ("wgrad", "dgrad", "train")
SPEEDUPS = tuple(f"{kind}_speedup" for kind in KINDS)
TABLE = (
    "model", "tokens", "gemm", "M", "N", "K", "wgrad_ms", "wgrad_x_floor", "wgrad_torch_ms", "wgrad_speedup",
    "dgrad_ms", "dgrad_torch_ms", "dgrad_speedup", "train_ms", "train_torch_ms", "train_speedup", "check",
)  # fmt: skip


def wgrad_floor_ms(m: int, n: int, k: int, num_experts: int, ceilings, itemsize: int = 2) -> float:
    """Floor of the weight gradient: reads x and grad_y once, writes every expert's [N, K] gradient once."""
    num_bytes = (m * k + m * n + num_experts * n * k) * itemsize
    return floor_ms(2.0 * m * n * k, num_bytes, *ceilings)


def summarize(rows: list[dict]) -> dict:
    """Geometric-mean speedups of wgrad, dgrad and fwd+bwd: over all rows, >= 256 tokens, and per token count."""
    selections = {"all": rows, "tokens>=256": [r for r in rows if r["tokens"] >= 256]}
    for tokens in sorted({r["tokens"] for r in rows}):
        selections[f"tokens={tokens}"] = [r for r in rows if r["tokens"] == tokens]
    return {
        label: {key: report.geomean(r.get(key) for r in selected) for key in SPEEDUPS} | {"shapes": len(selected)}
        for label, selected in selections.items()
    }


def format_summary(summary: dict) -> str:
    lines = ["geometric-mean speedups over torch._grouped_mm (wgrad, dgrad, forward+backward):"]
    for label, stats in summary.items():
        values = "  ".join(f"{key.removesuffix('_speedup')} {stats[key]:5.2f}" for key in SPEEDUPS)
        lines.append(f"  {label:<14} shapes {stats['shapes']:3d}  {values}")
    return "\n".join(lines)


def measure_shape(model: str, tokens: int, gemm: str, weight: torch.Tensor, counts: torch.Tensor, ceilings) -> dict:
    """Check the weight gradient, then time wgrad, dgrad and forward+backward of one GEMM, each beside torch's."""
    host_counts = counts.tolist()
    num_experts, n, k = weight.shape
    m = sum(host_counts)
    row = {"model": model, "tokens": tokens, "gemm": gemm, "E": num_experts, "M": m, "N": n, "K": k}
    x = torch.randn(m, k, device=weight.device, dtype=weight.dtype)
    grad_y = torch.randn(m, n, device=weight.device, dtype=weight.dtype)
    m_sizes = counts.to(weight.device)
    offs = torch.cumsum(m_sizes, 0).to(torch.int32)
    wgrad_op = torch.ops.moe_gemm.grouped_mm_wgrad.default
    dgrad_op = torch.ops.moe_gemm.grouped_mm.default
    moe_fns, torch_fns = {}, {}  # kind -> function; each pair is timed in turn (timing.bench_interleaved_ms)
    problem = None
    try:
        poison = torch.full((num_experts, n, k), math.nan, dtype=weight.dtype, device=weight.device)
        del poison  # the op's output gets this NaN-filled block: unwritten elements show up
        grad_w = wgrad_op(x, grad_y, m_sizes, False)
        row["rel_error"] = _sampled_wgrad_error(grad_w, x, grad_y, host_counts)
        del grad_w
        if not math.isfinite(row["rel_error"]) or row["rel_error"] > MAX_REL_ERROR:
            problem = f"wgrad relative error {row['rel_error']:.2e} (or unwritten elements)"
        else:
            moe_fns["wgrad"] = lambda: wgrad_op(x, grad_y, m_sizes, False)
            moe_fns["dgrad"] = lambda: dgrad_op(grad_y, weight, m_sizes, True)
            moe_fns["train"] = _train_step(lambda a, w: moe_gemm.grouped_forward(a, w, m_sizes), x, weight, grad_y)
    except RuntimeError as error:
        problem = f"moe_gemm failed: {report.error_line(error)}"
    if weight.dtype == torch.bfloat16:  # torch._grouped_mm supports bfloat16 only
        torch_fns["wgrad"] = lambda: torch._grouped_mm(grad_y.t(), x, offs=offs)
        torch_fns["dgrad"] = lambda: torch._grouped_mm(grad_y, weight, offs=offs)
        torch_fns["train"] = _train_step(
            lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs), x, weight, grad_y
        )
    for kind in KINDS:
        pairs = ((f"{kind}_ms", moe_fns), (f"{kind}_torch_ms", torch_fns))
        timed = {key: fns[kind] for key, fns in pairs if kind in fns}
        try:
            row.update(zip(timed, timing.bench_interleaved_ms(list(timed.values()))))
        except RuntimeError as error:
            problem = problem or f"moe_gemm failed while timed: {report.error_line(error)}"
    if row.get("wgrad_ms"):
        row["wgrad_x_floor"] = row["wgrad_ms"] / wgrad_floor_ms(m, n, k, num_experts, ceilings)
    row["check"] = "ok" if problem is None else "FAIL"
    row["problem"] = problem
    for kind in KINDS:
        ours_ms, theirs_ms = row.get(f"{kind}_ms"), row.get(f"{kind}_torch_ms")
        if ours_ms and theirs_ms:
            row[f"{kind}_speedup"] = theirs_ms / ours_ms
    return row


def _sampled_wgrad_error(grad_w, x, grad_y, host_counts, samples: int = 16) -> float:
    """Relative error of ``grad_w`` against the float32 reference on ``samples`` experts spread over the range (a
    full float32 reference of DeepSeek-V3's gradient would take 30 GB); NaN when any element is not finite."""
    if not torch.isfinite(grad_w).all():
        return math.nan
    num_experts = len(host_counts)
    experts = sorted({round(i * (num_experts - 1) / max(samples - 1, 1)) for i in range(min(samples, num_experts))})
    starts = [0]
    for count in host_counts:
        starts.append(starts[-1] + count)
    error = norm = 0.0
    for expert in experts:
        rows = slice(starts[expert], starts[expert + 1])
        expected = grad_y[rows].float().t() @ x[rows].float()
        error += torch.linalg.vector_norm(grad_w[expert].float() - expected).item() ** 2
        norm += torch.linalg.vector_norm(expected).item() ** 2
    return math.sqrt(error) / max(math.sqrt(norm), 1e-30)


def _train_step(forward, x: torch.Tensor, weight: torch.Tensor, grad_y: torch.Tensor) -> Callable[[], None]:
    """Forward and backward (both gradients) of ``forward(x, weight)`` under autograd, as one call."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()

    def step():
        x.grad = weight.grad = None
        forward(x, weight).backward(grad_y)

    return step


def run(args: argparse.Namespace, suite: dict) -> int:
    """The backward table for the arguments of ``python -m moe_gemm.bench``; exit status 1 when a shape fails."""
    rows, ceilings = report.measure_gemm_table(
        "backward", TABLE, measure_shape, args, suite, args.tokens, weight_per_shape=True
    )
    summary = summarize(rows)
    return report.finish(args, format_summary(summary), rows, mode="backward", summary=summary, ceilings=ceilings)
