"""One FP8 GEMM, three calls, for ncu (GPU; docs/benchmark_history.md, "Where the blockwise kernel's time goes"):
DeepSeek-V3's up-projection at 16k tokens (E = 256, 512 rows each, N = 4096, K = 7168) on random e4m3 operands,
blockwise (x_scale [M, K / 128], w_scale [E, N / 128, K / 128]) or rowwise scales, on the heuristic's tile or
`--tile`. Profile the third call:

    ncu --clock-control none -k regex:device_kernel --launch-skip 2 --launch-count 1 \\
        --metrics gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\\
    l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed,\\
    lts__t_sectors.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,regex:smsp__pcsamp_warps_issue_stalled_.* \\
        python scripts/fp8_ncu.py blockwise
"""
import argparse

import torch

import moe_gemm
from moe_gemm.testing import plan_override


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scales", choices=["blockwise", "rowwise"])
    parser.add_argument("--tile", default="auto", help="a tile configuration (moe_gemm.testing.tile_configs())")
    args = parser.parse_args()
    torch.manual_seed(0)
    experts, rows, n, k = 256, 512, 4096, 7168
    m_sizes = torch.full((experts,), rows, device="cuda", dtype=torch.int64)
    x = (torch.randn(experts * rows, k, device="cuda") * 0.5).to(torch.float8_e4m3fn)
    weight = (torch.randn(experts, n, k, device="cuda") * 0.5).to(torch.float8_e4m3fn)
    if args.scales == "blockwise":
        x_scale = torch.rand(experts * rows, k // 128, device="cuda") + 0.5
        weight_scale = torch.rand(experts, n // 128, k // 128, device="cuda") + 0.5
    else:
        x_scale = torch.rand(experts * rows, device="cuda") + 0.5
        weight_scale = torch.rand(experts, n, device="cuda") + 0.5
    with plan_override(tile_config=args.tile):
        for _ in range(3):
            moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
