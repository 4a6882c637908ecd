"""``fuse_experts(model)``: experts stored as an ``nn.ModuleList`` of MLPs become stacked 3-D weights run by moe_gemm.

Older Hugging Face MoE models (and many custom ones) keep one MLP module per expert and loop over the experts in the
MoE block's forward. ``fuse_experts`` finds every module whose ``experts`` attribute is such a list, stacks the
experts' weights into a ``MoEExperts`` module (``MoEExperts.from_modules``: Hugging Face's 3-D layout,
``forward(hidden, top_k_index, top_k_weights)`` through ``experts_forward``) and replaces the block's forward by
routing + ``MoEExperts``, so the whole block runs on the grouped GEMM. The model's outputs do not change beyond
rounding.
"""

from collections.abc import Callable

import torch
from torch import nn

from moe_gemm.layer import MoEExperts, is_expert_list
from moe_gemm.routing import route

RouteFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def softmax_top_k_router(block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router of Mixtral- and Qwen-MoE-style blocks: ``block.gate`` (a ``Linear``) gives the logits, then
    ``route(logits, block.top_k, scoring="softmax", renormalize=block.norm_topk_prob)``."""
    missing = [name for name in ("gate", "top_k", "norm_topk_prob") if not hasattr(block, name)]
    if missing:
        raise ValueError(
            f"{type(block).__name__} has no {', '.join(missing)}: pass fuse_experts(model, route_fn=...) "
            "to say how it routes"
        )
    logits = block.gate(hidden)
    weights, ids = route(logits, block.top_k, scoring="softmax", renormalize=bool(block.norm_topk_prob))
    return weights, ids


def _fused_block_forward(block: nn.Module, route_fn: RouteFn) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, ids = route_fn(block, tokens)
        return block.experts(tokens, ids, weights).view(hidden_states.shape)

    return forward


def fuse_experts(model: nn.Module, route_fn: RouteFn | None = None) -> list[str]:
    """Stack the experts of every MoE block of ``model`` in place and run the blocks through moe_gemm.

    A block is a module whose ``experts`` is an ``nn.ModuleList`` of gated MLPs (``gate_proj``, ``up_proj``,
    ``down_proj``, or Mixtral's ``w1``, ``w3``, ``w2``, all ``nn.Linear``, and an ``act_fn``). Its experts become
    ``MoEExperts.from_modules(block.experts)`` (the per-expert modules are dropped, their weights copied into the
    stacked parameters), and its forward becomes ``hidden [..., H] -> experts(tokens, ids, weights)`` of the same
    shape, with ``(weights, ids) = route_fn(block, tokens [T, H])``. The default ``route_fn`` is
    ``softmax_top_k_router``; blocks that do more in their forward (a shared expert, returning router logits) need
    their own forward calling ``block.experts(hidden, top_k_index, top_k_weights)``.

    Returns the names of the blocks fused. Raises ``ValueError`` when the model has none.
    """
    route_fn = route_fn or softmax_top_k_router
    blocks = [
        (name, module) for name, module in model.named_modules() if is_expert_list(getattr(module, "experts", None))
    ]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no module whose experts are an nn.ModuleList of gated MLPs")
    for _, block in blocks:
        block.experts = MoEExperts.from_modules(block.experts)
        # An instance attribute shadows the class's forward for this block only.
        block.forward = _fused_block_forward(block, route_fn)
    return [name for name, _ in blocks]


__all__ = ["fuse_experts", "is_expert_list", "softmax_top_k_router"]
