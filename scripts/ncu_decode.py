"""Kernel-only times of decode GEMMs (1 token) under Nsight Compute: moe_gemm's kernel next to torch._grouped_mm's
prep and GEMM kernels, without launch or graph overhead. Run under ncu on the GPU machine:

    ncu --kernel-name-base demangled --kernel-name regex:"Moe|cutlass|prepare_grouped" \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        --csv python scripts/ncu_decode.py > ncu_decode.csv

Each shape runs twice (the second launch of each kernel is the one to read: the first loads the module).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_gemm import bench

SHAPES = [("qwen3-30b-a3b", "down"), ("qwen3-30b-a3b", "up"), ("deepseek-v3", "down"), ("mixtral-8x7b", "down")]


def run_shape(weight: torch.Tensor, counts: torch.Tensor) -> None:
    x = torch.randn(int(counts.sum()), weight.shape[2], device="cuda", dtype=weight.dtype)
    m_sizes = counts.cuda()
    offs = torch.cumsum(m_sizes, 0).to(torch.int32)
    for _ in range(2):
        torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, False)
        torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    torch.cuda.synchronize()


def main() -> int:
    suite = bench.load_suite()
    generator = torch.Generator().manual_seed(0)
    for name, gemm in SHAPES:
        model = suite["models"][name]
        counts = bench.routing_counts(1, model["experts"], model["top_k"], "uniform", generator)
        weight = torch.randn(model["experts"], *bench.gemm_shape(model, gemm), device="cuda", dtype=torch.bfloat16)
        run_shape(weight, counts)
        active = int((counts > 0).sum())
        print(f"{name} {gemm}: {active} experts hit, {weight[0].numel() * weight.element_size() * active} weight bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
