"""What FP8 costs in accuracy (issue 25: "quantize -> GEMM against the bf16 GEMM of the original data"): for each of
the suite's GEMMs, the relative Frobenius error against the float32 product of the original bf16 rows and weights of

- the bf16 GEMM (its output rounding: the floor any 16-bit output has),
- FP8 with rowwise scales (x per row, the weight per output channel: ``quantize_fp8(group=None)``),
- FP8 with DeepSeek-V3's blockwise scales (x per row and 128 columns, ``quantize_fp8``; the weight per 128 x 128
  block, ``quantize_fp8_weight``),

each FP8 product computed from its dequantized operands in float32 and rounded to bf16 once, which is what the CUDA
kernels compute (BENCHMARKS.md, "FP8": every kernel output is within 2.5e-3 of that product). Two kinds of rows:
``normal`` (standard normal) and ``outliers`` (the same with 0.5% of the columns 30x larger, as the activation
outliers of trained LLMs sit in a few channels). Weights are normal, scaled by 1/sqrt(K). Runs on the CPU or a GPU: the
numbers are a property of the quantization, not of a kernel.

    python scripts/fp8_accuracy.py [--rows 512] [--device cpu]
"""
import argparse

import torch

import moe_gemm
from moe_gemm.bench.suite import gemm_shape, load_suite
from moe_gemm.demo import relative_error
from moe_gemm.layer_fp8 import quantize_fp8_weight
from moe_gemm.reference import dequantize_fp8_reference


def rows(kind: str, m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=generator)
    if kind == "outliers":
        channels = torch.randperm(k, generator=generator)[: max(1, k // 200)]
        x[:, channels] *= 30
    return x.bfloat16()


def errors(x: torch.Tensor, weight: torch.Tensor) -> tuple[float, float, float]:
    """(bf16, rowwise FP8, blockwise FP8) relative errors of x @ weight.T against its float32 product."""
    ref = x.float() @ weight.float().t()
    bf16 = relative_error(x @ weight.t(), ref)
    x_row, x_row_scale = moe_gemm.quantize_fp8(x, group=None)
    w_row, w_row_scale = moe_gemm.quantize_fp8(weight, group=None)  # one scale per output channel
    rowwise = (dequantize_fp8_reference(x_row, x_row_scale, dtype=torch.float32)
               @ dequantize_fp8_reference(w_row, w_row_scale, dtype=torch.float32).t())  # fmt: skip
    x_block, x_block_scale = moe_gemm.quantize_fp8(x)
    w_block, w_block_scale = quantize_fp8_weight(weight[None])
    blockwise = (dequantize_fp8_reference(x_block, x_block_scale, dtype=torch.float32)
                 @ dequantize_fp8_reference(w_block[0], w_block_scale[0], block_rows=128, dtype=torch.float32).t())
    return bf16, relative_error(rowwise.bfloat16(), ref), relative_error(blockwise.bfloat16(), ref)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_default_device(args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    suite = load_suite()
    print(f"relative Frobenius error against the float32 product of the bf16 data, {args.rows} rows, one expert")
    print(f"{'model':18s} {'gemm':5s} {'N':>6s} {'K':>6s}  {'rows':8s} {'bf16':>8s} {'rowwise':>8s} {'blockwise':>9s}")
    for model_name, model in suite["models"].items():
        for gemm in ("up", "down"):
            n, k = gemm_shape(model, gemm)
            weight = (torch.randn(n, k, generator=generator) / k**0.5).bfloat16()
            for kind in ("normal", "outliers"):
                bf16, rowwise, blockwise = errors(rows(kind, args.rows, k, generator), weight)
                row = f"{model_name:18s} {gemm:5s} {n:6d} {k:6d}  {kind:8s} {bf16:8.2e} {rowwise:8.2e} {blockwise:9.2e}"
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
