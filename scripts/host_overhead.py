"""Host time per call of ``grouped_forward`` and ``experts_forward``, forward and forward + backward.

At decode sizes the GPU work of an MoE layer is a few microseconds, so a call costs what the host spends on it:
Python checks, small torch ops, autograd bookkeeping. This script measures that::

    python scripts/host_overhead.py                      # CUDA when available, else CPU
    python scripts/host_overhead.py --device cpu --tokens 1 8 32 --experts 8 128
    python scripts/host_overhead.py --profile            # also the number of dispatched ops per call

Each case runs ``--calls`` calls back to back without synchronizing, then synchronizes once; the time per call is
the median over ``--rounds`` such loops. While the GPU keeps up (small shapes), that is the host time.

On CPU the pure-PyTorch kernels of the ops are per-expert Python loops that read the sizes on the host, which says
nothing about the host time around a CUDA kernel; by default (``--gemm stub``) they are replaced, for this process
only, by stand-ins that only allocate their output, so what is timed is everything but the GEMMs. ``--gemm real``
keeps them. Rows:

- ``grouped_mm op``: ``torch.ops.moe_gemm.grouped_mm`` called directly, the floor of one GEMM call.
- ``grouped_forward``: the public wrapper (validation + op); ``fwd+bwd`` takes the gradients of ``x`` and ``weight``.
- ``torch._grouped_mm``: the same GEMM through PyTorch's op, for comparison (CUDA only; skipped where unsupported).
- ``experts_forward``: dispatch, gate/up GEMM, SwiGLU, down GEMM, combine; ``fwd`` with gradients wanted later,
  ``fwd, no_grad`` for inference, ``fwd+bwd`` takes the gradients of the hidden states, the routing weights and both
  expert weights.
"""

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

# Run as a file from a checkout, the package next to scripts/ is the one measured (installed or not).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_gemm


def install_gemm_stubs() -> None:
    """Replace the CPU kernels of the GEMM ops by ones that only allocate their outputs (zeros, so nothing
    downstream computes on garbage; the weight gradient uninitialised, it is large and only returned)."""

    def grouped_mm_stub(x, weight, m_sizes, weight_transposed=False):
        n = weight.shape[2] if weight_transposed else weight.shape[1]
        return x.new_zeros(x.shape[0], n)

    def grouped_mm_wgrad_stub(x, grad_y, m_sizes, weight_transposed=False):
        e, n, k = m_sizes.shape[0], grad_y.shape[1], x.shape[1]
        return x.new_empty((e, k, n) if weight_transposed else (e, n, k))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        torch.library.register_kernel("moe_gemm::grouped_mm", "cpu", grouped_mm_stub)
        torch.library.register_kernel("moe_gemm::grouped_mm_wgrad", "cpu", grouped_mm_wgrad_stub)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call_us(fn: Callable[[], object], device: torch.device, calls: int, rounds: int) -> float:
    """Median over ``rounds`` of (time of ``calls`` unsynchronized calls + one sync) / ``calls``, in microseconds."""
    for _ in range(max(3, calls // 10)):
        fn()
    synchronize(device)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def ops_per_call(fn: Callable[[], object]) -> int:
    """Operator events (aten, moe_gemm, autograd nodes included) the profiler records in one call."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return len(prof.events())


def _no_grad(fn: Callable[[], object]) -> object:
    with torch.no_grad():
        return fn()


def make_cases(tokens: int, experts: int, args, device: torch.device) -> dict[str, Callable[[], object]]:
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    h, i, top_k = args.hidden, args.inter, min(args.top_k, experts)

    def param(*shape, scale=0.05):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype).requires_grad_()

    # grouped_forward on the gate/up GEMM's shapes: M = T * top_k rows, spread over the experts.
    rows = tokens * top_k
    x = param(rows, h, scale=1.0)
    weight = param(experts, 2 * i, h)
    m_sizes = torch.bincount(torch.randint(experts, (rows,), generator=generator), minlength=experts).to(device)
    grad_y = torch.randn(rows, 2 * i, generator=generator).to(device, dtype)
    weight_kn = weight.detach().transpose(-1, -2).contiguous().requires_grad_()
    offs = m_sizes.cumsum(0).to(torch.int32)

    hidden = param(tokens, h, scale=1.0)
    gate_up_proj, down_proj = weight, param(experts, h, i)
    ids = torch.rand(tokens, experts, generator=generator).argsort(dim=1)[:, :top_k].to(device)
    routing = torch.softmax(torch.randn(tokens, top_k, generator=generator), dim=-1).to(device, dtype).requires_grad_()
    grad_out = torch.randn(tokens, h, generator=generator).to(device, dtype)

    def experts_fwd():
        return moe_gemm.experts_forward(hidden, ids, routing, gate_up_proj, down_proj)

    cases = {
        "grouped_mm op fwd": lambda: torch.ops.moe_gemm.grouped_mm(x.detach(), weight.detach(), m_sizes, False),
        "grouped_forward fwd": lambda: moe_gemm.grouped_forward(x, weight, m_sizes),
        "grouped_forward fwd+bwd": lambda: torch.autograd.grad(
            moe_gemm.grouped_forward(x, weight, m_sizes), (x, weight), grad_y
        ),
        "torch._grouped_mm fwd": lambda: torch._grouped_mm(x, weight_kn, offs=offs),
        "torch._grouped_mm fwd+bwd": lambda: torch.autograd.grad(
            torch._grouped_mm(x, weight_kn, offs=offs), (x, weight_kn), grad_y
        ),
        "experts_forward fwd": experts_fwd,
        "experts_forward fwd, no_grad": lambda: _no_grad(experts_fwd),
        "experts_forward fwd+bwd": lambda: torch.autograd.grad(
            experts_fwd(), (hidden, routing, gate_up_proj, down_proj), grad_out
        ),
    }
    if device.type == "cpu":
        # On CPU torch._grouped_mm is a per-expert loop: it times the loop, not what it costs around a CUDA launch.
        cases = {name: fn for name, fn in cases.items() if not name.startswith("torch._grouped_mm")}
    runnable = {}
    for name, fn in cases.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError) as error:  # torch._grouped_mm is not everywhere
            print(f"# skipped {name}: {str(error).splitlines()[0][:100]}")
            continue
        runnable[name] = fn
    return runnable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--gemm", choices=("stub", "real"), default="stub", help="CPU only: see the module docstring")
    parser.add_argument("--profile", action="store_true", help="also count the profiler's op events per call")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(1) if device.type == "cpu" else None  # steadier numbers; the ops are tiny
    if device.type == "cpu" and args.gemm == "stub":
        install_gemm_stubs()
    print(
        f"# {moe_gemm.build_info()}; device {device}, dtype {args.dtype}, H={args.hidden}, I={args.inter}, "
        f"top_k={args.top_k}, gemm={'cuda kernel' if device.type == 'cuda' else args.gemm}"
    )
    print(f"{'case':<28} {'T':>4} {'E':>4} {'us/call':>9}" + (f" {'ops':>5}" if args.profile else ""))
    for experts in args.experts:
        for tokens in args.tokens:
            for name, fn in make_cases(tokens, experts, args, device).items():
                us = time_per_call_us(fn, device, args.calls, args.rounds)
                ops = f" {ops_per_call(fn):>5}" if args.profile else ""
                print(f"{name:<28} {tokens:>4} {experts:>4} {us:>9.1f}{ops}", flush=True)


if __name__ == "__main__":
    main()
