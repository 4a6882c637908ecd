"""The experts layer at the clock a loaded H200 settles to, against the dense bf16 matmul at that clock (GPU;
BENCHMARKS.md, "The layer at the settled clock"). A long run of large GEMMs lowers the SM clock from 1980 MHz to about
1450, so a layer's TFLOP/s is compared with cuBLAS's `a @ b` (8192^3, bf16) measured under the same load rather than
with its rate on a rested GPU.

After 3 s of dense matmuls, each function runs back-to-back for `--seconds` in turn (the dense matmul, then per config
moe_gemm's and transformers' `grouped_mm` layer, forward and forward+backward, router in bf16 as `bench --layer
--router-dtype model`), for `--rounds` rounds; each line gives the time per call from CUDA events, TFLOP/s in
`bench --layer`'s convention (fwd 6*T*K*d*n, fwd+bwd 18*T*K*d*n; the matmul 2*8192^3) and the SM clock read right
after (`torch.cuda.clock_rate`).

    python scripts/settled_clock_rates.py [--configs sonic-1 sonic-2 qwen3-30b-a3b] [--seconds 0.5] [--rounds 3]
"""
import argparse
import time

import torch

from moe_gemm.bench import layer as bench_layer

MATMUL_SIZE = 8192
LOAD_SECONDS = 3.0


def per_call_ms(fn, seconds: float) -> float:
    """Mean time per call of ``fn`` run back-to-back for ``seconds`` (CUDA events around all of them; a sync every
    four calls keeps the host at most four calls ahead)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, began = 0, time.perf_counter()
    start.record()
    while time.perf_counter() - began < seconds:
        fn()
        calls += 1
        if calls % 4 == 0:
            torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["sonic-1", "sonic-2", "qwen3-30b-a3b"])
    parser.add_argument("--seconds", type=float, default=0.5, help="back-to-back time per function and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda")
    configs = bench_layer.load_layer_configs()["configs"]
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    functions = {f"dense {MATMUL_SIZE}^3": (lambda: a @ b, 2.0 * MATMUL_SIZE**3)}
    for name in args.configs:
        config = configs[name]
        layer = bench_layer.make_layer(config, device, torch.bfloat16)
        hidden = torch.randn(config["T"], config["d"], device=device).to(torch.bfloat16).requires_grad_()
        grad_out = torch.randn(config["T"], config["d"], device=device).to(torch.bfloat16)
        flops = bench_layer.layer_flops(config)
        for implementation in ("moe_gemm", "grouped_mm"):
            forward = bench_layer.layer_function(implementation, layer, None, "model")
            differentiable = (hidden, *layer.parameters())

            def step(forward=forward, hidden=hidden, grad_out=grad_out, differentiable=differentiable):
                for tensor in differentiable:
                    tensor.grad = None
                forward(hidden).backward(grad_out)

            functions[f"{name} {implementation} fwd"] = (lambda forward=forward, hidden=hidden: forward(hidden),
                                                         flops["fwd"])
            functions[f"{name} {implementation} fwd+bwd"] = (step, flops["fwd_bwd"])

    began = time.perf_counter()
    while time.perf_counter() - began < LOAD_SECONDS:
        a @ b
    torch.cuda.synchronize()
    print(f"# {torch.cuda.get_device_name()}; after {LOAD_SECONDS:.0f} s of dense matmuls: {torch.cuda.clock_rate()} MHz")
    for round_index in range(args.rounds):
        for name, (fn, flop_count) in functions.items():
            ms = per_call_ms(fn, args.seconds)
            print(f"round {round_index} {name:34s} {ms:8.3f} ms {flop_count / ms / 1e9:7.1f} TFLOP/s  "
                  f"{torch.cuda.clock_rate()} MHz", flush=True)


if __name__ == "__main__":
    main()
