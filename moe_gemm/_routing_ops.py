"""Registration of ``torch.ops.moe_gemm.route``: the fused routing kernel, its fallbacks, fake kernel and autograd.

``moe_gemm::route(router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias,
routed_scaling_factor) -> (weights float32 [T, k], ids int64 [T, k])`` computes ``moe_gemm.route``; this module
defines it. On CUDA, where ``moe_gemm._C`` has the fused kernel (``csrc/moe_routing.cu``, bound as
``moe_gemm::_route_kernel`` by ``csrc/moe_routing_torch.cpp``), the op checks every argument here, raising
``RuntimeError`` for what the kernel does not take, and launches it; otherwise (and always on CPU) it runs
``route_torch_ops``. The checks are in Python on purpose: an error thrown from inside that kernel's binding crashed
the process on the H100 (a segfault while unwinding, not diagnosed yet), so the binding is only ever handed
arguments it accepts.

Autograd: the weights are differentiable in the logits, the ids are not. The backward is written out below from the
ids and the logits, in the tensor ops of ``route_torch_ops``'s own backward, so both paths give the same gradients.
"""

import torch

# Loads moe_gemm._C first, whose library fragment defines the kernel's op.
from moe_gemm import _ops  # noqa: F401

ROUTE_SCHEMA = (
    "(Tensor router_logits, int top_k, str scoring, bool renormalize, int? n_group, int? topk_group, "
    "Tensor? e_score_correction_bias, float routed_scaling_factor) -> (Tensor, Tensor)"
)
# What the CUDA kernel takes (csrc/moe_routing.h); route() uses PyTorch ops beyond.
KERNEL_MAX_EXPERTS = 1024
KERNEL_MAX_TOP_K = 32
KERNEL_MAX_GROUPS = 32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


SCORING_CODES = {"softmax": 0, "softmax_topk": 1, "sigmoid": 2}  # as csrc/moe_routing_torch.cpp reads them


def _defined_by_extension() -> bool:
    try:
        torch.ops.moe_gemm._route_kernel  # noqa: B018  (the lookup raises when no library defined the op)
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


torch.library.define("moe_gemm::route", ROUTE_SCHEMA)


def _kernel_argument_problem(
    router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias
) -> str | None:
    """What the CUDA kernel cannot take in these arguments, or None."""
    if router_logits.dim() != 2:
        return f"router_logits must be [T, E], got {tuple(router_logits.shape)}"
    if router_logits.dtype not in KERNEL_DTYPES:
        return f"the CUDA kernel takes float32, bfloat16 or float16 logits, got {router_logits.dtype}"
    num_experts = router_logits.shape[1]
    if num_experts > KERNEL_MAX_EXPERTS or top_k > KERNEL_MAX_TOP_K:
        return (
            f"the CUDA kernel takes up to {KERNEL_MAX_EXPERTS} experts and top_k up to {KERNEL_MAX_TOP_K}, got "
            f"E = {num_experts}, top_k = {top_k} (moe_gemm.route falls back to PyTorch ops there)"
        )
    if not 1 <= top_k <= num_experts:
        return f"top_k must be in [1, {num_experts}], got {top_k}"
    if scoring not in SCORING_CODES:
        return f"scoring must be one of {tuple(SCORING_CODES)}, got {scoring!r}"
    if (n_group is None) != (topk_group is None):
        return "n_group and topk_group go together"
    if scoring != "sigmoid" and (n_group is not None or e_score_correction_bias is not None):
        return "n_group, topk_group and e_score_correction_bias apply to scoring='sigmoid' only"
    if n_group is not None:
        if not 1 <= n_group <= KERNEL_MAX_GROUPS or num_experts % n_group != 0:
            return f"the CUDA kernel takes n_group dividing E = {num_experts}, at most {KERNEL_MAX_GROUPS}, got {n_group}"
        if not 1 <= topk_group <= n_group:
            return f"topk_group must be in [1, n_group = {n_group}], got {topk_group}"
    bias = e_score_correction_bias
    if bias is not None and (tuple(bias.shape) != (num_experts,) or bias.device != router_logits.device):
        return f"e_score_correction_bias must be [{num_experts}] on the logits' device, got {tuple(bias.shape)}"
    return None


def _route_cuda(
    router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
):
    """The fused kernel, after checking everything its binding would."""
    problem = _kernel_argument_problem(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias)
    if problem is not None:
        raise RuntimeError(f"moe_gemm.route: {problem}")
    return torch.ops.moe_gemm._route_kernel(
        router_logits,
        top_k,
        SCORING_CODES[scoring],
        renormalize,
        n_group or 0,
        topk_group or 0,
        e_score_correction_bias,
        routed_scaling_factor,
    )


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


torch.library.register_kernel("moe_gemm::route", "cpu", _route_eager)
torch.library.register_kernel("moe_gemm::route", "cuda", _route_cuda if ROUTING_KERNEL_BUILT else _route_eager)


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
