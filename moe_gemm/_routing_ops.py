"""Registration of ``torch.ops.moe_gemm.route``: the fused routing kernel, its fallbacks, fake kernel and autograd.

``moe_gemm::route(router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias,
routed_scaling_factor) -> (weights float32 [T, k], ids int64 [T, k])`` computes ``moe_gemm.route``. Its CUDA kernel
(``csrc/moe_routing.cu``) is in ``moe_gemm._C``, whose ``csrc/moe_routing_torch.cpp`` defines the schema; when the
extension is absent (or was built without it) this module defines the same schema and serves CPU and CUDA tensors
with ``route_torch_ops``. Either way CPU tensors take ``route_torch_ops``.

Autograd: the weights are differentiable in the logits, the ids are not. The backward is written out below from the
ids and the logits, in the tensor ops of ``route_torch_ops``'s own backward, so both paths give the same gradients.
"""

import torch

# Loads moe_gemm._C first, whose library fragment defines the op with its CUDA kernel.
from moe_gemm import _ops  # noqa: F401

# Keep equal to the schema in csrc/moe_routing_torch.cpp.
ROUTE_SCHEMA = (
    "(Tensor router_logits, int top_k, str scoring, bool renormalize, int? n_group, int? topk_group, "
    "Tensor? e_score_correction_bias, float routed_scaling_factor) -> (Tensor, Tensor)"
)
# What the CUDA kernel takes (csrc/moe_routing.h); route() uses PyTorch ops beyond.
KERNEL_MAX_EXPERTS = 1024
KERNEL_MAX_TOP_K = 32
KERNEL_MAX_GROUPS = 32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _defined_by_extension() -> bool:
    try:
        torch.ops.moe_gemm.route  # noqa: B018  (the lookup raises when no library defined the op)
    except (AttributeError, RuntimeError):
        return False
    return True


ROUTING_KERNEL_BUILT = _defined_by_extension()


def routing_kernel_available() -> bool:
    """True when the CUDA kernel of ``moe_gemm::route`` is built and loaded."""
    return ROUTING_KERNEL_BUILT


def kernel_applies(router_logits: torch.Tensor, top_k: int, n_group: int | None) -> bool:
    """Whether ``route`` runs the fused CUDA kernel for these arguments (already checked by ``route``)."""
    return (
        ROUTING_KERNEL_BUILT
        and router_logits.is_cuda
        and router_logits.dtype in KERNEL_DTYPES
        and router_logits.shape[1] <= KERNEL_MAX_EXPERTS
        and top_k <= KERNEL_MAX_TOP_K
        and (n_group is None or n_group <= KERNEL_MAX_GROUPS)
    )


if not ROUTING_KERNEL_BUILT:
    torch.library.define("moe_gemm::route", ROUTE_SCHEMA)


def _route_eager(
    router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
):
    """The op in PyTorch tensor ops: ``route_torch_ops``."""
    # Imported here: routing.py imports this module.
    from moe_gemm.routing import route_torch_ops

    weights, ids = route_torch_ops(
        router_logits,
        top_k,
        scoring=scoring,
        renormalize=renormalize,
        n_group=n_group,
        topk_group=topk_group,
        e_score_correction_bias=e_score_correction_bias,
        routed_scaling_factor=routed_scaling_factor,
    )
    # Contiguous, like the CUDA kernel's outputs and the fake ones (the sorted ids are a slice).
    return weights.contiguous(), ids.contiguous()


torch.library.register_kernel("moe_gemm::route", ("cpu",) if ROUTING_KERNEL_BUILT else ("cpu", "cuda"), _route_eager)


@torch.library.register_fake("moe_gemm::route")
def _route_fake(
    router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
):
    shape = (router_logits.shape[0], top_k)
    return router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    router_logits, _, scoring, renormalize, _, _, _, routed_scaling_factor = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.scoring, ctx.renormalize, ctx.routed_scaling_factor = scoring, renormalize, routed_scaling_factor


def _normalize_backward(grad_normalized: torch.Tensor, values: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Gradient in ``values`` of ``values / (values.sum(-1) + epsilon)``, given that of the result."""
    denominator = values.sum(dim=-1, keepdim=True) + epsilon
    normalized = values / denominator
    return (grad_normalized - (grad_normalized * normalized).sum(dim=-1, keepdim=True)) / denominator


def route_backward(
    grad_weights: torch.Tensor,
    router_logits: torch.Tensor,
    ids: torch.Tensor,
    scoring: str,
    renormalize: bool,
    routed_scaling_factor: float,
) -> torch.Tensor:
    """Gradient in ``router_logits`` of the weights of ``route`` (the ids fixed), given that of the weights."""
    logits = torch.nan_to_num(router_logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    grad = grad_weights.float() * routed_scaling_factor
    if scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        chosen = probs.gather(1, ids)
        if renormalize:
            grad = _normalize_backward(grad, chosen, 0.0)
        # Softmax backward: p * (g - <g, p>), g being zero outside the chosen experts.
        grad_full = torch.zeros_like(probs).scatter(1, ids, grad)
        grad_logits = probs * (grad_full - (grad * chosen).sum(dim=-1, keepdim=True))
    else:
        chosen_logits = logits.gather(1, ids)
        if scoring == "softmax_topk":
            weights = torch.softmax(chosen_logits, dim=-1)
            grad_chosen = weights * (grad - (grad * weights).sum(dim=-1, keepdim=True))
        else:
            scores = torch.sigmoid(chosen_logits)
            if renormalize:
                grad = _normalize_backward(grad, scores, 1e-20)
            grad_chosen = grad * scores * (1 - scores)
        grad_logits = torch.zeros_like(logits).scatter(1, ids, grad_chosen)
    # nan_to_num passes gradients of finite logits only.
    grad_logits = torch.where(torch.isfinite(router_logits), grad_logits, 0)
    return grad_logits.to(router_logits.dtype)


def _backward(ctx, grad_weights, _grad_ids):
    router_logits, ids = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = route_backward(
            grad_weights, router_logits, ids, ctx.scoring, ctx.renormalize, ctx.routed_scaling_factor
        )
    return grad_logits, None, None, None, None, None, None, None


torch.library.register_autograd("moe_gemm::route", _backward, setup_context=_setup_context)
