"""The MoE expert layer on ``grouped_forward``: ``experts_forward``, and the modules ``MoEExperts`` and ``MoE``.

``experts_forward`` = ``dispatch`` -> gate/up grouped GEMM (+ bias) -> gated activation -> down grouped GEMM (+ bias)
-> ``combine``, differentiable in the hidden states, the routing weights, the expert weights and the biases. Under
torch.compile (and for callable activations) it is that composition of torch ops and ``grouped_forward``; in eager
mode with a named activation it runs as one autograd node, ``_FusedExperts``, whose backward writes out the same
ops' gradients (identical results, far less host time at decode sizes). Routing, dispatch and combine never sync
with the host; ``grouped_forward`` does not either where its CUDA kernels are built.
"""

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_gemm import _layer_kernels, _ops, _validation
from moe_gemm._ops import call_below_autograd, grouped_mm_backward
from moe_gemm.dispatch import (
    DispatchInfo,
    check_dispatch_arguments,
    combine,
    dispatch,
    gather_tokens,
    sort_pairs,
    sum_token_rows,
)
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
    if isinstance(act, str) and _fused_path_applies(hidden, gate_up_proj, down_proj, gate_up_bias, down_bias):
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)} or a callable, got {act!r}")
        check_dispatch_arguments(hidden, top_k_index)
        arguments = (hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, top_k_index)
        options = (act, concatenated, weight_transposed)
        wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in arguments)
        if wants_grad:
            return _FusedExperts.apply(*arguments, options)
        return _FusedExperts.run(None, *arguments, options)
    info = dispatch(hidden, top_k_index, gate_up_proj.shape[0])
    gate_up = _grouped_linear(info.x_sorted, gate_up_proj, gate_up_bias, info, weight_transposed)
    activated = act(gate_up) if callable(act) else gated_activation(gate_up, act, concatenated)
    y_sorted = _grouped_linear(activated, down_proj, down_bias, info, weight_transposed)
    return combine(y_sorted, info, top_k_weights)


def _fused_path_applies(hidden, gate_up_proj, down_proj, gate_up_bias, down_bias) -> bool:
    """Whether ``experts_forward`` runs as ``_FusedExperts``: in eager mode (torch.compile traces the composition of
    ops, which it fuses itself), for tensor biases of the hidden dtype (others promote the GEMM outputs). Arguments
    of the wrong type take the composed path, whose checks name them."""
    return (
        not torch.compiler.is_compiling()
        and all(isinstance(t, torch.Tensor) for t in (hidden, gate_up_proj, down_proj))
        and (gate_up_bias is None or (isinstance(gate_up_bias, torch.Tensor) and gate_up_bias.dtype == hidden.dtype))
        and (down_bias is None or (isinstance(down_bias, torch.Tensor) and down_bias.dtype == hidden.dtype))
    )


def _bias_grad(bias: torch.Tensor, expert_of_row: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    # What autograd does for ``bias[expert_of_row]``: an accumulating index_put_, reproducible under
    # torch.use_deterministic_algorithms(True).
    return torch.zeros_like(bias).index_put_((expert_of_row,), grad_rows, accumulate=True)


def _valid_pairs(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return (ids >= 0) & (ids < num_experts)


def _weighted_pair_operands(
    y_sorted: torch.Tensor, row_of_pair: torch.Tensor, top_k_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine``'s operands in its accumulation dtype: ``y_pairs [T, k, H]`` and ``weights [T, k, 1]``."""
    num_tokens, top_k = top_k_weights.shape
    acc_dtype = torch.float64 if torch.float64 in (y_sorted.dtype, top_k_weights.dtype) else torch.float32
    y_pairs = y_sorted.index_select(0, row_of_pair).view(num_tokens, top_k, -1).to(acc_dtype)
    return y_pairs, top_k_weights.to(acc_dtype)[..., None]


def _combine_pairs(
    y_sorted: torch.Tensor, row_of_pair: torch.Tensor, valid_pair: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``combine``, as ``dispatch.combine`` computes it."""
    y_pairs, weights = _weighted_pair_operands(y_sorted, row_of_pair, top_k_weights)
    return torch.where(valid_pair[..., None], y_pairs * weights, 0).sum(dim=1).to(y_sorted.dtype)


class _FusedExperts(torch.autograd.Function):
    """``experts_forward`` for a named activation as one autograd node, computing what the composition of
    ``dispatch``, ``grouped_forward``, the activation and ``combine`` computes, op for op, in the forward and the
    backward (the backward spells out autograd's formulas for each step), so results are the same bits. On CUDA,
    where the extension is built, dispatch, the activation and combine are one kernel each (``_layer_kernels``):
    the same rows and the same roundings, except that combine sums each token's slots in order, which PyTorch's
    reduction may not (a last-bit difference at most).

    Why: at decode sizes the layer's cost is host time, and autograd's per-op bookkeeping (about 25 nodes, each a
    few microseconds forward and backward) was most of it; the kernels then replace about twenty ops by three. ``forward`` takes ``ctx`` rather than a
    ``setup_context``, whose ``apply`` binds arguments through ``inspect.signature`` at every call.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options):
        return _FusedExperts.run(
            ctx, hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options
        )

    @staticmethod
    def run(ctx, hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options):
        """The forward; saves what the backward needs on ``ctx`` unless it is None (no gradient wanted)."""
        act, concatenated, weight_transposed = options
        top_k = ids.shape[1]
        num_experts = gate_up_proj.shape[0]
        if _layer_kernels.dispatch_kernel_applies(ids, num_experts):
            # One launch for the sort, and the token of each row comes with it.
            m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair = _layer_kernels.dispatch_pairs(
                ids, num_experts
            )
            x_sorted = hidden.index_select(0, token_of_row)
        else:
            m_sizes, expert_of_row, pair_of_row, row_of_pair, _ = sort_pairs(ids, num_experts)
            x_sorted = gather_tokens(hidden, pair_of_row, top_k)
        cuda_kernel = hidden.is_cuda and _ops.cuda_available()
        gate_up_weight, gate_up_flag = _validation.validate(
            x_sorted, gate_up_proj, m_sizes, weight_transposed, cuda_kernel=cuda_kernel
        )
        if os.environ.get("MOE_GEMM_CHECK") == "1":
            _validation.check_sizes_on_host(m_sizes, x_sorted.shape[0])
        grouped_mm = torch.ops.moe_gemm.grouped_mm.default
        gate_up = call_below_autograd(grouped_mm, x_sorted, gate_up_weight, m_sizes, gate_up_flag)
        # Dropped rows (expert E) borrow the last expert's bias: combine ignores them and gives them zero gradient.
        bias_row = None
        if gate_up_bias is not None or down_bias is not None:
            bias_row = expert_of_row.clamp_max(num_experts - 1)
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[bias_row]
        if _layer_kernels.activation_kernel_applies(gate_up, act):
            activated = _layer_kernels.gated_activation(gate_up, act, concatenated)
        else:
            activated = gated_activation(gate_up, act, concatenated)
        down_weight, down_flag = _validation.validate(
            activated, down_proj, m_sizes, weight_transposed, cuda_kernel=cuda_kernel
        )
        y_sorted = call_below_autograd(grouped_mm, activated, down_weight, m_sizes, down_flag)
        if down_bias is not None:
            y_sorted = y_sorted + down_bias[bias_row]
        if _layer_kernels.combine_kernel_applies(y_sorted, top_k_weights, ids):
            out = _layer_kernels.combine(y_sorted, row_of_pair, top_k_weights, ids, num_experts)
        else:
            out = _combine_pairs(y_sorted, row_of_pair, _valid_pairs(ids, num_experts), top_k_weights)
        if ctx is not None:
            ctx.save_for_backward(
                x_sorted,
                gate_up_weight,
                gate_up,
                activated,
                down_weight,
                m_sizes,
                bias_row,
                pair_of_row,
                row_of_pair,
                ids,
                y_sorted,
                top_k_weights,
                gate_up_bias,
                down_bias,
            )
            ctx.options = (act, concatenated, gate_up_flag, down_flag, num_experts)
            # A weight read through its transposed view gets its gradient transposed back.
            ctx.weights_viewed = (gate_up_weight is not gate_up_proj, down_weight is not down_proj)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (
            x_sorted,
            gate_up_weight,
            gate_up,
            activated,
            down_weight,
            m_sizes,
            bias_row,
            pair_of_row,
            row_of_pair,
            ids,
            y_sorted,
            top_k_weights,
            gate_up_bias,
            down_bias,
        ) = ctx.saved_tensors
        act, concatenated, gate_up_flag, down_flag, num_experts = ctx.options
        needs = ctx.needs_input_grad
        grad_hidden = grad_weights = grad_gate_up_proj = grad_down_proj = grad_gate_up_bias = grad_down_bias = None

        # combine: out = sum_j where(valid, y_pairs * w, 0).to(dtype)
        valid_pair = _valid_pairs(ids, num_experts)
        y_pairs, weights = _weighted_pair_operands(y_sorted, row_of_pair, top_k_weights)
        grad_products = torch.where(valid_pair[..., None], grad_out.to(y_pairs.dtype).unsqueeze(1), 0)
        if needs[1]:
            grad_weights = (grad_products * y_pairs).sum(dim=2, keepdim=True).squeeze(-1).to(top_k_weights.dtype)
        needs_below_combine = any(needs[0:1] + needs[2:6])
        if not needs_below_combine:
            return grad_hidden, grad_weights, None, None, None, None, None, None
        grad_pairs = (grad_products * weights).to(y_sorted.dtype)
        grad_y_sorted = grad_pairs.view(-1, grad_pairs.shape[-1]).index_select(0, pair_of_row)

        if needs[5]:
            grad_down_bias = _bias_grad(down_bias, bias_row, grad_y_sorted)
        grad_activated, grad_down_proj = grouped_mm_backward(
            grad_y_sorted,
            activated,
            down_weight,
            m_sizes,
            down_flag,
            any(needs[0:1] + needs[2:3] + needs[4:5]),
            needs[3],
        )
        if grad_down_proj is not None and ctx.weights_viewed[1]:
            grad_down_proj = grad_down_proj.transpose(-1, -2)
        if grad_activated is None:
            return (grad_hidden, grad_weights, None, grad_down_proj, None, grad_down_bias, None, None)

        # activated = act(gate) * up
        gate, up = gate_up.chunk(2, dim=-1) if concatenated else (gate_up[:, 0::2], gate_up[:, 1::2])
        activated_gate = ACTIVATIONS[act](gate)  # recomputed: one elementwise op, not a saved [rows, I] tensor
        grad_activated_gate = grad_activated * up
        grad_up = grad_activated * activated_gate
        if act == "silu":
            grad_gate = torch.ops.aten.silu_backward(grad_activated_gate, gate)
        else:
            approximate = "tanh" if act == "gelu_tanh" else "none"
            grad_gate = torch.ops.aten.gelu_backward(grad_activated_gate, gate, approximate=approximate)
        if concatenated:
            grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1)
        else:
            grad_gate_up = torch.stack([grad_gate, grad_up], dim=-1).view(grad_gate.shape[0], -1)

        if needs[4]:
            grad_gate_up_bias = _bias_grad(gate_up_bias, bias_row, grad_gate_up)
        grad_x_sorted, grad_gate_up_proj = grouped_mm_backward(
            grad_gate_up, x_sorted, gate_up_weight, m_sizes, gate_up_flag, needs[0], needs[2]
        )
        if grad_gate_up_proj is not None and ctx.weights_viewed[0]:
            grad_gate_up_proj = grad_gate_up_proj.transpose(-1, -2)
        if grad_x_sorted is not None:
            grad_hidden = sum_token_rows(grad_x_sorted, row_of_pair, valid_pair.shape[1])
        return (
            grad_hidden,
            grad_weights,
            grad_gate_up_proj,
            grad_down_proj,
            grad_gate_up_bias,
            grad_down_bias,
            None,
            None,
        )


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
