"""Where the fused layer's time goes, and how far each part is from its floor (GPU; for choosing the next kernel):
torch.profiler over forward and backward steps of ``moe_gemm.experts_forward`` on the layer configs
(bench/layer_configs.json, SwiGLU, bf16, random routing), the device time per kernel, forward and backward apart,
biggest first, with each phase's GEMM kernels (``Sm90MoeGemmKernel``, the weight gradient's ``Sm90MoeWgrad``) and
the rest (copies, the activation and its backward, dispatch, combine, the sums of each token's rows) against their
floors.

The floors, from the dense bf16 matmul rate and the copy bandwidth measured at the start of the run (as the GEMM
benchmark's): a GEMM's is max(FLOPs / rate, bytes / bandwidth) with every operand moved once (the experts' weights,
the input rows, the output rows; a gathered operand as its source's T rows), the other kernels' their bytes read and
written once: the activation (gate_up in, activated out) and combine (P rows in, T out) forward; the activation's
backward (grad_activated and gate_up in, grad_gate_up and weight * activated out) and the token sum of the input
gradient backward. With P = T * K rows, d the hidden size and n the intermediate size.

``--clocks`` adds, for the experts' forward, its kernels' time in the profiler right after a rest and again after the
benchmark's timing of it (``layer_timer``), that timing itself, and the SM clock (``torch.cuda.clock_rate``) after
each profile: the benchmark's figures are those of a GPU that has lowered its clocks.

``--router`` adds the kernels of the benchmark's router (``F.linear`` in bf16, as ``--router-dtype model``) and
routing (``moe_gemm.route``, softmax top-k renormalised) per forward, which the benchmark's layer times too.

    python scripts/layer_profile.py [--configs sonic-1 sonic-4] [--steps 3] [--top 12] [--router] [--clocks]
"""
import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

import moe_gemm
from moe_gemm.bench.layer import layer_timer, load_layer_configs, router_logits
from moe_gemm.bench.suite import floor_ms, measure_ceilings

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


def phase_floors(
    T: int, d: int, n: int, E: int, K: int, ceilings: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """{phase: (the GEMMs' floor ms, the other kernels' floor ms)} of one forward and one backward, 16-bit data."""
    P, rows_e = T * K, min(E, T * K)  # rows; experts with rows (random routing reaches them all)
    bandwidth = ceilings[1]
    up_w, down_w = rows_e * 2 * n * d * 2, rows_e * d * n * 2

    def gemm(flops, *operands):
        return floor_ms(flops, sum(operands), *ceilings)

    up, down = 2 * P * d * 2 * n, 2 * P * n * d
    forward_gemms = gemm(up, up_w, T * d * 2, P * 2 * n * 2) + gemm(down, down_w, P * n * 2, P * d * 2)
    backward_gemms = (
        gemm(down, down_w, T * d * 2, P * n * 2)  # down input gradient: g's rows gathered
        + gemm(down, T * d * 2, P * n * 2, down_w)  # down weight gradient
        + gemm(up, up_w, P * 2 * n * 2, P * d * 2)  # up input gradient
        + gemm(up, T * d * 2, P * 2 * n * 2, up_w)  # up weight gradient: hidden's rows gathered
    )
    forward_rest = (P * 3 * n + P * d + T * d) * 2 / (bandwidth * 1e9)
    backward_rest = (P * 6 * n + P * d + T * d) * 2 / (bandwidth * 1e9)
    return {"forward": (forward_gemms, forward_rest), "backward": (backward_gemms, backward_rest)}


def short(name: str, width: int = 90) -> str:
    name = name.replace("cutlass::device_kernel<", "").replace("moe_gemm::", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+",
        default=["sonic-1", "sonic-2", "sonic-3", "sonic-4", "qwen3-30b-a3b", "deepseek-v3"],
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--router", action="store_true")
    parser.add_argument("--clocks", action="store_true")
    args = parser.parse_args()
    configs = load_layer_configs()["configs"]
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    print(f"ceilings: dense bf16 matmul {ceilings[0]:.0f} TFLOP/s, copy {ceilings[1]:.2f} TB/s")
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
        floors = phase_floors(T, d, n, E, K, ceilings)
        for phase, times in (("forward", forward_times), ("backward", backward_times)):
            times = {k: v for k, v in times.items() if v > 1e-4}
            total = sum(times.values())
            gemm = sum(v for k, v in times.items() if any(g in k for g in GEMM_KERNEL_NAMES))
            flops = (6 if phase == "forward" else 12) * T * K * d * n
            gemm_floor, rest_floor = floors[phase]
            print(f"  {phase}: {total:.3f} ms of kernels ({flops / total / 1e9:.0f} TFLOP/s over them), GEMMs "
                  f"{gemm:.3f} ms ({100 * gemm / max(total, 1e-9):.0f}%); floors: GEMMs {gemm_floor:.3f} ms "
                  f"({gemm / gemm_floor:.2f}x), the rest {rest_floor:.3f} ms ({(total - gemm) / rest_floor:.2f}x), "
                  f"the phase {flops / (gemm_floor + rest_floor) / 1e9:.0f} TFLOP/s at its floor")
            for kernel, ms in sorted(times.items(), key=lambda item: -item[1])[: args.top]:
                print(f"    {ms:8.3f} ms {100 * ms / max(total, 1e-9):5.1f}%  {short(kernel)}")
        if args.clocks:
            forward()
            torch.cuda.synchronize()
            time.sleep(2)  # a rested GPU first
            rested, rested_clock = sum(kernel_times(forward, args.steps).values()), torch.cuda.clock_rate()
            timed = layer_timer(forward)
            busy, busy_clock = sum(kernel_times(forward, args.steps).values()), torch.cuda.clock_rate()
            print(f"  clocks: forward kernels {rested:.3f} ms rested ({rested_clock} MHz), timed as the benchmark "
                  f"times it {timed:.3f} ms, kernels right after {busy:.3f} ms ({busy_clock} MHz)")
        if args.router:
            router = torch.randn(E, d, **options) * 0.02

            def route():
                return moe_gemm.route(router_logits(hidden, router, "model"), K, scoring="softmax", renormalize=True)

            router_times = kernel_times(route, args.steps)
            print(f"  router and routing: {sum(router_times.values()):.3f} ms of kernels per forward")
        del hidden, gate_up, down, grad_out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
