"""Power and SM clock while one grouped GEMM runs back to back (H100s are power-bound on large GEMMs).

Loops moe_gemm's kernel or torch._grouped_mm on one problem for a few seconds while `nvidia-smi` samples the board
power and SM clock every 50 ms, then prints the time per call and the steady-state averages:

    python scripts/power_clock.py --op moe --experts 8 --tokens 16384 --topk 2 --n 4096 --k 14336
    MOE_GEMM_TILE_CONFIG=128x256c2x1 python scripts/power_clock.py --op moe ...   (any configuration)
    python scripts/power_clock.py --op torch ...
"""

import argparse
import subprocess
import time

import torch

import moe_gemm  # noqa: F401  (registers torch.ops.moe_gemm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=("moe", "torch"), default="moe")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=14336)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    scores = torch.rand(args.tokens, args.experts, device="cuda")
    counts = torch.bincount(scores.topk(args.topk, -1).indices.flatten(), minlength=args.experts)
    x = torch.randn(int(counts.sum()), args.k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(args.experts, args.n, args.k, device="cuda", dtype=torch.bfloat16)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    weight_kn = weight.transpose(-2, -1)
    if args.op == "moe":
        run = lambda: torch.ops.moe_gemm.grouped_mm(x, weight, counts, False)  # noqa: E731
    else:
        run = lambda: torch._grouped_mm(x, weight_kn, offs=offs)  # noqa: E731
    for _ in range(20):
        run()
    torch.cuda.synchronize()

    query = "--query-gpu=power.draw,clocks.sm,temperature.gpu"
    sampler = subprocess.Popen(["nvidia-smi", query, "--format=csv,noheader,nounits", "-lms", "50"],
                               stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = 0
    start.record()
    began = time.time()
    while time.time() - began < args.seconds:
        for _ in range(20):
            run()
        calls += 20
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    sampler.terminate()
    samples = [list(map(float, line.split(","))) for line in sampler.communicate()[0].splitlines() if line.count(",") == 2]
    steady = samples[len(samples) // 4:]  # past the clock's transient
    power = sum(s[0] for s in steady) / len(steady)
    clock = sum(s[1] for s in steady) / len(steady)
    print(f"{args.op}: {start.elapsed_time(end) / calls:.3f} ms per call, {power:.0f} W, SM clock {clock:.0f} MHz, "
          f"{steady[-1][2]:.0f} C ({len(steady)} samples)")


if __name__ == "__main__":
    main()
