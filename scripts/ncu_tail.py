"""What an expert's partial last m-block costs in L2 and DRAM traffic (GPU, Nsight Compute): every expert gets r rows,
and for each r and tile configuration one launch of the forward kernel is profiled with `ncu` (clocks locked at base,
so the times compare work rather than power states).

    python scripts/ncu_tail.py [--rows 512 513 576 577] [--configs 128x256c1x2 128x256] [--experts 64 --n 4096 --k 7168]

Prints per case the kernel time, the L2 sectors read by the SMs (TMA loads included), how busy L2 was, and the DRAM
bytes read. With whole m-blocks (r = 512) CTAs that share a weight tile load it in step, and L2 serves fewer sectors
than the tiles ask for; see docs/benchmark_history.md, "Session 12".
"""

import argparse
import os
import subprocess
import sys

METRICS = {
    "gpu__time_duration.sum": "ms",
    "lts__t_sectors_srcunit_tex_op_read.sum": "L2 read sectors",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed": "L2 busy %",
    "dram__bytes_read.sum": "DRAM read",
}


def launch(experts: int, rows: int, n: int, k: int) -> None:
    """The profiled process: one warm-up call, then the one ncu measures (-s 1 -c 1)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import moe_gemm  # noqa: F401  (registers torch.ops.moe_gemm)

    m_sizes = torch.full((experts,), rows, device="cuda", dtype=torch.int32)
    x = torch.randn(experts * rows, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, False)
    torch.cuda.synchronize()


def profile(args, rows: int, config: str) -> dict[str, str]:
    command = ["ncu", "--metrics", ",".join(METRICS), "-k", "regex:device_kernel", "-s", "1", "-c", "1",
               sys.executable, os.path.abspath(__file__), "--launch", str(rows),
               "--experts", str(args.experts), "--n", str(args.n), "--k", str(args.k)]
    env = dict(os.environ, MOE_GEMM_TILE_CONFIG=config)
    output = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300).stdout
    values = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] in METRICS:
            values[fields[0]] = f"{fields[-1]} {fields[1]}" if fields[0] == "dram__bytes_read.sum" else fields[-1]
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[512, 513, 576, 577])
    parser.add_argument("--configs", nargs="+", default=["128x256c1x2", "128x256"])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=7168)
    parser.add_argument("--launch", type=int, metavar="ROWS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.launch is not None:
        launch(args.experts, args.launch, args.n, args.k)
        return 0
    print(f"{args.experts} experts x r rows, N = {args.n}, K = {args.k}, bf16, one launch each under ncu")
    print(f"{'config':14s} {'r':>5s}  " + "  ".join(f"{name:>16s}" for name in METRICS.values()))
    for config in args.configs:
        for rows in args.rows:
            values = profile(args, rows, config)
            if len(values) < len(METRICS):
                print(f"{config:14s} {rows:5d}  ncu gave no result (is ncu on PATH, the extension built?)")
                continue
            print(f"{config:14s} {rows:5d}  " + "  ".join(f"{values[m]:>16s}" for m in METRICS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
