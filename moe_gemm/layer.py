"""The MoE expert layer on ``grouped_forward``: ``experts_forward``, and the modules ``MoEExperts`` and ``MoE``.

``experts_forward`` = ``dispatch`` -> gate/up grouped GEMM (+ bias) -> gated activation -> down grouped GEMM (+ bias)
-> ``combine``. It is made of differentiable torch ops and ``grouped_forward`` only, so autograd differentiates it in
the hidden states, the routing weights, the expert weights and the biases. Routing, dispatch and combine never sync
with the host; ``grouped_forward`` does not either where its CUDA kernels are built.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_gemm.dispatch import DispatchInfo, combine, dispatch
from moe_gemm.functional import grouped_forward
from moe_gemm.routing import route

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,  # SwiGLU
    "gelu": F.gelu,  # GeGLU with the exact (erf) GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GeGLU with the tanh approximation
}


def gated_activation(gate_up: torch.Tensor, act: str = "silu", concatenated: bool = True) -> torch.Tensor:
    """``act(gate) * up`` of ``[rows, 2I]``, returning ``[rows, I]``.

    ``concatenated``: the columns are ``[gate; up]`` halves; otherwise interleaved ``gate0, up0, gate1, up1, ...``.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(ACTIVATIONS)} or a callable, got {act!r}")
    gate, up = gate_up.chunk(2, dim=-1) if concatenated else (gate_up[:, 0::2], gate_up[:, 1::2])
    return ACTIVATIONS[act](gate) * up


def _grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, info: DispatchInfo, weight_transposed: bool
) -> torch.Tensor:
    """``grouped_forward`` plus the bias of each row's expert."""
    y = grouped_forward(x, weight, info.m_sizes, weight_transposed=weight_transposed)
    if bias is None:
        return y
    # Dropped rows (expert E) borrow the last expert's bias: combine ignores them and gives them zero gradient.
    return y + bias[info.expert_of_row.clamp_max(bias.shape[0] - 1)]


def experts_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
    weight_transposed: bool = False,
    concatenated: bool = True,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed experts of an MoE layer: ``out[t] = sum_j w[t, j] * expert_{id[t, j]}(hidden[t])``, ``[T, H]``.

    ``expert_e(x) = down_e(act(gate_e(x)) * up_e(x))`` with ``[gate_e(x), up_e(x)] = x @ gate_up_proj[e].T +
    gate_up_bias[e]`` and ``down_e(h) = h @ down_proj[e].T + down_bias[e]``.

    Args:
        hidden: ``[T, H]``.
        top_k_index: ``[T, k]`` integer expert ids; ids outside ``[0, E)`` (expert-parallel sentinels) contribute
            nothing.
        top_k_weights: ``[T, k]`` routing weights.
        gate_up_proj: ``[E, 2I, H]``, or ``[E, H, 2I]`` when ``weight_transposed``.
        down_proj: ``[E, H, I]``, or ``[E, I, H]`` when ``weight_transposed``.
        act: ``"silu"`` (SwiGLU), ``"gelu"`` (GeGLU, exact erf GELU) or ``"gelu_tanh"`` (GeGLU, tanh approximation),
            computed in the hidden dtype; or a callable mapping the ``[rows, 2I]`` gate/up output to the ``[rows, I]``
            input of the down projection (then ``concatenated`` is not used).
        concatenated: ``[gate; up]`` halves along ``2I`` when True, interleaved columns ``gate0, up0, ...`` when False.
        gate_up_bias, down_bias: optional ``[E, 2I]`` and ``[E, H]``.

    Returns:
        ``[T, H]`` in the dtype of ``hidden``; the sum over ``k`` runs in float32 in a fixed order (deterministic).
    """
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_weights {tuple(top_k_weights.shape)} != top_k_index {tuple(top_k_index.shape)}")
    info = dispatch(hidden, top_k_index, gate_up_proj.shape[0])
    gate_up = _grouped_linear(info.x_sorted, gate_up_proj, gate_up_bias, info, weight_transposed)
    activated = act(gate_up) if callable(act) else gated_activation(gate_up, act, concatenated)
    y_sorted = _grouped_linear(activated, down_proj, down_bias, info, weight_transposed)
    return combine(y_sorted, info, top_k_weights)


class MoEExperts(nn.Module):
    """Expert weights in Hugging Face's names and layouts; ``forward(hidden, top_k_index, top_k_weights)``.

    ``gate_up_proj [E, 2I, H]`` (``[gate; up]`` halves), ``down_proj [E, H, I]``, and with ``bias=True``
    ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``. Initialised as ``nn.Linear`` per expert.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: str = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.hidden_size, self.intermediate_size, self.act = (
            num_experts,
            hidden_size,
            intermediate_size,
            act,
        )
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, **factory))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``+-1/sqrt(fan_in)``, weights and biases, as ``nn.Linear``'s default."""
        for weight, bias in ((self.gate_up_proj, self.gate_up_proj_bias), (self.down_proj, self.down_proj_bias)):
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(
            hidden,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            act=self.act,
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=self.down_proj_bias,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, act={self.act!r}, bias={self.down_proj_bias is not None}"
        )


class GatedMLP(nn.Module):
    """A dense gated MLP, ``down_proj(act(gate_proj(x)) * up_proj(x))``: the shared expert of ``MoE``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, act: str = "silu", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype, "bias": False}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **factory)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """A whole MoE layer: router ``Linear`` (run in float32) -> ``route`` -> ``MoEExperts`` (+ a shared expert).

    ``forward(hidden [..., H])`` returns the same shape and dtype. ``scoring``, ``renormalize``, ``n_group``,
    ``topk_group`` and ``routed_scaling_factor`` are passed to ``route``; ``scoring="sigmoid"`` adds the buffer
    ``e_score_correction_bias [E]`` (zeros). ``shared_intermediate_size`` adds ``shared_expert``, a ``GatedMLP``
    applied to every token and added to the routed output.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        renormalize: bool = False,
        n_group: int | None = None,
        topk_group: int | None = None,
        routed_scaling_factor: float = 1.0,
        router_bias: bool = False,
        act: str = "silu",
        expert_bias: bool = False,
        shared_intermediate_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.top_k = top_k
        self.route_options = {
            "scoring": scoring,
            "renormalize": renormalize,
            "n_group": n_group,
            "topk_group": topk_group,
            "routed_scaling_factor": routed_scaling_factor,
        }
        self.router = nn.Linear(hidden_size, num_experts, bias=router_bias, **factory)
        if scoring == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device))
        else:
            self.e_score_correction_bias = None
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size, act=act, bias=expert_bias, **factory)
        self.shared_expert = (
            None
            if shared_intermediate_size is None
            else GatedMLP(hidden_size, shared_intermediate_size, act=act, **factory)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        router_bias = None if self.router.bias is None else self.router.bias.float()
        logits = F.linear(tokens.float(), self.router.weight.float(), router_bias)
        weights, ids = route(
            logits, self.top_k, e_score_correction_bias=self.e_score_correction_bias, **self.route_options
        )
        out = self.experts(tokens, ids, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(hidden.shape)
