"""The gated activations of the MoE layer, in PyTorch ops: ``act(gate) * up`` of a ``[rows, 2I]`` gate_up.

One definition for the layer (``moe_gemm.layer``) and for the PyTorch path of the fused op ``grouped_mm_gated``
(``moe_gemm._ops``, which must not import the layer). Each op rounds to the element type as PyTorch's ops do:
``act(gate)`` is rounded, then the product; the CUDA kernels (the separate one and the GEMM epilogue) round the same.
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
