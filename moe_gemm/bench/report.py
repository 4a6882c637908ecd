"""What a benchmark run prints and writes: its preamble, the table with a progress bar (tqdm when installed), the
geometric means, the JSON of the results and a plot of the speedups (matplotlib when installed).

Every column that any table shows is defined once, in ``COLUMNS``, by the row key it shows; a table is a tuple of
row keys. A missing or NaN value prints as '-'.
"""

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

import moe_gemm
from moe_gemm.bench.suite import gemm_cases, measure_ceilings


class Column(NamedTuple):
    header: str
    width: int
    fmt: str  # a format spec; "s" columns are left-aligned


COLUMNS = {
    # The problem.
    "model": Column("model", 18, "s"),
    "tokens": Column("tokens", 6, "d"),
    "gemm": Column("gemm", 4, "s"),
    "mode": Column("mode", 7, "s"),
    "M": Column("M", 7, "d"),
    "N": Column("N", 6, "d"),
    "K": Column("K", 6, "d"),
    "active": Column("hit", 4, "d"),
    # Forward, in ms.
    "moe_gemm_ms": Column("moe_ms", 8, ".3f"),
    "tflops": Column("TFLOP/s", 7, ".1f"),
    "tbs": Column("TB/s", 5, ".2f"),
    "x_floor": Column("x_floor", 7, ".2f"),
    "grouped_mm_ms": Column("gmm_ms", 8, ".3f"),
    "speedup": Column("speedup", 7, ".2f"),
    "loop_ms": Column("loop_ms", 8, ".3f"),
    # Backward, in ms.
    "wgrad_ms": Column("wgrad_ms", 8, ".3f"),
    "wgrad_x_floor": Column("x_floor", 7, ".2f"),
    "wgrad_torch_ms": Column("gmm_ms", 8, ".3f"),
    "wgrad_speedup": Column("speedup", 7, ".2f"),
    "dgrad_ms": Column("dgrad_ms", 8, ".3f"),
    "dgrad_torch_ms": Column("gmm_ms", 8, ".3f"),
    "dgrad_speedup": Column("speedup", 7, ".2f"),
    "train_ms": Column("fwdbwd_ms", 9, ".3f"),
    "train_torch_ms": Column("gmm_ms", 8, ".3f"),
    "train_speedup": Column("speedup", 7, ".2f"),
    # Decode, in us.
    "floor_us": Column("floor", 7, ".1f"),
    "moe_us": Column("moe", 7, ".1f"),
    "moe_graph_us": Column("moe_graph", 9, ".1f"),
    "nosplit_graph_us": Column("nosplit_graph", 13, ".1f"),
    "gmm_us": Column("gmm", 7, ".1f"),
    "gmm_graph_us": Column("gmm_graph", 9, ".1f"),
    "bw_percent": Column("BW%", 4, ".0f"),
    "speedup_graph": Column("speedup_graph", 13, ".2f"),
    "host_us": Column("host", 6, ".1f"),
    "gmm_host_us": Column("gmm_host", 8, ".1f"),
    # The MoE layer: its config, TFLOP/s in the FLOP convention of bench/layer.py, times in ms, ratios.
    "config": Column("config", 13, "s"),
    "T": Column("T", 6, "d"),
    "d": Column("d", 5, "d"),
    "n": Column("n", 5, "d"),
    "E": Column("E", 4, "d"),
    "impl": Column("impl", 16, "s"),
    "fwd_tflops": Column("fwd", 5, ".0f"),
    "bwd_tflops": Column("bwd", 5, ".0f"),
    "fwd_bwd_tflops": Column("fwd+bwd", 7, ".0f"),
    "peak_gb": Column("peak_GB", 7, ".1f"),
    "fwd_ms": Column("fwd_ms", 8, ".3f"),
    "fwd_bwd_ms": Column("fwd+bwd_ms", 10, ".3f"),
    "x_grouped_mm_fwd": Column("x_gmm_fwd", 9, ".2f"),
    "x_grouped_mm_fwd_bwd": Column("x_gmm_f+b", 9, ".2f"),
    "x_transformers_fwd": Column("x_hf_fwd", 8, ".2f"),
    "x_transformers_fwd_bwd": Column("x_hf_f+b", 8, ".2f"),
    "sonicmoe_fwd": Column("sonic_fwd", 9, ".0f"),
    "sonicmoe_bwd": Column("sonic_bwd", 9, ".0f"),
    "rel_error": Column("rel_err", 7, ".1e"),
    # The router, in ms.
    "kernel_ms": Column("kernel_ms", 9, ".4f"),
    "torch_ms": Column("torch_ms", 9, ".4f"),
    "check": Column("check", 5, "s"),
    # FP8 (bench/fp8.py), in ms.
    "fp8_ms": Column("fp8_ms", 8, ".3f"),
    "fp8_tflops": Column("TFLOP/s", 7, ".1f"),
    "fp8_x_floor": Column("x_floor", 7, ".2f"),
    "scaled_gmm_ms": Column("torch_ms", 8, ".3f"),
    "scaled_gmm_default_ms": Column("torch_acc_ms", 12, ".3f"),
    "fp8_speedup": Column("speedup", 7, ".2f"),
    "bf16_ms": Column("bf16_ms", 8, ".3f"),
    "x_bf16": Column("x_bf16", 6, ".2f"),
    "blockwise_ms": Column("block_ms", 8, ".3f"),
    "blockwise_tflops": Column("TFLOP/s", 7, ".1f"),
    "blockwise_x_floor": Column("x_floor", 7, ".2f"),
    "blockwise_rel_error": Column("rel_err", 7, ".1e"),
    # Expert parallelism (bench/ep.py): per rank, the slowest rank's median.
    "transport": Column("transport", 16, "s"),
    "world": Column("world", 5, "d"),
    "step": Column("step", 8, "s"),
    "ep_mb": Column("MB", 9, ".2f"),
    "ep_ms": Column("ms", 9, ".3f"),
    "ep_gbs": Column("GB/s", 7, ".1f"),
    "ep_graph_ms": Column("graph ms", 9, ".3f"),
    "ep_graph_gbs": Column("graph GB/s", 10, ".1f"),
}


def format_header(table: tuple[str, ...]) -> str:
    """The header line of a table of the row keys ``table``."""
    return " ".join(
        f"{column.header:<{column.width}}" if column.fmt == "s" else f"{column.header:>{column.width}}"
        for column in map(COLUMNS.__getitem__, table)
    )


def format_row(row: dict, table: tuple[str, ...]) -> str:
    """One table line: the values of ``row`` under the keys ``table``, '-' for a missing or NaN value, then the row's
    problem when it has one."""
    cells = []
    for key in table:
        column, value = COLUMNS[key], row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append(f"{'-':>{column.width}}")
        else:
            align = "<" if column.fmt == "s" else ">"
            cells.append(f"{value:{align}{column.width}{column.fmt}}")
    problem = row.get("problem")
    return " ".join(cells) + (f"  {problem}" if problem else "")


def geomean(values: Iterable[float | None]) -> float:
    """Geometric mean of the finite positive values (missing ones skipped); NaN when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, kept)) / len(kept)) if kept else math.nan


def error_line(error: Exception) -> str:
    """The first line of an error's message, cut short for a table."""
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


class _PlainProgress:
    """Stand-in for tqdm: '[i/n]' on stderr, table lines on stdout."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"[{self.done}/{self.total}]", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        pass


def progress(total: int):
    """A progress bar on stderr whose ``write`` prints table lines above it, on stdout."""
    if importlib.util.find_spec("tqdm") is None:
        return _PlainProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="row", file=sys.stderr)


def device_name() -> str:
    """The current CUDA device's name, or "CPU" without one (a CPU build of torch asserts, a CUDA one raises)."""
    try:
        return torch.cuda.get_device_name()
    except (AssertionError, RuntimeError):
        return "CPU"


def print_preamble(details: str, ceilings: tuple[float, float] | None = None) -> None:
    """The lines that identify a run: build and device, the ceilings when measured, then ``details`` (what runs,
    routing, dtype, seed)."""
    print(f"# {moe_gemm.build_info()}; device {device_name()}")
    if ceilings is not None:
        print(f"# ceilings: dense bf16 8192^3 matmul {ceilings[0]:.0f} TFLOP/s, d2d copy {ceilings[1]:.2f} TB/s")
    print(f"# {details}")


def measure_table(
    table: tuple[str, ...], cases: Iterable[tuple], total: int, measure: Callable[..., dict | list[dict]]
) -> list[dict]:
    """``measure(*case)`` (a row, or a list of rows) for each of the ``total`` cases, each row printed as it comes
    under the header of ``table``; the rows."""
    bar = progress(total)
    bar.write(format_header(table))
    rows = []
    for case in cases:
        measured = measure(*case)
        del case  # a case may hold a weight of many GB: freed before the next one is made
        for row in measured if isinstance(measured, list) else [measured]:
            rows.append(row)
            bar.write(format_row(row, table))
        bar.update()
    bar.close()
    return rows


def measure_gemm_table(
    what: str, table: tuple[str, ...], measure: Callable[..., dict], args: argparse.Namespace, suite: dict,
    tokens: list[int], weight_per_shape: bool = False,
) -> tuple[list[dict], tuple[float, float]]:
    """The rows ``measure(model name, tokens, gemm, weight, counts, ceilings)`` of every GEMM of ``suite.gemm_cases``,
    after the ceilings and a preamble saying ``what`` runs; the rows and the ceilings."""
    torch.manual_seed(args.seed)
    ceilings = measure_ceilings()
    print_preamble(f"{what}; routing {args.routing}, dtype {args.dtype}, seed {args.seed}", ceilings)
    total = len(args.models) * len(tokens) * len(args.gemms)
    cases = gemm_cases(suite, args, tokens, weight_per_shape)
    return measure_table(table, cases, total, lambda *case: measure(*case, ceilings)), ceilings


def finish(
    args: argparse.Namespace,
    summary_text: str,
    rows: list[dict],
    *,
    also_checked: list[dict] = (),
    ceilings: tuple[float, float] | None = None,
    **results,
) -> int:
    """Print the summary and the failures of ``rows`` and ``also_checked``, write the JSON when asked (``rows``, the
    ``ceilings`` when measured and ``results``); the exit status: 1 when a row failed its check. A row whose check is
    "OOM" (an implementation that ran out of memory, in the layer table) shows so in the table and is no failure."""
    print(summary_text)
    checked = [*rows, *also_checked]
    failures = [r for r in checked if r["check"] not in ("ok", "OOM")]
    if failures:
        print(f"{len(failures)} of {len(checked)} rows FAILED their check")
    if ceilings is not None:
        results |= {"peak_tflops": ceilings[0], "bandwidth_tbs": ceilings[1]}
    if args.json:
        write_json(args.json, args, rows=rows, **results)
    return 1 if failures else 0


def write_json(path: str, args: argparse.Namespace, **results) -> None:
    """The results of a run as JSON, with what identifies the run: build, device, routing, dtype and seed."""
    identity = {
        "build": moe_gemm.build_info(),
        "device": device_name(),
        "routing": args.routing,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    with open(path, "w") as out:
        json.dump(identity | results, out, indent=1)
    print(f"results written to {path}")


def plot_speedups(rows: list[dict], path: str) -> None:
    """PNG of the speedup per shape: one group of bars (up, down) per model and token count."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"--plot {path}: matplotlib is not installed, no plot written")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["tokens"]) for r in rows))
    gemms = list(dict.fromkeys(r["gemm"] for r in rows))
    speedup = {(r["model"], r["tokens"], r["gemm"]): r.get("speedup") or 0.0 for r in rows}
    width = 0.8 / len(gemms)
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(groups)), 4.5))
    for i, gemm in enumerate(gemms):
        heights = [speedup.get((model, tokens, gemm), 0.0) for model, tokens in groups]
        ax.bar([g + i * width for g in range(len(groups))], heights, width, label=gemm)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{model}\nT={tokens}" for model, tokens in groups], rotation=90, fontsize=7)
    ax.set_ylabel("speedup vs torch._grouped_mm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"plot written to {path}")
