"""The MoE expert layer on ``grouped_forward``: ``experts_forward``, and the modules ``MoEExperts`` and ``MoE``.

``experts_forward`` = ``dispatch`` -> gate/up grouped GEMM (+ bias) -> gated activation -> down grouped GEMM (+ bias)
-> ``combine``, differentiable in the hidden states, the routing weights, the expert weights and the biases. For a
callable activation (or ``fused=False``) it is that composition of torch ops and ``grouped_forward``; with a named
activation it runs as one autograd node, ``_ExpertsFunction`` (the fused layer, in eager mode and under
torch.compile alike), whose backward
keeps only the input, the pre-activation and the routing, and computes the activation's and the routing weights'
gradients in one pass (``gated_activation_backward``). Routing, dispatch and combine never sync with the host;
``grouped_forward`` does not either where its CUDA kernels are usable.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_gemm import _ops, _validation
from moe_gemm.activation import ACTIVATIONS, check_activation_name, gated_activation, split_gate_up
from moe_gemm.dispatch import (
    DispatchInfo,
    combine,
    combine_pairs,
    combine_pairs_backward,
    dispatch,
    gather_tokens,
    sort_pairs,
    sum_token_rows,
    valid_pairs,
)
from moe_gemm.functional import (
    _expert_gemm,
    _expert_gemm_backward,
    _expert_gemm_gated,
    gated_gemm_applies,
    grouped_forward,
)
from moe_gemm.routing import route



def gated_activation_backward(
    grad_activated: torch.Tensor, gate_up: torch.Tensor, row_weights: torch.Tensor, act: str, concatenated: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation's part of the layer's backward, from the saved pre-activation ``gate_up [rows, 2I]``.

    Row ``r`` feeds ``row_weights[r] * (activated[r] @ down_e.T)`` into its token's output, where ``activated =
    gated_activation(gate_up, act, concatenated)``; ``grad_activated [rows, I]`` is the gradient of ``activated``
    for a routing weight of 1 (the token's output gradient through ``down_e`` alone). Returns, in one pass:

    - ``grad_gate_up [rows, 2I]``: the gradient of ``gate_up`` (its layout), for the row's routing weight;
    - ``weighted_activated [rows, I]``: ``row_weights[:, None] * activated``, the operand of the down projection's
      weight gradient (``grad_W_down[e] = grad_out_rows_e.T @ weighted_activated_e``);
    - ``grad_row_weights [rows]``: ``(activated * grad_activated).sum(1)``, the routing weight's gradient, float32
      (float64 for float64 inputs).

    Each element is computed in float32 (float64) and rounded once. ``_ops.gated_activation_backward_kernel`` computes
    the same in one CUDA kernel that writes no float32 ``[rows, I]`` tensor.
    """
    acc_dtype = torch.float64 if torch.float64 in (gate_up.dtype, row_weights.dtype) else torch.float32
    gate, up = split_gate_up(gate_up, concatenated)
    activated_gate = ACTIVATIONS[act](gate)  # the forward's roundings
    activated = (activated_gate * up).to(acc_dtype)
    grad = grad_activated.to(acc_dtype)
    grad_row_weights = (activated * grad).sum(dim=1)
    weights = row_weights.to(acc_dtype)[:, None]
    weighted_grad = grad * weights
    grad_up = weighted_grad * activated_gate.to(acc_dtype)
    gate = gate.to(acc_dtype)
    grad_activated_gate = weighted_grad * up.to(acc_dtype)
    if act == "silu":
        grad_gate = torch.ops.aten.silu_backward(grad_activated_gate, gate)
    else:
        approximate = "tanh" if act == "gelu_tanh" else "none"
        grad_gate = torch.ops.aten.gelu_backward(grad_activated_gate, gate, approximate=approximate)
    if concatenated:
        grad_gate_up = torch.cat([grad_gate, grad_up], dim=-1)
    else:
        grad_gate_up = torch.stack([grad_gate, grad_up], dim=-1).view(grad_gate.shape[0], -1)
    dtype = gate_up.dtype
    return grad_gate_up.to(dtype), (activated * weights).to(dtype), grad_row_weights


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
    fused: bool = True,
) -> torch.Tensor:
    """The routed experts of an MoE layer: ``out[t] = sum_j w[t, j] * expert_{id[t, j]}(hidden[t])``, ``[T, H]``.

    ``expert_e(x) = down_e(act(gate_e(x)) * up_e(x))`` with ``[gate_e(x), up_e(x)] = x @ gate_up_proj[e].T +
    gate_up_bias[e]`` and ``down_e(h) = h @ down_proj[e].T + down_bias[e]``.

    Args:
        hidden: ``[T, H]``.
        top_k_index: ``[T, k]`` integer expert ids; ids outside ``[0, E)`` (expert-parallel sentinels) contribute
            nothing.
        top_k_weights: ``[T, k]`` routing weights, any float dtype.
        gate_up_proj: ``[E, 2I, H]``, or ``[E, H, 2I]`` when ``weight_transposed``; the dtype of ``hidden``.
        down_proj: ``[E, H, I]``, or ``[E, I, H]`` when ``weight_transposed``; the dtype of ``hidden``.
        act: ``"silu"`` (SwiGLU), ``"gelu"`` (GeGLU, exact erf GELU) or ``"gelu_tanh"`` (GeGLU, tanh approximation),
            computed in the hidden dtype; or a callable mapping the ``[rows, 2I]`` gate/up output to the ``[rows, I]``
            input of the down projection (then ``concatenated`` is not used, and ``gate_up_proj``'s ``2I`` may be
            any width).
        concatenated: ``[gate; up]`` halves along ``2I`` when True, interleaved columns ``gate0, up0, ...`` when False.
        gate_up_bias, down_bias: optional ``[E, 2I]`` and ``[E, H]``, the dtype of ``hidden``.
        fused: with a named ``act``, the fused layer (``_ExpertsFunction``: one autograd node whose backward keeps
            only ``hidden``, the pre-activation and the routing). False runs the composition of ``dispatch``,
            ``grouped_forward``, ``gated_activation`` and ``combine`` under autograd, as callable activations do:
            the same forward bits, the gradients within rounding; kept to compare the two.

    Returns:
        ``[T, H]`` in the dtype of ``hidden``; the sum over ``k`` runs in float32 in a fixed order (deterministic).

    Raises:
        TypeError, ValueError: naming the argument, for types, dtypes, devices and shapes that do not fit together.
    """
    named_act = isinstance(act, str)
    if named_act:
        check_activation_name(act)
    _check_experts_arguments(
        hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, weight_transposed,
        named_act,
    )  # fmt: skip
    if named_act and fused:
        # One autograd node; torch.compile traces it as one too (its forward and backward are traceable).
        arguments = (hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, top_k_index)
        options = (act, concatenated, weight_transposed)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in arguments):
            return _ExpertsFunction.apply(*arguments, options)
        return _ExpertsFunction.run(None, *arguments, options)
    info = dispatch(hidden, top_k_index, gate_up_proj.shape[0])
    gate_up = _grouped_linear(info.x_sorted, gate_up_proj, gate_up_bias, info, weight_transposed)
    activated = gated_activation(gate_up, act, concatenated) if named_act else act(gate_up)
    if not named_act:
        _check_activation_output(activated, down_proj, weight_transposed)
    y_sorted = _grouped_linear(activated, down_proj, down_bias, info, weight_transposed)
    return combine(y_sorted, info, top_k_weights)


_FLOAT_DTYPES = frozenset((torch.float64, torch.float32, torch.bfloat16, torch.float16))
_INDEX_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


def _arguments_fit(
    hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, weight_transposed, named_act
) -> bool:
    """Whether ``_explain_arguments`` would pass, in as little host time as possible (eager decode calls are
    host-bound); False may also mean an unusual but valid argument, which ``_explain_arguments`` then accepts."""
    try:
        device, dtype = hidden.device, hidden.dtype
        num_tokens, hidden_size = hidden.shape
        index_shape = top_k_index.shape
        num_experts, gate_up_n, gate_up_k = gate_up_proj.shape
        down_experts, down_n, down_k = down_proj.shape
    except (AttributeError, TypeError, ValueError):
        return False
    if weight_transposed:
        gate_up_n, gate_up_k, down_n, down_k = gate_up_k, gate_up_n, down_k, down_n
    return (
        dtype in _FLOAT_DTYPES
        and top_k_index.dtype in _INDEX_DTYPES
        and top_k_weights.dtype in _FLOAT_DTYPES
        and gate_up_proj.dtype == dtype
        and down_proj.dtype == dtype
        and len(index_shape) == 2
        and index_shape[0] == num_tokens
        and top_k_weights.shape == index_shape
        and gate_up_k == hidden_size
        and down_experts == num_experts
        and down_n == hidden_size
        and (not named_act or gate_up_n == 2 * down_k)
        and top_k_index.device == device
        and top_k_weights.device == device
        and gate_up_proj.device == device
        and down_proj.device == device
        and (gate_up_bias is None or _bias_fits(gate_up_bias, (num_experts, gate_up_n), dtype, device))
        and (down_bias is None or _bias_fits(down_bias, (num_experts, hidden_size), dtype, device))
    )


def _bias_fits(bias, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> bool:
    return isinstance(bias, torch.Tensor) and bias.dtype == dtype and bias.shape == shape and bias.device == device


def _check_experts_arguments(*arguments) -> None:
    """What only the layer knows: how its arguments fit together, checked before any GEMM so that errors name the
    caller's arguments. The GEMMs' own checks (what the kernels need of layouts and alignment) come after these."""
    if not _arguments_fit(*arguments):
        _explain_arguments(*arguments)


def _explain_arguments(
    hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, weight_transposed, named_act
) -> None:
    """Raise TypeError or ValueError naming the first argument that does not fit, or return when all fit."""
    tensors = (
        ("hidden", hidden), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights),
        ("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("gate_up_bias", gate_up_bias),
        ("down_bias", down_bias),
    )  # fmt: skip
    for name, value in tensors:
        if value is None and name.endswith("_bias"):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.device != hidden.device:
            raise ValueError(f"{name}: expected a tensor on the device of hidden ({hidden.device}), got {value.device}")
        if name.endswith(("_proj", "_bias")) and value.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected the dtype of hidden ({hidden.dtype}), got {value.dtype}")

    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden: expected a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected shape [T, H], got {tuple(hidden.shape)}")
    num_tokens, hidden_size = hidden.shape
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        raise TypeError(f"top_k_index: expected an integer tensor of expert ids, got {top_k_index.dtype}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != num_tokens:
        raise ValueError(
            f"top_k_index: expected shape [T, top_k] with T = {num_tokens} (hidden [T, H]), "
            f"got {tuple(top_k_index.shape)}"
        )
    if not top_k_weights.dtype.is_floating_point:
        raise TypeError(f"top_k_weights: expected a floating-point tensor, got {top_k_weights.dtype}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights: expected the shape of top_k_index, {tuple(top_k_index.shape)}, "
            f"got {tuple(top_k_weights.shape)}"
        )
    _check_expert_weights(hidden_size, gate_up_proj, down_proj, gate_up_bias, down_bias, weight_transposed, named_act)


def _check_expert_weights(
    hidden_size, gate_up_proj, down_proj, gate_up_bias, down_bias, weight_transposed, named_act
) -> None:
    """The shapes of the weights and biases against ``hidden [T, H]`` and each other (see ``experts_forward``)."""
    # Weights are [E, N, K], read as x @ W[e].T, or [E, K, N] when weight_transposed.
    n_dim, k_dim = (2, 1) if weight_transposed else (1, 2)
    flag = f"(weight_transposed={weight_transposed})"
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[k_dim] != hidden_size:
        hint = ""
        if down_proj.dim() == 3 and down_proj.shape[k_dim] == hidden_size:
            hint = "; are gate_up_proj and down_proj swapped?"
        elif gate_up_proj.dim() == 3 and gate_up_proj.shape[n_dim] == hidden_size:
            hint = f"; for weights stored the other way round pass weight_transposed={not weight_transposed}"
        layout = "[E, H, 2I]" if weight_transposed else "[E, 2I, H]"
        raise ValueError(
            f"gate_up_proj: expected shape {layout} {flag} with H = {hidden_size} (hidden [T, H]), "
            f"got {tuple(gate_up_proj.shape)}{hint}"
        )
    num_experts, gate_up_width = gate_up_proj.shape[0], gate_up_proj.shape[n_dim]
    if named_act and gate_up_width % 2:
        raise ValueError(
            f"gate_up_proj: expected an even 2I (gate and up halves), got shape {tuple(gate_up_proj.shape)} {flag}"
        )
    # A callable activation may map 2I to any width: then only the down projection's E and H are known.
    if named_act:
        intermediate = gate_up_width // 2
    else:
        intermediate = down_proj.shape[k_dim] if down_proj.dim() == 3 else None
    expected = [num_experts, intermediate, intermediate]
    expected[n_dim] = hidden_size
    if down_proj.shape != tuple(expected):
        sizes = f"E = {num_experts} (gate_up_proj), H = {hidden_size} (hidden)"
        if named_act:
            sizes += f", I = {intermediate} (half of gate_up_proj's 2I)"
        layout = "[E, I, H]" if weight_transposed else "[E, H, I]"
        raise ValueError(f"down_proj: expected shape {layout} {flag} with {sizes}, got {tuple(down_proj.shape)}")
    for name, bias, layout, expected in (
        ("gate_up_bias", gate_up_bias, "[E, 2I] (as gate_up_proj)", (num_experts, gate_up_width)),
        ("down_bias", down_bias, "[E, H] (as down_proj)", (num_experts, hidden_size)),
    ):
        if bias is not None and bias.shape != expected:
            raise ValueError(f"{name}: expected shape {layout}, {expected}, got {tuple(bias.shape)}")


def _check_activation_output(activated, down_proj: torch.Tensor, weight_transposed: bool) -> None:
    """The width a callable activation returns is the down projection's ``I``: check it so that the error names
    ``down_proj`` rather than the GEMM's operands."""
    if not isinstance(activated, torch.Tensor):
        raise TypeError(f"act: expected the callable to return a torch.Tensor, got {type(activated).__name__}")
    intermediate = down_proj.shape[1 if weight_transposed else 2]
    if activated.dim() != 2 or activated.shape[1] != intermediate:
        layout = "[E, I, H]" if weight_transposed else "[E, H, I]"
        raise ValueError(
            f"down_proj: expected shape {layout} (weight_transposed={weight_transposed}) with I = the width act "
            f"returns, got I = {intermediate} in {tuple(down_proj.shape)} and act's output {tuple(activated.shape)}"
        )


def _bias_grad(bias: torch.Tensor, expert_of_row: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    # What autograd does for ``bias[expert_of_row]``: an accumulating index_put_, reproducible under
    # torch.use_deterministic_algorithms(True).
    return torch.zeros_like(bias).index_put_((expert_of_row,), grad_rows, accumulate=True)


class _Saved(NamedTuple):
    """What ``_ExpertsFunction.backward`` reads, in the order of ``ctx.saved_tensors``: the input itself, the
    pre-activation and the routing; no ``[T * k, H]`` tensor."""

    hidden: torch.Tensor | None  # None unless gate_up_proj's gradient is wanted
    gate_up_read: torch.Tensor  # gate_up_proj as the GEMM read it (its transposed view when flipped)
    gate_up: torch.Tensor  # the pre-activation [T * k, 2I]
    down_read: torch.Tensor
    m_sizes: torch.Tensor
    bias_row: torch.Tensor | None
    pair_of_row: torch.Tensor
    token_of_row: torch.Tensor
    row_of_pair: torch.Tensor
    ids: torch.Tensor
    top_k_weights: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


def _sum_token_rows(grad_rows: torch.Tensor, row_of_pair: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Each token's ``top_k`` rows summed in slot order, ``[T, H]``: the gradient of gathering the rows' tokens.
    (Dropped pairs' rows are zero: combine's kernel with unit weights skips them, the PyTorch ops add them.)"""
    ones = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
    if _ops.combine_kernel_applies(grad_rows, ones, ids):
        return _ops.combine_kernel(grad_rows, row_of_pair, ones, ids, num_experts)
    return sum_token_rows(grad_rows, row_of_pair, ids.shape[1])


class _ExpertsFunction(torch.autograd.Function):
    """``experts_forward`` for a named activation as one autograd node: the fused layer.

    Forward: dispatch, the gate/up GEMM, the activation, the down GEMM and combine, each one kernel where ``_ops``'
    kernels apply (CUDA, the extension usable), PyTorch ops otherwise; the same bits as the composition of ops.

    Backward, from the input ``hidden``, the pre-activation ``gate_up`` and the routing alone (no copy of the
    gathered rows, the activation or the expert outputs is kept):

    1. ``grad_rows = grad_out[token of each row]`` and ``grad_activated = grad_rows @ down_e``: the gradient of the
       activation for a routing weight of 1;
    2. ``gated_activation_backward``: the pre-activation's gradient for the row's weight, the routing weight's
       gradient ``<activated, grad_activated>`` (so the expert outputs ``activated @ down_e.T`` need not be kept),
       and ``weight * activated`` for the down weight's gradient;
    3. the down weight's gradient ``grad_rows.T @ (weight * activated)``, the input's gradient through the gate/up
       GEMM summed over each token's rows, and the gate/up weight's gradient from the rows of ``hidden`` gathered
       again.

    The rows of ``grad_out`` and ``hidden`` are read in place by the GEMMs where their gathering kernels beat the copy
    (``_ops.gather_in_gemm``, ``_ops.gather_in_wgrad``), else copied once.

    The roundings differ from autograd through the composed ops (one rounding per element instead of one per op),
    not the math; ``experts_forward(..., fused=False)`` runs that composition. Why one node: at decode sizes
    autograd's per-op bookkeeping (about 25 nodes) was most of the layer's host time. ``forward`` takes ``ctx``
    rather than a ``setup_context``, whose ``apply`` binds arguments through ``inspect.signature`` at every call.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options):
        return _ExpertsFunction.run(
            ctx, hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options
        )

    @staticmethod
    def run(ctx, hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options):
        """The forward; saves what the backward needs on ``ctx`` unless it is None (no gradient wanted)."""
        act, concatenated, weight_transposed = options
        top_k = ids.shape[1]
        num_experts = gate_up_proj.shape[0]
        if _ops.dispatch_kernel_applies(ids, num_experts):
            # One launch for the sort, and the token of each row comes with it.
            m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair = _ops.dispatch_kernel(ids, num_experts)
        else:
            m_sizes, expert_of_row, pair_of_row, row_of_pair, _ = sort_pairs(ids, num_experts)
            token_of_row = pair_of_row // max(top_k, 1)
        names = {"x_name": "hidden", "weight_name": "gate_up_proj"}
        up_columns = gate_up_proj.shape[2] if weight_transposed else gate_up_proj.shape[1]
        # The gathering kernel reads hidden in place, so hidden must have the layout the kernels take (a copy has).
        gather = _validation.kernel_layout_problem(hidden) is None
        gather = gather and _ops.gather_in_gemm(token_of_row.shape[0], num_experts, up_columns)
        # The GEMM reads hidden[token_of_row] in place when it gathers: no [T * k, H] copy.
        x_rows, gather_rows = (hidden, token_of_row) if gather else (hidden.index_select(0, token_of_row), None)
        if ctx is None and gate_up_bias is None and gated_gemm_applies(hidden, act):
            # No gradient wanted: the activation in the GEMM's epilogue, and no [T * k, 2I] pre-activation written.
            # With one (the backward keeps the pre-activation) the two launches below are as fast or faster
            # (docs/design.md, "The gated activation in the up-projection's epilogue").
            activated, gate_up, gate_up_read, gate_up_flag = _expert_gemm_gated(
                x_rows, gate_up_proj, m_sizes, weight_transposed, act, concatenated, False, gather_rows=gather_rows,
                **names,
            )  # fmt: skip
        else:
            gate_up, gate_up_read, gate_up_flag = _expert_gemm(
                x_rows, gate_up_proj, m_sizes, weight_transposed, gather_rows=gather_rows, **names
            )
            activated = None
        del x_rows
        # Dropped rows (expert E) borrow the last expert's bias: combine ignores them and gives them zero gradient.
        bias_row = None
        if gate_up_bias is not None or down_bias is not None:
            bias_row = expert_of_row.clamp_max(num_experts - 1)
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[bias_row]
        if activated is None and _ops.gated_activation_kernel_applies(gate_up, act):
            activated = _ops.gated_activation_kernel(gate_up, act, concatenated)
        elif activated is None:
            activated = gated_activation(gate_up, act, concatenated)
        y_sorted, down_read, down_flag = _expert_gemm(
            activated, down_proj, m_sizes, weight_transposed, x_name="the gated activation", weight_name="down_proj"
        )
        del activated
        if down_bias is not None:
            y_sorted = y_sorted + down_bias[bias_row]
        if _ops.combine_kernel_applies(y_sorted, top_k_weights, ids):
            out = _ops.combine_kernel(y_sorted, row_of_pair, top_k_weights, ids, num_experts)
        else:
            out = combine_pairs(y_sorted, row_of_pair, valid_pairs(ids, num_experts), top_k_weights)
        if ctx is not None:
            saved = _Saved(
                hidden if ctx.needs_input_grad[2] else None, gate_up_read, gate_up, down_read, m_sizes, bias_row,
                pair_of_row, token_of_row, row_of_pair, ids, top_k_weights, gate_up_bias, down_bias,
            )  # fmt: skip
            ctx.save_for_backward(*saved)
            ctx.options = (act, concatenated, gate_up_flag, down_flag, num_experts)
            # A weight read through its transposed view gets its gradient transposed back.
            ctx.weights_viewed = (gate_up_read is not gate_up_proj, down_read is not down_proj)
        if ctx is not None and torch.compiler.is_compiling():
            # torch 2.11's Dynamo hands this Function's backward a zero gradient unless its output is a copy (every
            # gradient of tests/test_layer.py's trace test came out zero; torch 2.13 needs no copy).
            out = out.clone()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = _Saved(*ctx.saved_tensors)
        act, concatenated, gate_up_flag, down_flag, num_experts = ctx.options
        # The inputs: hidden, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ids, options.
        needs = ctx.needs_input_grad
        grads = [None] * 8
        if not any(needs[:6]):
            return tuple(grads)
        ids, top_k_weights = saved.ids, saved.top_k_weights
        valid_pair = valid_pairs(ids, num_experts)
        acc_dtype = torch.float64 if torch.float64 in (grad_out.dtype, top_k_weights.dtype) else torch.float32
        # Dropped pairs weigh 0: their rows lie past sum(m_sizes), where the GEMMs write zeros.
        row_weights = torch.where(valid_pair, top_k_weights.to(acc_dtype), 0).view(-1).index_select(0, saved.pair_of_row)

        grad_out = grad_out.contiguous()
        rows = saved.token_of_row.shape[0]
        activated_columns = saved.down_read.shape[1] if down_flag else saved.down_read.shape[2]
        # The GEMMs read grad_out[token_of_row] and hidden[token_of_row] in place where their gathering kernels are
        # faster than the copies they replace (not with create_graph: those ops have no autograd of their own).
        # grad_out's rows feed the down-projection's input and weight gradients: both gather (each by its own rule),
        # or one copy serves both.
        # (The size rules first: at decode sizes they say no at once, before the layout checks' host work.)
        gather = not torch.is_grad_enabled()
        down_wgrad_gathers = _ops.gather_in_wgrad(rows, num_experts, activated_columns, gathered_is_l=not down_flag)
        gather_grad_rows = (
            gather and saved.down_bias is None and _ops.gather_in_gemm(rows, num_experts, activated_columns)
            and (down_wgrad_gathers or not needs[3]) and _validation.kernel_layout_problem(grad_out) is None
        )  # fmt: skip
        gather_hidden = (
            gather and saved.hidden is not None
            and _ops.gather_in_wgrad(rows, num_experts, saved.gate_up.shape[1], gathered_is_l=gate_up_flag)
            and _validation.kernel_layout_problem(saved.hidden) is None
        )  # fmt: skip
        if gather_grad_rows:
            grad_rows = None
            grad_activated = _ops.call_below_autograd(
                _ops.gemm_op("grouped_mm_gather", grad_out.device), grad_out, saved.token_of_row, saved.down_read,
                saved.m_sizes, not down_flag,
            )  # fmt: skip
        else:
            grad_rows = grad_out.index_select(0, saved.token_of_row)
            grad_activated, _ = _expert_gemm_backward(
                grad_rows, None, saved.down_read, saved.m_sizes, down_flag, True, False
            )
        if _ops.gated_activation_kernel_applies(saved.gate_up, act) and acc_dtype == torch.float32:
            backward_parts = _ops.gated_activation_backward_kernel(
                grad_activated, saved.gate_up, row_weights, act, concatenated
            )
        else:
            backward_parts = gated_activation_backward(grad_activated, saved.gate_up, row_weights, act, concatenated)
        grad_gate_up, weighted_activated, grad_row_weights = backward_parts
        del grad_activated, backward_parts

        if needs[1]:
            grad_pairs = grad_row_weights.index_select(0, saved.row_of_pair).view(ids.shape)
            if saved.down_bias is not None:
                # <grad_out[t], down_bias[e]> for every expert: [T, E], then each pair's expert.
                bias_dots = grad_out.to(acc_dtype) @ saved.down_bias.to(acc_dtype).T
                grad_pairs = grad_pairs + bias_dots.gather(1, ids.clamp(0, num_experts - 1))
            grads[1] = torch.where(valid_pair, grad_pairs, 0).to(top_k_weights.dtype)
        if needs[3] and grad_rows is None:
            grads[3] = _ops.call_below_autograd(
                _ops.gemm_op("grouped_mm_wgrad_gather", grad_out.device), weighted_activated, grad_out,
                saved.m_sizes, down_flag, None, saved.token_of_row,
            )  # fmt: skip
        elif needs[3]:
            _, grads[3] = _expert_gemm_backward(
                grad_rows, weighted_activated, saved.down_read, saved.m_sizes, down_flag, False, True
            )
        if needs[3] and ctx.weights_viewed[1]:
            grads[3] = grads[3].transpose(-1, -2)
        del weighted_activated
        if needs[5]:
            grads[5] = _bias_grad(
                saved.down_bias, saved.bias_row, (grad_rows * row_weights[:, None]).to(grad_rows.dtype)
            )
        del grad_rows

        if needs[4]:
            grads[4] = _bias_grad(saved.gate_up_bias, saved.bias_row, grad_gate_up)
        if needs[0]:
            grad_x_sorted, _ = _expert_gemm_backward(
                grad_gate_up, None, saved.gate_up_read, saved.m_sizes, gate_up_flag, True, False
            )
            grads[0] = _sum_token_rows(grad_x_sorted, saved.row_of_pair, ids, num_experts)
            del grad_x_sorted
        if needs[2] and gather_hidden:
            grads[2] = _ops.call_below_autograd(
                _ops.gemm_op("grouped_mm_wgrad_gather", grad_out.device), saved.hidden, grad_gate_up,
                saved.m_sizes, gate_up_flag, saved.token_of_row, None,
            )  # fmt: skip
        elif needs[2]:
            x_sorted = saved.hidden.index_select(0, saved.token_of_row)
            _, grads[2] = _expert_gemm_backward(
                grad_gate_up, x_sorted, saved.gate_up_read, saved.m_sizes, gate_up_flag, False, True
            )
        if needs[2] and ctx.weights_viewed[0]:
            grads[2] = grads[2].transpose(-1, -2)
        return tuple(grads)


# Names of the (gate, up, down) linear layers of one expert MLP: Llama/Qwen style, then Mixtral's w1, w3, w2.
EXPERT_LAYER_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _expert_layers(expert: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    for names in EXPERT_LAYER_NAMES:
        layers = [getattr(expert, name, None) for name in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return tuple(layers)
    return None


def is_expert_list(experts: nn.Module) -> bool:
    """Whether ``experts`` is a non-empty ``nn.ModuleList`` of gated MLPs of one type, which
    ``MoEExperts.from_modules`` stacks."""
    return (
        isinstance(experts, nn.ModuleList)
        and len(experts) > 0
        and len({type(expert) for expert in experts}) == 1
        and all(_expert_layers(expert) is not None and hasattr(expert, "act_fn") for expert in experts)
    )


def activation_name(act_fn: Callable) -> str | None:
    """The name in ``ACTIVATIONS`` of an activation module that ``experts_forward`` fuses, else None."""
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


def _check_module_input(module: nn.Module, hidden: torch.Tensor, parameter: torch.Tensor) -> None:
    """A module's parameters and its input must agree in dtype and device: say so in the module's terms."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    name = type(module).__name__
    if hidden.dtype != parameter.dtype:
        raise TypeError(
            f"{name} parameters are {parameter.dtype} but hidden is {hidden.dtype}: convert one of them, e.g. "
            f"module.to({hidden.dtype}) or hidden.to({parameter.dtype})"
        )
    if hidden.device != parameter.device:
        raise ValueError(f"{name} parameters are on {parameter.device} but hidden is on {hidden.device}")


class _StackedExperts(nn.Module):
    """What ``MoEExperts`` and ``moe_gemm.distributed.ExpertParallelExperts`` share: ``num_stacked`` experts' weights
    in Hugging Face's names and layouts, ``gate_up_proj [num_stacked, 2I, H]`` (``[gate; up]`` halves), ``down_proj
    [num_stacked, H, I]`` and with ``bias=True`` ``gate_up_proj_bias [num_stacked, 2I]`` and ``down_proj_bias
    [num_stacked, H]``, initialised as ``nn.Linear`` per expert; and the activation, a name of ``ACTIVATIONS`` or a
    callable applied as ``act(gate) * up``."""

    def __init__(
        self,
        num_stacked: int,
        hidden_size: int,
        intermediate_size: int,
        act: str | Callable[[torch.Tensor], torch.Tensor],
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ):
        super().__init__()
        if isinstance(act, str):
            check_activation_name(act)
        elif not callable(act):
            raise TypeError(f"act must be one of {tuple(ACTIVATIONS)} or a callable, got {type(act).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act = act
        self.gate_up_proj = nn.Parameter(torch.empty(num_stacked, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_stacked, hidden_size, intermediate_size, **factory))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_stacked, 2 * intermediate_size, **factory))
            self.down_proj_bias = nn.Parameter(torch.empty(num_stacked, hidden_size, **factory))
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

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def _layer_act(self) -> str | Callable[[torch.Tensor], torch.Tensor]:
        """``act`` as ``experts_forward`` takes it: a name, or the callable on the whole ``[rows, 2I]``."""
        return self.act if isinstance(self.act, str) else self._apply_gate

    def _experts_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``experts_forward`` over the stacked experts, ``top_k_index`` counting from the first of them."""
        return experts_forward(
            hidden,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            act=self._layer_act(),
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=self.down_proj_bias,
        )

    def _sizes_repr(self) -> str:
        act = repr(self.act) if isinstance(self.act, str) else type(self.act).__name__
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, act={act}, "
            f"bias={self.down_proj_bias is not None}"
        )


class MoEExperts(_StackedExperts):
    """Expert weights in Hugging Face's names and layouts; ``forward(hidden, top_k_index, top_k_weights)``.

    ``gate_up_proj [E, 2I, H]`` (``[gate; up]`` halves), ``down_proj [E, H, I]``, and with ``bias=True``
    ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``. Initialised as ``nn.Linear`` per expert. The sizes
    are keyword-only, as in ``MoE``. ``act`` is a name of ``ACTIVATIONS`` (fused), or an elementwise activation (a
    callable such as an ``nn.Module``) applied as ``act(gate) * up`` by PyTorch ops. ``from_modules`` stacks an
    ``nn.ModuleList`` of expert MLPs.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(num_experts, hidden_size, intermediate_size, act, bias, device, dtype)
        self.num_experts = num_experts

    @classmethod
    def from_modules(cls, experts: nn.ModuleList) -> "MoEExperts":
        """The experts of an ``nn.ModuleList`` of gated MLPs, stacked (copies; ``experts`` is left as it is).

        Each expert has ``gate_proj``, ``up_proj`` and ``down_proj`` (or Mixtral's ``w1``, ``w3``, ``w2``), all
        ``nn.Linear``, and an ``act_fn``; all experts are of one type. Biases (in all three layers or in none) become
        ``gate_up_proj_bias`` and ``down_proj_bias``. The stacked parameters take the device, dtype and
        ``requires_grad`` of the experts' layers. An ``act_fn`` that ``experts_forward`` does not fuse is kept and
        applied as the experts did, ``act_fn(gate) * up``.
        """
        if not is_expert_list(experts):
            raise ValueError("experts must be an nn.ModuleList of gated MLPs (gate/up/down nn.Linear and an act_fn)")
        layers = [_expert_layers(expert) for expert in experts]
        gate, _, down = layers[0]
        has_bias = [layer.bias is not None for layer in layers[0]]
        for index, expert_layers in enumerate(layers):
            expert_has_bias = [layer.bias is not None for layer in expert_layers]
            if any(expert_has_bias) and not all(expert_has_bias):
                raise ValueError("MoEExperts.from_modules needs biases in all three layers of an expert or in none")
            if expert_has_bias != has_bias:
                raise ValueError(
                    f"MoEExperts.from_modules needs biases in every expert or in none: expert 0 has "
                    f"{'them' if all(has_bias) else 'none'}, expert {index} "
                    f"{'has them' if all(expert_has_bias) else 'has none'}"
                )
        act_fn = experts[0].act_fn
        # Built on the meta device: the parameters are replaced by the stacked weights below.
        module = cls(
            num_experts=len(experts),
            hidden_size=gate.in_features,
            intermediate_size=gate.out_features,
            act=activation_name(act_fn) or act_fn,
            bias=all(has_bias),
            device="meta",
            dtype=gate.weight.dtype,
        )
        with torch.no_grad():
            gate_up = torch.stack([torch.cat([g.weight, u.weight]) for g, u, _ in layers])
            module.gate_up_proj = nn.Parameter(gate_up, requires_grad=gate.weight.requires_grad)
            module.down_proj = nn.Parameter(torch.stack([d.weight for _, _, d in layers]), down.weight.requires_grad)
            if all(has_bias):
                gate_up_bias = torch.stack([torch.cat([g.bias, u.bias]) for g, u, _ in layers])
                module.gate_up_proj_bias = nn.Parameter(gate_up_bias, requires_grad=gate.bias.requires_grad)
                down_bias = torch.stack([d.bias for _, _, d in layers])
                module.down_proj_bias = nn.Parameter(down_bias, requires_grad=down.bias.requires_grad)
        return module

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        _check_module_input(self, hidden, self.gate_up_proj)
        return self._experts_forward(hidden, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self._sizes_repr()}"


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

    The sizes are keyword-only (``MoE(hidden_size=..., num_experts=..., intermediate_size=..., top_k=...)``), as in
    ``MoEExperts``. ``forward(hidden [..., H])`` returns the same shape and dtype; ``hidden`` must have the dtype and
    device of the parameters. ``scoring``, ``renormalize``, ``n_group``, ``topk_group`` and
    ``routed_scaling_factor`` are passed to ``route``; ``scoring="sigmoid"`` adds the buffer
    ``e_score_correction_bias [E]`` (zeros). ``shared_intermediate_size`` adds ``shared_expert``, a ``GatedMLP``
    applied to every token and added to the routed output.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        intermediate_size: int,
        top_k: int,
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
        # What route would refuse at the first forward, refused here (with route's messages).
        _validation.check_route_options(num_experts, top_k, scoring, n_group, topk_group)
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
        self.experts = MoEExperts(
            num_experts=num_experts,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            act=act,
            bias=expert_bias,
            **factory,
        )
        self.shared_expert = (
            None
            if shared_intermediate_size is None
            else GatedMLP(hidden_size, shared_intermediate_size, act=act, **factory)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # FP8 experts (MoEExpertsFP8) take hidden in the router's dtype, the layer's.
        weight = self.experts.gate_up_proj
        _check_module_input(self, hidden, self.router.weight if weight.dtype == torch.float8_e4m3fn else weight)
        hidden_size = self.experts.hidden_size
        if hidden.dim() == 0 or hidden.shape[-1] != hidden_size:
            raise ValueError(
                f"hidden: expected shape [..., H] with H = {hidden_size} (MoE hidden_size), got {tuple(hidden.shape)}"
            )
        tokens = hidden.reshape(-1, hidden_size)
        router_bias = None if self.router.bias is None else self.router.bias.float()
        logits = F.linear(tokens.float(), self.router.weight.float(), router_bias)
        weights, ids = route(
            logits, self.top_k, e_score_correction_bias=self.e_score_correction_bias, **self.route_options
        )
        out = self.experts(tokens, ids, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(hidden.shape)
