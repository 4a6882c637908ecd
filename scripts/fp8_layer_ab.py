"""The FP8 experts layer against the bf16 one on the same weights (GPU): forward, and forward+backward with the
gradients of the hidden states and routing weights only (the experts frozen in both: ``MoEExpertsFP8`` has fp8
buffers, ``MoEExperts``' parameters are set not to require grad). Timed in turn in one process
(``timing.bench_ms``, L2 flushed); TFLOP/s with forward ``6*T*K*d*n`` and forward+backward ``12*T*K*d*n`` (the
two input-gradient GEMMs cost what the two forward GEMMs do). The first backward makes the fp8 weights' transposes,
which the warm-up covers. Peak memory: the CUDA memory allocated during one forward+backward above what was allocated
before it (weights, inputs and, for fp8, the kept transposes, which are reported apart).

    python scripts/fp8_layer_ab.py [--configs qwen3-30b-a3b deepseek-v3] [--tokens 16384 4096] [--train]

With ``--train`` the experts train in both: ``MoEExperts`` in bf16 against ``MoEExpertsFP8Training`` on the same
parameters (each step quantizes them; forward and input gradient in FP8, weight gradients in bf16), forward+backward
then ``18*T*K*d*n``, peak memory with the weight gradients, and the time of quantizing ``gate_up_proj`` (stored
and transposed) against the bytes it moves; "fp8 reused" times the same steps inside one ``reuse_quantized_weights()``
block (the micro-batches of a long gradient accumulation), with the bytes of the fp8 copies it holds.
"""
import argparse
import contextlib

import torch

import moe_gemm
from moe_gemm.bench import timing
from moe_gemm.bench.layer import load_layer_configs, peak_gb


def layer_inputs(T: int, d: int, E: int, K: int) -> tuple[torch.Tensor, ...]:
    """``(hidden, ids, weights, grad_out)`` of ``T`` tokens, uniform routing; hidden and weights require grad."""
    hidden = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
    weights = torch.rand(T, K, device="cuda", requires_grad=True)
    return hidden, ids, weights, torch.randn(T, d, device="cuda", dtype=torch.bfloat16)


def measure(T: int, d: int, n: int, E: int, K: int, train: bool = False) -> dict[str, tuple[float, float, float]]:
    """``{"bf16": (fwd_ms, fwd_bwd_ms, peak_gb), "fp8": ...}`` at ``T`` tokens, uniform routing. Frozen experts
    (``MoEExpertsFP8``), with ``"transposes_gb"``: the fp8 weights' kept transposes; or with ``train`` every gradient,
    the weights' included (``MoEExpertsFP8Training`` on the bf16 experts' parameters), and ``"fp8 reused"``: the same
    inside one ``reuse_quantized_weights()`` block, its peak including the copies the block holds (``"reused_gb"``)."""
    bf16 = moe_gemm.MoEExperts(num_experts=E, hidden_size=d, intermediate_size=n, device="cuda",
                               dtype=torch.bfloat16).requires_grad_(train)  # fmt: skip
    fp8 = (moe_gemm.MoEExpertsFP8Training if train else moe_gemm.MoEExpertsFP8).from_experts(bf16)
    hidden, ids, weights, grad_out = layer_inputs(T, d, E, K)
    differentiable = (hidden, weights, bf16.gate_up_proj, bf16.down_proj) if train else (hidden, weights)
    times = {}
    runs = [("bf16", bf16, False), ("fp8", fp8, False)] + ([("fp8 reused", fp8, True)] if train else [])
    for name, experts, reused in runs:

        def forward(experts=experts):
            with torch.no_grad():
                return experts(hidden, ids, weights)

        def step(experts=experts):
            for tensor in differentiable:
                tensor.grad = None
            experts(hidden, ids, weights).backward(grad_out)

        allocated = torch.cuda.memory_allocated()
        # "fp8 reused": every step inside one reuse_quantized_weights() block, as the micro-batches of a long gradient
        # accumulation (the weights quantized at the warm-up's first step only).
        with moe_gemm.reuse_quantized_weights() if reused else contextlib.nullcontext():
            fwd_ms, step_ms = timing.bench_ms(forward), timing.bench_ms(step)
            times[name] = (fwd_ms, step_ms, peak_gb(step, differentiable, hidden.device))
            for tensor in differentiable:
                tensor.grad = None
            if reused:  # the copies the block holds, which the peak above, counted from them on, adds to
                times["reused_gb"] = (torch.cuda.memory_allocated() - allocated) / 1e9
                times[name] = (fwd_ms, step_ms, times[name][2] + times["reused_gb"])
        if name == "fp8" and not train:  # the first backward made the transposes, which stay
            times["transposes_gb"] = (torch.cuda.memory_allocated() - allocated) / 1e9
    return times


def quantize_rate(weight: torch.Tensor) -> str:
    """The time of ``quantize_fp8_weight`` on ``weight`` and on its transpose's view, with the bytes moved (the weight
    read, one byte per value written) over each time."""
    moved = weight.numel() * (weight.element_size() + 1)
    times = [timing.bench_ms(lambda w=w: moe_gemm.quantize_fp8_weight(w)) for w in (weight, weight.transpose(1, 2))]
    cells = [f"{name} {ms:.3f} ms ({moved / ms / 1e9:.2f} TB/s)" for name, ms in zip(("stored", "transposed"), times)]
    return ", ".join(cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384, 4096], help="T per config, in order")
    parser.add_argument("--train", action="store_true", help="the weights train too (module docstring)")
    args = parser.parse_args()
    configs = load_layer_configs()["configs"]
    print(f"# {moe_gemm.build_info()}; {torch.cuda.get_device_name()}")
    for name, tokens in zip(args.configs, args.tokens):
        config = configs[name] | {"T": tokens}
        times = measure(**config, train=args.train)
        flops = 6 * tokens * config["K"] * config["d"] * config["n"]
        step_flops = (3 if args.train else 2) * flops
        transposes, reused = times.pop("transposes_gb", None), times.pop("reused_gb", None)
        cells = [f"{impl} fwd {fwd:.3f} ms ({flops / fwd / 1e9:.0f} TFLOP/s), fwd+bwd {both:.3f} ms "
                 f"({step_flops / both / 1e9:.0f}), peak {peak:.2f} GB" for impl, (fwd, both, peak) in times.items()]  # fmt: skip
        speedups = ", ".join(f"{impl} {times['bf16'][0] / fwd:.2f}x / {times['bf16'][1] / both:.2f}x"
                             for impl, (fwd, both, _) in times.items() if impl != "bf16")  # fmt: skip
        kept = "" if transposes is None else f"; fp8 transposes kept {transposes:.2f} GB"
        kept += "" if reused is None else f"; fp8 copies held by reuse_quantized_weights {reused:.2f} GB"
        print(f"{name} T={tokens}: {'; '.join(cells)}; speedup over bf16 fwd / fwd+bwd: {speedups}{kept}")
        if args.train:
            weight = torch.randn(config["E"], 2 * config["n"], config["d"], device="cuda", dtype=torch.bfloat16)
            print(f"  quantize_fp8_weight of gate_up_proj {tuple(weight.shape)}: {quantize_rate(weight)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
