"""``quantize_fp8``'s CUDA kernel against the same quantization in PyTorch ops (GPU; BENCHMARKS.md, "FP8"): both
scalings (groups of 128 columns, one scale per row) on random bf16 rows, interleaved in one process; checks the two
agree bit for bit first. GB/s count the bf16 read and the fp8 write.

    python scripts/fp8_quantize.py
"""
import torch

from moe_gemm import _ops
from moe_gemm.bench.timing import bench_interleaved_ms

torch.manual_seed(0)
for rows, k in ((128, 7168), (4096, 7168), (16384, 7168), (32768, 4096)):
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    for group in (128, None):
        (got, got_scale), (want, want_scale) = _ops.quantize_fp8_cuda(x, group), _ops.quantize_fp8_torch(x, group)
        if not (torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(got_scale, want_scale)):
            raise SystemExit(f"rows={rows} k={k} group={group}: the kernel and the PyTorch ops differ")
        kernel_ms, torch_ms = bench_interleaved_ms(
            [lambda: _ops.quantize_fp8_cuda(x, group), lambda: _ops.quantize_fp8_torch(x, group)]
        )
        print(f"rows={rows:6d} K={k} group={str(group):4s}: kernel {kernel_ms * 1e3:7.1f} us "
              f"({x.numel() * 3 / kernel_ms / 1e6:5.0f} GB/s), PyTorch ops {torch_ms * 1e3:7.1f} us, "
              f"{torch_ms / kernel_ms:5.2f}x")  # fmt: skip
