"""``python -m moe_gemm.demo``: a small MoE layer on CPU.

It runs the expert layer of qwen3-30b-a3b scaled down (64 tokens, top-8 of 16 experts, hidden 256,
intermediate 128, bfloat16) through ``grouped_forward`` on the pure-PyTorch path: tokens sorted by expert, the fused
gate/up GEMM, SwiGLU, the down GEMM, and the weighted sum back per token. Each GEMM is checked against the float64
reference and the whole layer against a float64 per-token loop that never groups rows.
"""

import sys
import time

import torch
import torch.nn.functional as F

from moe_gemm import _ops, grouped_forward
from moe_gemm.reference import grouped_mm_reference

TOKENS, EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 64, 16, 8, 256, 128
DTYPE = torch.bfloat16
MAX_REL_ERROR = 1e-2


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref)).item()


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def timed(fn, *args):
    """(fn(*args), wall time in ms)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1e3


def moe_layer_per_token(x, router_probs, experts, w_up, w_down) -> torch.Tensor:
    """Float64 reference of the layer, one token and one expert at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for prob, expert in zip(router_probs[token].tolist(), experts[token].tolist()):
            hidden = swiglu(x[token].double() @ w_up[expert].double().t())
            out[token] += prob * (hidden @ w_down[expert].double().t())
    return out


def run_cpu_demo(reason: str) -> int:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=generator).to(DTYPE)
    w_router = torch.randn(HIDDEN, EXPERTS, generator=generator) / HIDDEN**0.5
    w_up = (torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5).to(DTYPE)
    w_down = (torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE**0.5).to(DTYPE)

    # Routing: softmax top-k, probabilities renormalised over the chosen experts.
    router_probs, experts = torch.softmax(x.float() @ w_router, dim=-1).topk(TOP_K, dim=-1)
    router_probs = router_probs / router_probs.sum(dim=-1, keepdim=True)
    # Sort the (token, expert) pairs by expert: the grouped GEMMs need each expert's rows contiguous.
    order = experts.flatten().argsort(stable=True)
    token_of_row = order // TOP_K
    m_sizes = torch.bincount(experts.flatten(), minlength=EXPERTS)

    x_sorted = x[token_of_row]
    # The first call of a custom op imports torch._dynamo (about a second): keep it out of the timings.
    grouped_forward(x_sorted, w_up, m_sizes)
    gate_up, up_ms = timed(grouped_forward, x_sorted, w_up, m_sizes)
    hidden = swiglu(gate_up)
    down, down_ms = timed(grouped_forward, hidden, w_down, m_sizes)
    weighted = down.float() * router_probs.flatten()[order, None]
    layer = torch.zeros(TOKENS, HIDDEN).index_add_(0, token_of_row, weighted).to(DTYPE)
    rows = [
        ("up", gate_up, grouped_mm_reference(x_sorted, w_up, m_sizes), up_ms),
        ("down", down, grouped_mm_reference(hidden, w_down, m_sizes), down_ms),
        ("layer", layer, moe_layer_per_token(x, router_probs, experts, w_up, w_down), None),
    ]

    print(
        f"moe_gemm demo, pure-PyTorch CPU path: qwen3-30b-a3b scaled down to {TOKENS} tokens, top-{TOP_K} of "
        f"{EXPERTS} experts, hidden {HIDDEN}, intermediate {INTERMEDIATE}, {str(DTYPE).removeprefix('torch.')}"
    )
    print(f"{'step':<6} {'rows':>5} {'cols':>5} {'experts hit':>11} {'rel. error vs float64':>21} {'ms':>7}  check")
    failed = False
    hit = int((m_sizes > 0).sum())
    for name, out, ref, ms in rows:
        error = rel_error(out, ref)
        ok = bool(torch.isfinite(out).all()) and error <= MAX_REL_ERROR
        failed |= not ok
        ms_cell = "-" if ms is None else f"{ms:.2f}"
        print(
            f"{name:<6} {out.shape[0]:>5} {out.shape[1]:>5} {hit:>11} {error:>21.2e} {ms_cell:>7}  "
            f"{'ok' if ok else 'FAIL'}"
        )
    print(f"CUDA path not available: {reason}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    reason = _ops.kernels_unavailable_reason()
    return run_cpu_demo(reason or "the kernels are available: `python -m moe_gemm.bench` times them")


if __name__ == "__main__":
    sys.exit(main())
