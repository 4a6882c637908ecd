"""Benchmark: moe_gemm against torch._grouped_mm and a per-expert loop, on the expert GEMMs of real MoE models.

Run on a Hopper GPU with the kernels built::

    python -m moe_gemm.bench [--quick] [--models NAME ...] [--routing skewed] [--json PATH] [--plot PATH]

For each model of ``shapes.json`` and token count T, every token picks ``top_k`` distinct experts, and both expert
GEMMs are measured: 'up' = [T*top_k, hidden] x [E, 2*moe_intermediate, hidden]^T and 'down' = [T*top_k,
moe_intermediate] x [E, hidden, moe_intermediate]^T. Each moe_gemm output is first checked against the float32
reference (relative Frobenius error <= 1e-2, no NaN in a NaN-poisoned output buffer).

Two ceilings are measured first in the same process: a dense 8192^3 matmul (TFLOP/s) and a device-to-device copy
(TB/s, bytes read + written). The floor of a GEMM is max(bytes / bandwidth, FLOPs / peak) with bytes = (weights of
the experts that got tokens + input rows + output rows) * 2: reading and writing each once. 'x floor' is how far a
kernel is from it; 'speedup' is torch._grouped_mm time / moe_gemm time.

Times are medians with L2 flushed between runs; moe_gemm, torch._grouped_mm and the per-expert loop are timed in
turn, run by run (``bench_interleaved_ms``), so that all see the same clock. The moe_gemm time is that of the op
``torch.ops.moe_gemm.grouped_mm`` (the public wrapper's Python-side validation is not timed), comparable to the
``torch._grouped_mm`` call beside it. The pure parts (suite, routing, floor, table, geometric means) run on CPU.
"""

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch

import moe_gemm
from moe_gemm._ops import KERNELS_UNAVAILABLE_REASON
from moe_gemm.reference import grouped_mm_reference

SHAPES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.json")
GEMMS = ("up", "down")
QUICK_TOKENS = (32, 4096)
# Expert popularity of --routing skewed: p(expert of rank r) ~ 1 / r**ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.0
MAX_REL_ERROR = 1e-2
# A per-expert loop slower than this on one call is not timed (DeepSeek-V3 runs 256 experts' matmuls).
LOOP_MAX_MS = 50.0
L2_FLUSH_BYTES = 256 * 1024**2


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: suite, routing, floor, table, geometric means.
# ---------------------------------------------------------------------------------------------------------------


def load_suite(path: str = SHAPES_PATH) -> dict:
    """The model suite: ``{"models": {name: {experts, hidden, moe_intermediate, top_k}}, "tokens": [...], ...}``."""
    with open(path) as suite_file:
        return json.load(suite_file)


def gemm_shape(model: dict, gemm: str) -> tuple[int, int]:
    """``(N, K)`` of the expert weight ``[E, N, K]`` of GEMM 'up' (gate and up fused) or 'down'."""
    hidden, intermediate = model["hidden"], model["moe_intermediate"]
    return (2 * intermediate, hidden) if gemm == "up" else (hidden, intermediate)


def routing_counts(
    tokens: int, num_experts: int, top_k: int, routing: str = "uniform", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rows per expert (int64 ``[E]``, on CPU) when each token picks ``top_k`` distinct experts.

    'uniform': the top-k of uniform random scores, balanced on average. 'skewed': experts drawn without replacement
    with Zipf-like popularity (expert ranks in random order), so a few hot experts get most tokens.
    """
    if routing == "uniform":
        picks = torch.rand(tokens, num_experts, generator=generator).topk(top_k, dim=-1).indices
    elif routing == "skewed":
        ranks = torch.randperm(num_experts, generator=generator) + 1
        popularity = ranks.double() ** -ZIPF_EXPONENT
        picks = torch.multinomial(popularity.expand(tokens, num_experts), top_k, generator=generator)
    else:
        raise ValueError(f"routing: expected 'uniform' or 'skewed', got {routing!r}")
    return torch.bincount(picks.flatten(), minlength=num_experts)


def gemm_bytes(m: int, n: int, k: int, active_experts: int, itemsize: int = 2) -> int:
    """Bytes moved at least once: the weights of the experts with rows, the input rows and the output rows."""
    return (active_experts * n * k + m * k + m * n) * itemsize


def floor_ms(flops: float, num_bytes: float, peak_tflops: float, bandwidth_tbs: float) -> float:
    """max(bytes / bandwidth, FLOPs / peak) in ms (1 TB/s moves 1e9 bytes per ms, 1 TFLOP/s does 1e9 FLOPs per ms)."""
    return max(num_bytes / (bandwidth_tbs * 1e9), flops / (peak_tflops * 1e9))


def geomean(values: Iterable[float | None]) -> float:
    """Geometric mean of the finite positive values (missing ones skipped); NaN when there are none."""
    kept = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, kept)) / len(kept)) if kept else math.nan


def summarize(rows: list[dict]) -> dict:
    """Geometric means of 'speedup' and 'x_floor' per token count and over all rows, and of 'speedup' over the rows
    with >= 256 tokens."""
    groups = {f"tokens={t}": [r for r in rows if r["tokens"] == t] for t in sorted({r["tokens"] for r in rows})}
    groups["all"] = rows
    return {
        "groups": {
            label: {
                "shapes": len(group),
                "speedup": geomean(r.get("speedup") for r in group),
                "x_floor": geomean(r.get("x_floor") for r in group),
            }
            for label, group in groups.items()
        },
        "speedup_tokens_ge_256": geomean(r.get("speedup") for r in rows if r["tokens"] >= 256),
    }


# (header, row key, width, format); a missing value prints as '-'.
COLUMNS = (
    ("model", "model", 18, "s"),
    ("tokens", "tokens", 6, "d"),
    ("gemm", "gemm", 4, "s"),
    ("M", "M", 7, "d"),
    ("N", "N", 6, "d"),
    ("K", "K", 6, "d"),
    ("hit", "active", 4, "d"),
    ("moe_ms", "moe_gemm_ms", 8, ".3f"),
    ("TFLOP/s", "tflops", 7, ".1f"),
    ("TB/s", "tbs", 5, ".2f"),
    ("x_floor", "x_floor", 7, ".2f"),
    ("gmm_ms", "grouped_mm_ms", 8, ".3f"),
    ("speedup", "speedup", 7, ".2f"),
    ("loop_ms", "loop_ms", 8, ".3f"),
    ("check", "check", 5, "s"),
)


def format_header(columns=COLUMNS) -> str:
    """The header line of a table of ``columns`` ((header, row key, width, format) each); this module's by default."""
    return " ".join(f"{header:<{width}}" if fmt == "s" else f"{header:>{width}}" for header, _, width, fmt in columns)


def format_row(row: dict, columns=COLUMNS) -> str:
    """One table line: the ``columns`` of ``row``, '-' for a missing or NaN value."""
    cells = []
    for _, key, width, fmt in columns:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append(f"{'-':>{width}}")
        else:
            cells.append(f"{value:<{width}{fmt}}" if fmt == "s" else f"{value:>{width}{fmt}}")
    return " ".join(cells)


def format_summary(summary: dict) -> str:
    lines = ["geometric means (speedup = torch._grouped_mm ms / moe_gemm ms):"]
    for label, stats in summary["groups"].items():
        lines.append(
            f"  {label:<14} shapes {stats['shapes']:3d}  speedup {stats['speedup']:6.2f}  x floor {stats['x_floor']:6.2f}"
        )
    lines.append(f"  speedup over shapes with >= 256 tokens: {summary['speedup_tokens_ge_256']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, suite: dict | None = None) -> argparse.Namespace:
    suite = suite or load_suite()
    parser = argparse.ArgumentParser(
        prog="python -m moe_gemm.bench",
        description="Time moe_gemm against torch._grouped_mm and a per-expert loop on real MoE expert GEMMs.",
    )
    parser.add_argument("--models", nargs="+", choices=list(suite["models"]), default=list(suite["models"]))
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--tokens", nargs="+", type=int, default=list(suite["tokens"]), help="token counts T")
    tokens.add_argument(
        "--quick", action="store_const", dest="tokens", const=list(QUICK_TOKENS), help=f"only T in {list(QUICK_TOKENS)}"
    )
    parser.add_argument("--gemms", nargs="+", choices=GEMMS, default=list(GEMMS))
    parser.add_argument("--routing", choices=("uniform", "skewed"), default="uniform")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default=suite.get("dtype", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the rows, ceilings and summary as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speedup per shape (needs matplotlib)")
    parser.add_argument(
        "--layer", action="store_true", help="the whole experts layer vs transformers, and the routing kernel"
    )
    parser.add_argument("--decode", action="store_true", help="the decode table, 1 to 64 tokens (bench_decode.py)")
    parser.add_argument(
        "--backward", action="store_true", help="time wgrad, dgrad and forward+backward instead (bench_backward.py)"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# GPU parts.
# ---------------------------------------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms with L2 flushed before each run: ``triton.testing.do_bench`` when available."""
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return _bench_ms_cuda_events(fn, warmup_ms, rep_ms)


def interleaved_order(count: int, round_index: int) -> list[int]:
    """The functions' indices in round ``round_index`` of ``bench_interleaved_ms``: in order on even rounds, reversed
    on odd ones (a, b | b, a | a, b ...), so that each of two functions runs after itself as often as after the
    other."""
    order = list(range(count))
    return order[::-1] if round_index % 2 else order


def bench_interleaved_ms(fns: list[Callable[[], object]], warmup_ms: float = 25, rep_ms: float = 100) -> list[float]:
    """Median times (ms) of functions that are compared with one another, timed in turn with L2 flushed before each
    run, the order reversed every round (a, b, b, a, a, b, ...).

    At boost clocks the large GEMMs are power-bound and the clock settles over tens of milliseconds, so timing one
    function after the other (each with ``bench_ms``) charges whichever runs first, right after the float32
    reference check, with the clock's transient. In turn, every function sees the same clock history; reversing the
    order makes each follow itself as often as the other, so that neither is timed only in the power state the
    other leaves behind.
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    estimates = []
    for fn in fns:  # a few flushed runs each, as do_bench does, to turn the ms budgets into counts
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimates.append(max(start.elapsed_time(end) / 5, 1e-3))
    round_ms = sum(estimates)
    for _ in range(max(1, int(warmup_ms * len(fns) / round_ms))):
        for fn in fns:
            fn()
    events: list[list] = [[] for _ in fns]
    rounds = max(2, int(rep_ms * len(fns) / round_ms))
    for round_index in range(rounds + rounds % 2):  # an even count: both orders equally often
        for i in interleaved_order(len(fns), round_index):
            fn, fn_events = fns[i], events[i]
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            fn_events.append((start, end))
    torch.cuda.synchronize()
    return [statistics.median(start.elapsed_time(end) for start, end in fn_events) for fn_events in events]


def _bench_ms_cuda_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """``do_bench`` without triton: CUDA events around each run, a 256 MB write between runs to flush L2."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    fn()
    # Time a few runs to turn the warm-up and repetition budgets (ms) into counts, as do_bench does.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    timings = []
    for _ in range(max(1, int(rep_ms / estimate_ms))):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        timings.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in timings)


def measure_ceilings() -> tuple[float, float]:
    """(dense bf16 8192^3 matmul TFLOP/s, device-to-device copy TB/s counting bytes read + written)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak_tflops = 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth_tbs = 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e9
    return peak_tflops, bandwidth_tbs


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    _synchronize(x.device)
    begin = time.perf_counter()
    loop()
    _synchronize(x.device)
    return loop if (time.perf_counter() - begin) * 1e3 <= LOOP_MAX_MS else None


def measure_shape(model: str, tokens: int, gemm: str, weight: torch.Tensor, counts: torch.Tensor, ceilings) -> dict:
    """Check and time one GEMM on the weight's device (``counts``: rows per expert, on CPU); returns its table row."""
    peak_tflops, bandwidth_tbs = ceilings
    host_counts = counts.tolist()
    m, (n, k) = sum(host_counts), weight.shape[1:]
    active = sum(1 for count in host_counts if count > 0)
    flops = 2.0 * m * n * k
    num_bytes = gemm_bytes(m, n, k, active, weight.element_size())
    row = {
        "model": model,
        "tokens": tokens,
        "gemm": gemm,
        "E": weight.shape[0],
        "M": m,
        "N": n,
        "K": k,
        "active": active,
        "flops": flops,
        "bytes": num_bytes,
        "floor_ms": floor_ms(flops, num_bytes, peak_tflops, bandwidth_tbs),
    }
    x = torch.randn(m, k, device=weight.device, dtype=weight.dtype)
    m_sizes = counts.to(weight.device)
    timed = {}  # row key -> function; timed in turn (bench_interleaved_ms)
    try:
        row["rel_error"], problem = check_against_reference(x, weight, m_sizes, host_counts)
        if problem is None:
            op = torch.ops.moe_gemm.grouped_mm.default
            timed["moe_gemm_ms"] = lambda: op(x, weight, m_sizes, False)
    except RuntimeError as error:  # a kernel error on one shape should not hide the other rows
        problem = f"moe_gemm failed: {str(error).splitlines()[0][:160]}"
    if weight.dtype == torch.bfloat16:  # torch._grouped_mm supports bfloat16 only
        offs = torch.cumsum(m_sizes, 0).to(torch.int32)
        weight_kn = weight.transpose(-2, -1)
        timed["grouped_mm_ms"] = lambda: torch._grouped_mm(x, weight_kn, offs=offs)
    # The loop is timed in the same rounds: timed on its own, it ran in another power state (Mixtral down at 16k
    # tokens: alone 5.29 ms against moe_gemm's 6.09 in session 14; in turn, session 15, 5.75 against 5.74).
    loop = _loop_if_fast(x, weight, host_counts)
    if loop is not None:
        timed["loop_ms"] = loop
    row["loop_ms"] = None
    try:
        row.update(zip(timed, bench_interleaved_ms(list(timed.values()))))
    except RuntimeError as error:
        problem = problem or f"moe_gemm failed while timed: {str(error).splitlines()[0][:160]}"
        row.pop("moe_gemm_ms", None)
    row["check"] = "ok" if problem is None else "FAIL"
    row["problem"] = problem

    if row.get("moe_gemm_ms"):
        ms = row["moe_gemm_ms"]
        row.update(tflops=flops / ms / 1e9, tbs=num_bytes / ms / 1e9, x_floor=ms / row["floor_ms"])
        if row.get("grouped_mm_ms"):
            row["speedup"] = row["grouped_mm_ms"] / ms
    return row


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


def _progress(total: int):
    if importlib.util.find_spec("tqdm") is None:
        return _PlainProgress(total)
    from tqdm import tqdm

    # tqdm.write prints above the bar, to stdout.
    return tqdm(total=total, unit="gemm", file=sys.stderr)


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


def run(args: argparse.Namespace, suite: dict) -> int:
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    ceilings = measure_ceilings()
    print(f"# {moe_gemm.build_info()}; device {torch.cuda.get_device_name()}")
    print(f"# ceilings: dense bf16 8192^3 matmul {ceilings[0]:.0f} TFLOP/s, d2d copy {ceilings[1]:.2f} TB/s")
    print(f"# routing {args.routing}, dtype {args.dtype}, seed {args.seed}")

    progress = _progress(len(args.models) * len(args.tokens) * len(args.gemms))
    progress.write(format_header())
    rows = []
    for name in args.models:
        model = suite["models"][name]
        weights = {
            gemm: torch.randn(model["experts"], *gemm_shape(model, gemm), device="cuda", dtype=dtype).mul_(0.02)
            for gemm in args.gemms
        }
        for tokens in args.tokens:
            counts = routing_counts(tokens, model["experts"], model["top_k"], args.routing, generator)
            for gemm in args.gemms:
                row = measure_shape(name, tokens, gemm, weights[gemm], counts, ceilings)
                rows.append(row)
                progress.write(format_row(row) + (f"  {row['problem']}" if row["problem"] else ""))
                progress.update()
        del weights
        torch.cuda.empty_cache()
    progress.close()

    summary = summarize(rows)
    print(format_summary(summary))
    failures = [r for r in rows if r["check"] != "ok"]
    if failures:
        print(f"{len(failures)} of {len(rows)} shapes FAILED the check against the reference")
    if args.json:
        write_json(args.json, args, rows=rows, summary=summary, peak_tflops=ceilings[0], bandwidth_tbs=ceilings[1])
    if args.plot:
        plot_speedups(rows, args.plot)
    return 1 if failures else 0


def write_json(path: str, args: argparse.Namespace, **results) -> None:
    """The results of a run as JSON, with what identifies the run: build, device, routing, dtype and seed."""
    identity = {
        "build": moe_gemm.build_info(),
        "device": torch.cuda.get_device_name(),
        "routing": args.routing,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    with open(path, "w") as out:
        json.dump(identity | results, out, indent=1)
    print(f"results written to {path}")


def cuda_path_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here (no GPU, kernels not built), or None when they can."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    if not moe_gemm.cuda_available():
        reasons.append(f"the CUDA kernels are not built ({KERNELS_UNAVAILABLE_REASON})")
    return "; ".join(reasons) or None


def main(argv: list[str] | None = None) -> int:
    suite = load_suite()
    args = parse_args(argv, suite)
    reason = cuda_path_unavailable_reason()
    if reason is not None:
        print(f"moe_gemm.bench needs a CUDA GPU and the built moe_gemm kernels: {reason}", file=sys.stderr)
        return 2
    if args.layer:  # moe_gemm/bench_layer.py
        return importlib.import_module("moe_gemm.bench_layer").run(args, suite)
    if args.decode:  # moe_gemm/bench_decode.py
        return importlib.import_module("moe_gemm.bench_decode").run(args, suite)
    if args.backward:
        from moe_gemm import bench_backward

        return bench_backward.run(args, suite)
    return run(args, suite)


if __name__ == "__main__":
    sys.exit(main())
