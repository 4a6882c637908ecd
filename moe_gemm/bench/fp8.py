"""The FP8 benchmark (``python -m moe_gemm.bench --fp8``): on the suite's GEMMs, moe_gemm's FP8 GEMM
(``grouped_mm_fp8``) against ``torch._scaled_grouped_mm`` and against moe_gemm's bf16 GEMM, on the same data, timed in
turn (``bench_interleaved_ms``).

Both FP8 GEMMs get the same operands: the suite's bf16 random rows and weights quantized rowwise (one scale per row of
x and per output channel of the weight, ``quantize_fp8(group=None)``: ``amax / 448``), the one scaling that
``torch._scaled_grouped_mm`` has. The ``blockwise`` columns time moe_gemm with DeepSeek-V3's scaling on the same data
(x per row and 128 columns, ``quantize_fp8``; weights per 128 x 128 block, ``quantize_fp8_weight``), which torch
lacks. Each moe_gemm output is checked first against the float32 product of its dequantized operands (relative
Frobenius error <= ``MAX_REL_ERROR``). torch runs with ``use_fast_accum=True``, the accumulation of moe_gemm's
rowwise kernel (CUTLASS's FP8 fast accumulation over the whole of K; the blockwise kernel promotes to float32 every
128 columns), and ``torch_acc_ms`` with its default, ``use_fast_accum=False``. Ceilings, measured in the same run:
the FP8 dense matmul (``torch._scaled_mm``, 8192^3, rowwise scales) and the copy bandwidth; 'x floor' counts one byte
per element of x and of the weights of the experts with rows, two per output element. ``speedup`` is
``torch._scaled_grouped_mm``'s time (fast accumulation) over moe_gemm's, ``x_bf16`` moe_gemm bf16's over moe_gemm
FP8's. A torch baseline that refuses a shape is reported beside the row, and does not fail it. Without the FP8 CUDA
kernel (``_ops.FP8_KERNEL_BUILT`` False) moe_gemm's FP8 op runs PyTorch ops: the preamble says so, and the times are
those of that path.
"""

import argparse
import math

import torch

import moe_gemm
from moe_gemm import _ops
from moe_gemm.bench import report, timing
from moe_gemm.bench.suite import MAX_REL_ERROR, floor_ms, gemm_cost
from moe_gemm.layer_fp8 import quantize_fp8_weight
from moe_gemm.reference import dequantize_fp8_reference

TABLE = ("model", "tokens", "gemm", "M", "N", "K", "active", "fp8_ms", "fp8_tflops", "fp8_x_floor", "scaled_gmm_ms",
         "scaled_gmm_default_ms", "fp8_speedup", "bf16_ms", "x_bf16", "rel_error", "blockwise_ms", "blockwise_tflops",
         "blockwise_x_floor", "blockwise_rel_error", "check")  # fmt: skip


def measure_fp8_ceiling() -> float:
    """Dense FP8 matmul TFLOP/s: ``torch._scaled_mm`` of 8192^3 e4m3 operands with rowwise scales."""
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    scale_a = torch.ones(8192, 1, device="cuda")
    scale_b = torch.ones(1, 8192, device="cuda")
    ms = timing.bench_ms(lambda: torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16))
    return 2 * 8192**3 / ms / 1e9


def rowwise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [..., K]`` in float8_e4m3fn with one float32 scale per row of K (``quantize_fp8(group=None)``)."""
    quantized, scale = moe_gemm.quantize_fp8(values.reshape(-1, values.shape[-1]), group=None)
    return quantized.view(values.shape), scale.view(values.shape[:-1])


def check_fp8(out: torch.Tensor, x_fp8, x_scale, w_fp8, w_scale, host_counts: list[int]) -> tuple[float, str | None]:
    """(relative Frobenius error of ``out`` against the float32 product of the operands dequantized by
    ``reference.dequantize_fp8_reference``, apart from the op's own path, problem)."""
    if not torch.isfinite(out).all():
        return math.nan, "NaN or Inf in the output"
    x = dequantize_fp8_reference(x_fp8, x_scale, dtype=torch.float32)
    ref = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    start = 0
    for expert, count in enumerate(host_counts):
        if count:
            weight = dequantize_fp8_reference(w_fp8[expert], w_scale[expert], block_rows=128, dtype=torch.float32)
            ref[start : start + count] = x[start : start + count] @ weight.t()
        start += count
    error = torch.linalg.vector_norm(out.float() - ref).item() / max(torch.linalg.vector_norm(ref).item(), 1e-30)
    return error, (f"relative error {error:.2e} > {MAX_REL_ERROR:g}" if error > MAX_REL_ERROR else None)


def measure_shape(model: str, tokens: int, gemm: str, weight: torch.Tensor, counts: torch.Tensor, ceilings) -> dict:
    """Check and time one GEMM (``counts``: rows per expert, on CPU); returns its table row. ``ceilings``: (dense
    FP8 TFLOP/s, copy TB/s)."""
    num_experts, n, k = weight.shape
    row = {"model": model, "tokens": tokens, "gemm": gemm, "E": num_experts, "N": n, "K": k}
    row |= gemm_cost(counts, n, k, 1, ceilings)
    row["floor_ms"] = floor_ms(row["flops"], row["bytes"] + row["M"] * n, *ceilings)  # bf16 output: 2 bytes
    host_counts = counts.tolist()
    m_sizes = counts.to(weight.device)
    x = torch.randn(row["M"], k, device=weight.device, dtype=torch.bfloat16)
    x_fp8, x_scale = rowwise(x)
    w_fp8, w_scale = rowwise(weight)
    x_groups = moe_gemm.quantize_fp8(x)
    w_blocks = quantize_fp8_weight(weight)
    timed, failures = {}, []
    op = torch.ops.moe_gemm.grouped_mm_fp8.default
    for name, (x_q, x_s), (w_q, w_s) in (("fp8", (x_fp8, x_scale), (w_fp8, w_scale)),
                                         ("blockwise", x_groups, w_blocks)):  # fmt: skip
        try:
            out = op(x_q, x_s, w_q, w_s, m_sizes, False, torch.bfloat16)
            error_key = "rel_error" if name == "fp8" else f"{name}_rel_error"
            row[error_key], problem = check_fp8(out, x_q, x_s, w_q, w_s, host_counts)
            del out
        except RuntimeError as error:
            problem = f"moe_gemm FP8 failed: {report.error_line(error)}"
        if problem is None:
            timed[f"{name}_ms"] = lambda x_q=x_q, x_s=x_s, w_q=w_q, w_s=w_s: op(x_q, x_s, w_q, w_s, m_sizes, False,
                                                                                torch.bfloat16)  # fmt: skip
        else:
            failures.append(f"{name}: {problem}")
    problem = "; ".join(failures) or None
    problems = []
    weight_bf16 = weight.to(torch.bfloat16)
    timed["bf16_ms"] = lambda: torch.ops.moe_gemm.grouped_mm.default(x, weight_bf16, m_sizes, False)
    offs = torch.cumsum(m_sizes, 0).to(torch.int32)

    for key, fast_accum in (("scaled_gmm_ms", True), ("scaled_gmm_default_ms", False)):

        def scaled_grouped_mm(fast_accum=fast_accum):
            return torch._scaled_grouped_mm(x_fp8, w_fp8.transpose(-2, -1), x_scale, w_scale, offs=offs,
                                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)  # fmt: skip

        try:
            scaled_grouped_mm()
            timed[key] = scaled_grouped_mm
        except (RuntimeError, AttributeError, NotImplementedError, TypeError) as error:
            problems.append(f"torch._scaled_grouped_mm (use_fast_accum={fast_accum}) refused: "
                            f"{report.error_line(error)}")  # fmt: skip
    row.update(zip(timed, timing.bench_interleaved_ms(list(timed.values()))))
    row["check"] = "ok" if problem is None else "FAIL"
    row["problem"] = "; ".join(p for p in [problem, *problems] if p) or None
    if row.get("fp8_ms"):
        ms = row["fp8_ms"]
        row.update(fp8_tflops=row["flops"] / ms / 1e9, fp8_x_floor=ms / row["floor_ms"], x_bf16=row["bf16_ms"] / ms)
        if row.get("scaled_gmm_ms"):
            row["fp8_speedup"] = row["scaled_gmm_ms"] / ms
    if row.get("blockwise_ms"):
        ms = row["blockwise_ms"]
        row.update(blockwise_tflops=row["flops"] / ms / 1e9, blockwise_x_floor=ms / row["floor_ms"],
                   blockwise_x_bf16=row["bf16_ms"] / ms)
        if row.get("scaled_gmm_ms"):
            row["blockwise_speedup"] = row["scaled_gmm_ms"] / ms
    return row


def summarize(rows: list[dict]) -> dict:
    """Geometric means over all rows and over those of >= 256 tokens: speedup over torch, over bf16, x floor."""
    groups = {"all": rows, "tokens>=256": [r for r in rows if r["tokens"] >= 256]}
    keys = ("fp8_speedup", "x_bf16", "fp8_x_floor", "blockwise_speedup", "blockwise_x_bf16", "blockwise_x_floor")
    return {label: {key: report.geomean(r.get(key) for r in group) for key in keys}
            for label, group in groups.items()}  # fmt: skip


def format_summary(summary: dict) -> str:
    lines = ["geometric means (speedup: torch._scaled_grouped_mm ms, rowwise, over moe_gemm FP8 ms):"]
    for label, stats in summary.items():
        for scaling, prefix in (("rowwise", "fp8_speedup x_bf16 fp8_x_floor"),
                                ("blockwise", "blockwise_speedup blockwise_x_bf16 blockwise_x_floor")):  # fmt: skip
            speedup, x_bf16, x_floor = (stats[key] for key in prefix.split())
            lines.append(f"  {label:<12} {scaling:<9} speedup {speedup:6.2f}  vs moe_gemm bf16 {x_bf16:6.2f}  "
                         f"x floor {x_floor:6.2f}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace, suite: dict) -> int:
    """The FP8 table for the arguments of ``python -m moe_gemm.bench``; exit status 1 when a shape fails its check."""
    torch.manual_seed(args.seed)
    ceilings = (measure_fp8_ceiling(), report.measure_ceilings()[1])
    kernel = "CUDA kernel" if _ops.FP8_KERNEL_BUILT else "PyTorch ops (the FP8 CUDA kernel is not built)"
    report.print_preamble(f"fp8 (moe_gemm's FP8 GEMM: {kernel}); routing {args.routing}, seed {args.seed}")
    print(f"# ceilings: dense FP8 8192^3 _scaled_mm {ceilings[0]:.0f} TFLOP/s, d2d copy {ceilings[1]:.2f} TB/s")
    total = len(args.models) * len(args.tokens) * len(args.gemms)
    cases = report.gemm_cases(suite, args, args.tokens)
    rows = report.measure_table(TABLE, cases, total, lambda *case: measure_shape(*case, ceilings))
    summary = summarize(rows)
    return report.finish(args, format_summary(summary), rows, mode="fp8", summary=summary, fp8_kernel=kernel,
                         peak_fp8_tflops=ceilings[0], bandwidth_tbs=ceilings[1])  # fmt: skip
