"""The gated activations of the MoE layer, in PyTorch ops: ``act(gate) * up`` of a ``[rows, 2I]`` gate_up, and its
backward.

One definition for the layer (``moe_gemm.layer``) and for the PyTorch paths of the fused ops ``grouped_mm_gated`` and
``grouped_mm_gated_backward`` (``moe_gemm._ops``, which must not import the layer). Each op rounds to the element
type as PyTorch's ops do: ``act(gate)`` is rounded, then the product; the CUDA kernels (the separate ones and the GEMM
epilogues) round the same.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,  # SwiGLU
    "gelu": F.gelu,  # GeGLU with the exact (erf) GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GeGLU with the tanh approximation
}


def check_activation_name(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(ACTIVATIONS)} or a callable, got {act!r}")


def split_gate_up(gate_up: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_up.chunk(2, dim=-1) if concatenated else (gate_up[:, 0::2], gate_up[:, 1::2])


def gated_activation(gate_up: torch.Tensor, act: str = "silu", concatenated: bool = True) -> torch.Tensor:
    """``act(gate) * up`` of ``[rows, 2I]``, returning ``[rows, I]``.

    ``concatenated``: the columns are ``[gate; up]`` halves; otherwise interleaved ``gate0, up0, gate1, up1, ...``.
    """
    check_activation_name(act)
    gate, up = split_gate_up(gate_up, concatenated)
    return ACTIVATIONS[act](gate) * up


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
    the same in one CUDA kernel that writes no float32 ``[rows, I]`` tensor, and the op ``grouped_mm_gated_backward``
    in the epilogue of the GEMM that computes ``grad_activated``.
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
