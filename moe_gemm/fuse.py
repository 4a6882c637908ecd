"""``fuse_experts(model)``: experts stored as an ``nn.ModuleList`` of MLPs become stacked 3-D weights run by moe_gemm.

Older Hugging Face MoE models (and many custom ones) keep one MLP module per expert and loop over the experts in the
MoE block's forward. ``fuse_experts`` finds every module whose ``experts`` attribute is such a list, stacks the
experts' weights into a ``FusedExperts`` module (Hugging Face's 3-D layout, ``forward(hidden, top_k_index,
top_k_weights)`` through ``experts_forward``) and replaces the block's forward by routing + ``FusedExperts``, so the
whole block runs on the grouped GEMM. The model's outputs do not change beyond rounding.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_gemm.layer import experts_forward
from moe_gemm.routing import route

# Names of the (gate, up, down) linear layers of one expert MLP: Llama/Qwen style, then Mixtral's w1, w3, w2.
EXPERT_LAYER_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))

RouteFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _activation_name(act_fn: Callable) -> str | None:
    """Our name for an activation module that ``experts_forward`` fuses, else None."""
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return "silu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    # transformers' GELUActivation wraps F.gelu (exact) in .act; GELUTanh is the tanh approximation.
    if type(act_fn).__name__ == "GELUActivation" and getattr(act_fn, "act", None) is F.gelu:
        return "gelu"
    if type(act_fn).__name__ in ("GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    return None


def _expert_layers(expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    for names in EXPERT_LAYER_NAMES:
        layers = [getattr(expert, name, None) for name in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return tuple(layers)
    return None


def is_expert_list(experts: nn.Module) -> bool:
    """Whether ``experts`` is a non-empty ``nn.ModuleList`` of gated MLPs of one type, which ``FusedExperts`` stacks."""
    return (
        isinstance(experts, nn.ModuleList)
        and len(experts) > 0
        and len({type(expert) for expert in experts}) == 1
        and all(_expert_layers(expert) is not None and hasattr(expert, "act_fn") for expert in experts)
    )


class FusedExperts(nn.Module):
    """The experts of an ``nn.ModuleList`` of gated MLPs, stacked: ``gate_up_proj [E, 2I, H]`` (``[gate; up]``),
    ``down_proj [E, H, I]`` and, when the experts have biases, ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias
    [E, H]``. ``forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` runs ``experts_forward``."""

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        if not is_expert_list(experts):
            raise ValueError("experts must be an nn.ModuleList of gated MLPs (gate/up/down nn.Linear and an act_fn)")
        layers = [_expert_layers(expert) for expert in experts]
        gate, _, down = layers[0]
        has_bias = [layer.bias is not None for layer in layers[0]]
        if any(has_bias) and not all(has_bias):
            raise ValueError("FusedExperts needs biases in all three layers of an expert or in none")
        self.num_experts, self.hidden_size, self.intermediate_size = len(experts), gate.in_features, gate.out_features
        act_fn = experts[0].act_fn
        # An activation we do not fuse is applied as the experts did: act_fn(gate) * up.
        self.act = _activation_name(act_fn)
        self.act_fn = None if self.act is not None else act_fn
        with torch.no_grad():
            gate_up = torch.stack([torch.cat([g.weight, u.weight]) for g, u, _ in layers])
            self.gate_up_proj = nn.Parameter(gate_up, requires_grad=gate.weight.requires_grad)
            self.down_proj = nn.Parameter(torch.stack([d.weight for _, _, d in layers]), down.weight.requires_grad)
            if all(has_bias):
                gate_up_bias = torch.stack([torch.cat([g.bias, u.bias]) for g, u, _ in layers])
                self.gate_up_proj_bias = nn.Parameter(gate_up_bias, requires_grad=gate.bias.requires_grad)
                self.down_proj_bias = nn.Parameter(torch.stack([d.bias for _, _, d in layers]), down.bias.requires_grad)
            else:
                self.register_parameter("gate_up_proj_bias", None)
                self.register_parameter("down_proj_bias", None)

    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(
            hidden,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            act=self.act if self.act is not None else self._gate,
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=self.down_proj_bias,
        )

    def extra_repr(self) -> str:
        act = self.act if self.act is not None else type(self.act_fn).__name__
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, act={act}, bias={self.down_proj_bias is not None}"
        )


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
    ``down_proj``, or Mixtral's ``w1``, ``w3``, ``w2``, all ``nn.Linear``, and an ``act_fn``). Its experts become a
    ``FusedExperts`` (the per-expert modules are dropped, their weights copied into the stacked parameters), and its
    forward becomes ``hidden [..., H] -> experts(tokens, ids, weights)`` of the same shape, with ``(weights, ids) =
    route_fn(block, tokens [T, H])``. The default ``route_fn`` is ``softmax_top_k_router``; blocks that do more in
    their forward (a shared expert, returning router logits) need their own forward calling ``block.experts(hidden,
    top_k_index, top_k_weights)``.

    Returns the names of the blocks fused. Raises ``ValueError`` when the model has none.
    """
    route_fn = route_fn or softmax_top_k_router
    blocks = [
        (name, module) for name, module in model.named_modules() if is_expert_list(getattr(module, "experts", None))
    ]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no module whose experts are an nn.ModuleList of gated MLPs")
    for _, block in blocks:
        block.experts = FusedExperts(block.experts)
        # An instance attribute shadows the class's forward for this block only.
        block.forward = _fused_block_forward(block, route_fn)
    return [name for name, _ in blocks]


__all__ = ["FusedExperts", "fuse_experts", "is_expert_list", "softmax_top_k_router"]
