"""Where the fused layer's time goes (GPU; for choosing the next kernel): torch.profiler over forward and backward
steps of ``moe_gemm.experts_forward`` on the layer configs (bench/layer_configs.json, SwiGLU, bf16, random
routing), the device time per kernel, forward and backward apart, biggest first, with each phase's share in the
GEMM kernels (``Sm90MoeGemmKernel``, the weight gradient's ``Sm90MoeWgrad``) against the rest (copies, the
activation and its backward, dispatch, combine, the sums of each token's rows).

    python scripts/layer_profile.py [--configs sonic-1 sonic-4] [--steps 3] [--top 12]
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import moe_gemm
from moe_gemm.bench.layer import load_layer_configs

GEMM_KERNEL_NAMES = ("Sm90MoeGemmKernel", "Sm90MoeWgrad")


def kernel_times(fn, steps: int) -> dict[str, float]:
    """{kernel name: device ms per call} of ``steps`` calls of ``fn``. (By kernel rather than by record_function
    range: the backward's kernels are launched from autograd's device thread, outside the caller's ranges.)"""
    fn()  # warm-up: plans, allocator
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    times = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time_total / 1e3 / steps
    return times


def short(name: str, width: int = 90) -> str:
    name = name.replace("cutlass::device_kernel<", "").replace("moe_gemm::", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["sonic-1", "sonic-3", "sonic-4", "qwen3-30b-a3b"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    configs = load_layer_configs()["configs"]
    torch.manual_seed(0)
    for name in args.configs:
        c = configs[name]
        T, d, n, E, K = c["T"], c["d"], c["n"], c["E"], c["K"]
        options = {"device": "cuda", "dtype": torch.bfloat16}
        hidden = torch.randn(T, d, **options, requires_grad=True)
        gate_up = (torch.randn(E, 2 * n, d, **options) * 0.02).requires_grad_()
        down = (torch.randn(E, d, n, **options) * 0.02).requires_grad_()
        ids = torch.rand(T, E, device="cuda").topk(K, dim=1).indices
        weights = torch.rand(T, K, device="cuda").softmax(dim=1)
        grad_out = torch.randn(T, d, **options)

        def forward():
            return moe_gemm.experts_forward(hidden, ids, weights, gate_up, down)

        def forward_backward():
            hidden.grad = gate_up.grad = down.grad = None  # no accumulation kernels after the first step
            forward().backward(grad_out)

        forward_times = kernel_times(forward, args.steps)
        step_times = kernel_times(forward_backward, args.steps)
        # The backward: the step's kernels less the forward's, by name.
        backward_times = {k: v - forward_times.get(k, 0.0) for k, v in step_times.items()}
        print(f"\n{name}: T={T} d={d} n={n} E={E} K={K}, device ms per step (mean of {args.steps})")
        for phase, times in (("forward", forward_times), ("backward", backward_times)):
            times = {k: v for k, v in times.items() if v > 1e-4}
            total = sum(times.values())
            gemm = sum(v for k, v in times.items() if any(g in k for g in GEMM_KERNEL_NAMES))
            flops = (6 if phase == "forward" else 12) * T * K * d * n
            print(f"  {phase}: {total:.3f} ms of kernels ({flops / total / 1e9:.0f} TFLOP/s over them), GEMMs "
                  f"{gemm:.3f} ms ({100 * gemm / max(total, 1e-9):.0f}%)")
            for kernel, ms in sorted(times.items(), key=lambda item: -item[1])[: args.top]:
                print(f"    {ms:8.3f} ms {100 * ms / max(total, 1e-9):5.1f}%  {short(kernel)}")
        del hidden, gate_up, down, grad_out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
