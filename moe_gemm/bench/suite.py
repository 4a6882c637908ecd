"""What the benchmark measures and the bounds it measures against: the model suite (``moe_gemm/shapes.json``),
routed row counts, the FLOPs and bytes of a GEMM, the ceilings of the device and the floor they give.

For T tokens routed to ``top_k`` distinct experts each, GEMM 'up' (gate and up fused) is ``[T*top_k, hidden] x
[E, 2*moe_intermediate, hidden]^T`` and GEMM 'down' is ``[T*top_k, moe_intermediate] x [E, hidden,
moe_intermediate]^T``. The floor of a GEMM is ``max(bytes / bandwidth, FLOPs / peak)``, bytes counting the weights of
the experts that got rows, the input rows and the output rows once each.
"""

import argparse
import json
import os
from collections.abc import Iterator

import torch

from moe_gemm.bench.timing import bench_ms

# Beside the package's modules rather than in this package: the GPU tests read it too, and never import the benchmark.
SHAPES_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes.json")
GEMMS = ("up", "down")
QUICK_TOKENS = (32, 4096)
# Expert popularity of routing 'skewed': p(expert of rank r) ~ 1 / r**ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.0
# Relative Frobenius error against the float32 reference above which a shape fails its check.
MAX_REL_ERROR = 1e-2
# Random weights are scaled like trained ones, so that bf16 outputs stay far from overflow.
WEIGHT_SCALE = 0.02


def load_suite(path: str = SHAPES_PATH) -> dict:
    """The model suite: ``{"models": {name: {experts, hidden, moe_intermediate, top_k}}, "tokens": [...], ...}``."""
    with open(path) as suite_file:
        return json.load(suite_file)


def gemm_shape(model: dict, gemm: str) -> tuple[int, int]:
    """``(N, K)`` of the expert weight ``[E, N, K]`` of GEMM 'up' (gate and up fused) or 'down'."""
    hidden, intermediate = model["hidden"], model["moe_intermediate"]
    return (2 * intermediate, hidden) if gemm == "up" else (hidden, intermediate)


def routing_counts(
    tokens: int, num_experts: int, top_k: int, routing: str = "uniform", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rows per expert (int64 ``[E]``, on CPU) when each token picks ``top_k`` distinct experts.

    'uniform': the top-k of uniform random scores, balanced on average. 'skewed': experts drawn without replacement
    with Zipf-like popularity (expert ranks in random order), so a few hot experts get most tokens.
    """
    if routing == "uniform":
        picks = torch.rand(tokens, num_experts, generator=generator).topk(top_k, dim=-1).indices
    elif routing == "skewed":
        ranks = torch.randperm(num_experts, generator=generator) + 1
        popularity = ranks.double() ** -ZIPF_EXPONENT
        picks = torch.multinomial(popularity.expand(tokens, num_experts), top_k, generator=generator)
    else:
        raise ValueError(f"routing: expected 'uniform' or 'skewed', got {routing!r}")
    return torch.bincount(picks.flatten(), minlength=num_experts)


def gemm_bytes(m: int, n: int, k: int, active_experts: int, itemsize: int = 2) -> int:
    """Bytes moved at least once: the weights of the experts with rows, the input rows and the output rows."""
    return (active_experts * n * k + m * k + m * n) * itemsize


def floor_ms(flops: float, num_bytes: float, peak_tflops: float, bandwidth_tbs: float) -> float:
    """max(bytes / bandwidth, FLOPs / peak) in ms (1 TB/s moves 1e9 bytes per ms, 1 TFLOP/s does 1e9 FLOPs per ms)."""
    return max(num_bytes / (bandwidth_tbs * 1e9), flops / (peak_tflops * 1e9))


def gemm_cost(counts: torch.Tensor, n: int, k: int, itemsize: int, ceilings: tuple[float, float]) -> dict:
    """The row fields every GEMM table shares: ``M``, ``active`` (experts with rows), ``flops``, ``bytes`` and
    ``floor_ms`` of a GEMM whose rows per expert are ``counts`` (on CPU)."""
    host_counts = counts.tolist()
    m = sum(host_counts)
    active = sum(1 for count in host_counts if count > 0)
    flops = 2.0 * m * n * k
    num_bytes = gemm_bytes(m, n, k, active, itemsize)
    floor = floor_ms(flops, num_bytes, *ceilings)
    return {"M": m, "active": active, "flops": flops, "bytes": num_bytes, "floor_ms": floor}


def measure_ceilings() -> tuple[float, float]:
    """(dense bf16 8192^3 matmul TFLOP/s, device-to-device copy TB/s counting bytes read + written)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak_tflops = 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth_tbs = 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e9
    return peak_tflops, bandwidth_tbs


def random_weight(model: dict, gemm: str, dtype: torch.dtype, device: torch.device | str = "cuda") -> torch.Tensor:
    """A random expert weight ``[E, N, K]`` of one GEMM of ``model``."""
    shape = (model["experts"], *gemm_shape(model, gemm))
    return torch.randn(shape, device=device, dtype=dtype).mul_(WEIGHT_SCALE)


def gemm_cases(
    suite: dict, args: argparse.Namespace, tokens: list[int], weight_per_shape: bool = False
) -> Iterator[tuple[str, int, str, torch.Tensor, torch.Tensor]]:
    """``(model name, tokens, gemm, weight [E, N, K] on the GPU, rows per expert on CPU)`` of every GEMM that the
    arguments of ``python -m moe_gemm.bench`` ask for (``args.models``, ``args.gemms``, ``args.routing``,
    ``args.dtype``), model by model; the routing is drawn from ``args.seed`` in this order whatever is measured.

    A model's weights are made once for all its token counts, or anew for each shape with ``weight_per_shape`` (the
    backward keeps gradients as large as the weight alive, which DeepSeek-V3's two weights beside would not leave room
    for); the cache is emptied after each model.
    """
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    for name in args.models:
        model = suite["models"][name]
        weights = {} if weight_per_shape else {gemm: random_weight(model, gemm, dtype) for gemm in args.gemms}
        for count in tokens:
            counts = routing_counts(count, model["experts"], model["top_k"], args.routing, generator)
            for gemm in args.gemms:
                weight = weights[gemm] if gemm in weights else random_weight(model, gemm, dtype)
                yield name, count, gemm, weight, counts
                del weight
                if weight_per_shape:
                    torch.cuda.empty_cache()
        del weights
        torch.cuda.empty_cache()
