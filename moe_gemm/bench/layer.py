"""Benchmark of the whole experts layer and of the routing kernel: ``python -m moe_gemm.bench --layer``.

Experts: for each model of ``shapes.json`` and token count T, one transformers experts module (``Qwen3MoeExperts``,
SwiGLU, ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; every suite model runs with its shapes as this module)
is run with ``experts_implementation`` ``eager``, ``batched_mm`` and ``grouped_mm`` and, on the very same parameters,
by ``moe_gemm.experts_forward``. Each token picks ``top_k`` distinct experts (uniform), weights a softmax in the model
dtype. Timed: the forward, and forward + backward (gradients of the hidden states and of both weights). Before
timing, every output is compared with transformers' ``grouped_mm`` output (relative Frobenius error <= 1e-2).
Implementations whose memory estimate exceeds the free GPU memory (``batched_mm`` copies two expert weights per
(token, expert) pair) are skipped, and so are those that run out of memory: the table says which.

Routing: DeepSeek-V3's router (256 experts, 8 groups, top-4 groups, top-8, bias, renormalised, scaled by 2.5) on
float32 logits, ``torch.ops.moe_gemm.route`` (the fused kernel) against ``route_torch_ops`` (PyTorch ops), ids checked
equal. Times are medians with L2 flushed (``timing.bench_ms``).
"""

import argparse
import math
from collections.abc import Callable

import torch

import moe_gemm
from moe_gemm.bench import report
from moe_gemm.bench.suite import MAX_REL_ERROR
from moe_gemm.bench.timing import bench_ms, time_once_ms
from moe_gemm.routing import route_torch_ops

HF_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
IMPLEMENTATIONS = ("moe_gemm", *HF_IMPLEMENTATIONS)
MODES = ("fwd", "fwd+bwd")
ROUTING_TOKENS = (1, 8, 32, 128, 512, 2048, 4096)
# DeepSeek-V3's router, as moe_gemm.route arguments.
DEEPSEEK_V3_ROUTER = {"experts": 256, "top_k": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
# Fraction of the free GPU memory an implementation may be estimated to need before it is skipped.
MEMORY_HEADROOM = 0.85
# An eager call slower than this is timed once rather than by bench_ms (it loops over up to 256 experts).
EAGER_MAX_MS = 200.0

# ---------------------------------------------------------------------------------------------------------------
# Pure parts: memory estimates, table, summary.
# ---------------------------------------------------------------------------------------------------------------


def estimated_bytes(implementation: str, mode: str, model: dict, tokens: int, itemsize: int = 2) -> int:
    """Peak bytes an implementation allocates beyond the weights, roughly (activations at float32 width, to be safe).

    ``batched_mm`` gathers one ``gate_up`` and one ``down`` matrix per (token, expert) pair, and keeps both for the
    backward, where their gradients double that; the others hold a few activations of ``T * top_k`` rows, and the
    backward adds the weight gradients.
    """
    experts, hidden, inter, top_k = model["experts"], model["hidden"], model["moe_intermediate"], model["top_k"]
    pairs = tokens * top_k
    weight_bytes = experts * 3 * inter * hidden * itemsize
    activations = pairs * (2 * hidden + 4 * inter) * 4
    backward = mode == "fwd+bwd"
    if implementation == "batched_mm":
        gathered = pairs * 3 * inter * hidden * itemsize
        return gathered * (2 if backward else 1) + activations * (2 if backward else 1)
    return activations * (3 if backward else 1) + (weight_bytes if backward else 0)


TABLE = ("model", "tokens", "mode", "moe_gemm_ms", "eager_ms", "batched_mm_ms", "grouped_mm_ms", "speedup_grouped_mm",
         "speedup_best", "check")  # fmt: skip
ROUTING_TABLE = ("tokens", "kernel_ms", "torch_ms", "speedup", "check")


def add_speedups(row: dict) -> dict:
    """``speedup_grouped_mm`` = grouped_mm / moe_gemm, ``speedup_best`` = min(batched_mm, grouped_mm) / moe_gemm."""
    moe_gemm_ms = row.get("moe_gemm_ms")
    if moe_gemm_ms:
        if row.get("grouped_mm_ms"):
            row["speedup_grouped_mm"] = row["grouped_mm_ms"] / moe_gemm_ms
        others = [row[key] for key in ("batched_mm_ms", "grouped_mm_ms") if row.get(key)]
        if others:
            row["speedup_best"] = min(others) / moe_gemm_ms
    return row


def summarize_layer(rows: list[dict], routing_rows: list[dict]) -> dict:
    """Geometric means over the suite, per mode, of moe_gemm's speedup over grouped_mm at >= 256 tokens and over the
    faster of batched_mm and grouped_mm at <= 32 tokens; and the routing kernel's geometric-mean speedup."""
    summary = {}
    for mode in MODES:
        in_mode = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            "speedup_grouped_mm_tokens_ge_256": report.geomean(
                r.get("speedup_grouped_mm") for r in in_mode if r["tokens"] >= 256
            ),
            "speedup_best_tokens_le_32": report.geomean(r.get("speedup_best") for r in in_mode if r["tokens"] <= 32),
        }
    summary["routing_speedup"] = report.geomean(r.get("speedup") for r in routing_rows)
    return summary


def format_summary(summary: dict) -> str:
    lines = ["geometric means over the suite:"]
    for mode in MODES:
        stats = summary[mode]
        lines.append(
            f"  {mode:<8} moe_gemm vs grouped_mm at >= 256 tokens {stats['speedup_grouped_mm_tokens_ge_256']:5.2f}x, "
            f"vs the faster of batched_mm/grouped_mm at <= 32 tokens {stats['speedup_best_tokens_le_32']:5.2f}x"
        )
    lines.append(f"  routing kernel vs PyTorch ops (DeepSeek-V3 router): {summary['routing_speedup']:5.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Measurements (GPU in the benchmark; the CPU tests run them with a trivial timer on tiny shapes).
# ---------------------------------------------------------------------------------------------------------------


def make_experts_module(model: dict, device: torch.device | str, dtype: torch.dtype, generator=None) -> torch.nn.Module:
    """A transformers ``Qwen3MoeExperts`` with the model's shapes and random weights (scaled like trained ones)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        num_experts=model["experts"],
        hidden_size=model["hidden"],
        moe_intermediate_size=model["moe_intermediate"],
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    with torch.device("meta"):
        experts = Qwen3MoeExperts(config)
    # Cast on meta, then allocate: only the model-dtype weights ever exist on the device.
    experts = experts.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for parameter in experts.parameters():
            # Drawn in chunks of experts: a float32 copy of DeepSeek-V3's 22 GB of weights would not fit beside them.
            for chunk in parameter.split(8):
                chunk.copy_(torch.randn(chunk.shape, device=device, generator=generator).mul_(0.02))
    return experts


def routing_inputs(tokens: int, model: dict, device, dtype, generator=None) -> tuple[torch.Tensor, ...]:
    """``(hidden [T, H], top_k_index [T, k] distinct experts per token, top_k_weights [T, k])``."""
    scores = torch.rand(tokens, model["experts"], device=device, generator=generator)
    ids = scores.topk(model["top_k"], dim=-1).indices
    weights = torch.rand(tokens, model["top_k"], device=device, generator=generator).softmax(dim=-1).to(dtype)
    hidden = torch.randn(tokens, model["hidden"], device=device, generator=generator).to(dtype)
    return hidden, ids, weights


def layer_function(implementation: str, experts: torch.nn.Module) -> Callable:
    """``f(hidden, top_k_index, top_k_weights) -> [T, H]`` of one implementation, on ``experts``' parameters."""
    if implementation == "moe_gemm":
        return lambda hidden, ids, weights: moe_gemm.experts_forward(
            hidden, ids, weights, experts.gate_up_proj, experts.down_proj
        )

    def hf_forward(hidden, ids, weights):
        experts.config._experts_implementation = implementation
        return experts(hidden, ids, weights)

    return hf_forward


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref_norm = torch.linalg.vector_norm(ref.float()).item()
    return torch.linalg.vector_norm(out.float() - ref.float()).item() / max(ref_norm, 1e-30)


def _free_bytes(device: torch.device) -> float:
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return free


def measure_layer(
    name: str, model: dict, tokens: int, experts: torch.nn.Module, generator=None, timer: Callable = bench_ms
) -> list[dict]:
    """Check and time every implementation on one shape, forward and forward + backward: one row per mode."""
    device, dtype = experts.gate_up_proj.device, experts.gate_up_proj.dtype
    hidden, ids, weights = routing_inputs(tokens, model, device, dtype, generator)
    rows = []
    for mode in MODES:
        row = {"model": name, "tokens": tokens, "mode": mode, "notes": []}
        backward = mode == "fwd+bwd"
        for parameter in experts.parameters():
            parameter.requires_grad_(backward)
        inputs = (hidden.detach().requires_grad_(backward), ids, weights)
        grad_out = torch.randn_like(hidden) if backward else None
        reference = reference_name = None
        # grouped_mm first: it is the reference of the check.
        for implementation in ("grouped_mm", "moe_gemm", "eager", "batched_mm"):
            needed = estimated_bytes(implementation, mode, model, tokens, experts.gate_up_proj.element_size())
            if needed > MEMORY_HEADROOM * _free_bytes(device):
                row["notes"].append(f"{implementation} skipped: needs ~{needed / 1e9:.0f} GB")
                continue
            forward = layer_function(implementation, experts)
            if backward:
                differentiable = (inputs[0], experts.gate_up_proj, experts.down_proj)

                def run(forward=forward, inputs=inputs, differentiable=differentiable, grad_out=grad_out):
                    return torch.autograd.grad(forward(*inputs), differentiable, grad_out)
            else:

                def run(forward=forward, inputs=inputs):
                    with torch.no_grad():
                        return forward(*inputs)

            try:
                if not backward:
                    out = run()
                    if reference is None:
                        reference, reference_name = out, implementation
                    else:
                        error = _relative_error(out, reference)
                        row[f"{implementation}_rel_error"] = error
                        if not error <= MAX_REL_ERROR:  # NaN fails too
                            note = f"{implementation} differs from {reference_name}: rel. error {error:.2e}"
                            row["notes"].append(note)
                    del out
                if implementation == "eager" and time_once_ms(run, device) > EAGER_MAX_MS:
                    row["eager_ms"] = time_once_ms(run, device)
                else:
                    row[f"{implementation}_ms"] = timer(run)
            except torch.cuda.OutOfMemoryError:
                row["notes"].append(f"{implementation} ran out of memory")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["check"] = "FAIL" if any("differs" in note for note in row["notes"]) else "ok"
        row["problem"] = "; ".join(row["notes"]) or None
        rows.append(add_speedups(row))
    for parameter in experts.parameters():
        parameter.requires_grad_(False)
    return rows


def measure_routing(tokens: int, device, generator=None, timer: Callable = bench_ms) -> dict:
    """The fused routing op against ``route_torch_ops`` on DeepSeek-V3's router at ``tokens`` tokens."""
    spec = DEEPSEEK_V3_ROUTER
    logits = torch.randn(tokens, spec["experts"], device=device, generator=generator)
    bias = torch.randn(spec["experts"], device=device, generator=generator) / 10
    options = {
        "scoring": "sigmoid",
        "renormalize": True,
        "n_group": spec["n_group"],
        "topk_group": spec["topk_group"],
        "e_score_correction_bias": bias,
        "routed_scaling_factor": spec["routed_scaling_factor"],
    }
    op_args = (logits, spec["top_k"], *options.values())  # the dict is in the order of the op's arguments

    def kernel():
        return torch.ops.moe_gemm.route(*op_args)

    def torch_ops():
        return route_torch_ops(logits, spec["top_k"], **options)

    (weights, ids), (ref_weights, ref_ids) = kernel(), torch_ops()
    ok = torch.equal(ids, ref_ids) and torch.allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    row = {"tokens": tokens, "check": "ok" if ok else "FAIL", "kernel_ms": timer(kernel), "torch_ms": timer(torch_ops)}
    row["speedup"] = row["torch_ms"] / row["kernel_ms"]
    return row


def run(args: argparse.Namespace, suite: dict) -> int:
    """The ``--layer`` benchmark for the arguments of ``python -m moe_gemm.bench`` (models, tokens, dtype, seed, json);
    exit status 1 when a row fails its check."""
    import transformers

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    torch.manual_seed(args.seed)
    report.print_preamble(f"layer; transformers {transformers.__version__}, dtype {args.dtype}, seed {args.seed}, "
                          "routing uniform")  # fmt: skip

    def experts_cases():
        for name in args.models:
            model = suite["models"][name]
            experts = make_experts_module(model, "cuda", dtype, generator)
            for tokens in args.tokens:
                yield name, model, tokens, experts, generator
            del experts
            torch.cuda.empty_cache()

    rows = report.measure_table(TABLE, experts_cases(), len(args.models) * len(args.tokens), measure_layer)
    print("\nrouting, DeepSeek-V3 router (256 experts, 8 groups, top-4 groups, top-8), float32 logits")
    routing_cases = ((tokens, "cuda", generator) for tokens in ROUTING_TOKENS)
    routing_rows = report.measure_table(ROUTING_TABLE, routing_cases, len(ROUTING_TOKENS), measure_routing)
    summary = summarize_layer(rows, routing_rows)
    return report.finish(
        args, format_summary(summary), rows, also_checked=routing_rows, mode="layer",
        transformers=transformers.__version__, summary=summary, routing_rows=routing_rows,
    )  # fmt: skip
