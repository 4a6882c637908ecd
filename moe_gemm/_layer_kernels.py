"""The MoE layer's small CUDA kernels (``csrc/moe_layer_kernels.cu``) and when they apply.

``moe_gemm._C`` binds three private ops (``csrc/moe_layer_torch.cpp``):

- ``_dispatch_kernel(ids [T, k] int64, E)``: a stable counting sort of the pairs by expert in one launch, the same
  layout as ``dispatch.sort_pairs`` (which takes about ten PyTorch ops);
- ``_gated_activation_kernel(gate_up, act, concatenated)``: ``act(gate) * up`` in one pass;
- ``_combine_kernel(y, row_of_pair, weights, ids, E)``: the weighted sum of each token's rows, float32, slot order.

``experts_forward``'s eager path (``layer._FusedExperts``) calls them for CUDA tensors when the extension is built; the
functions here check what the kernels' bindings would refuse first, so that those are only handed arguments they
take. Everywhere else (CPU, ``torch.compile``, unusual dtypes or sizes) the PyTorch ops run.
"""

import torch

# Loads moe_gemm._C first, whose library fragment defines the kernels' ops.
from moe_gemm import _ops  # noqa: F401

# As csrc/moe_layer_kernels.h: (warps + 1) * (E + 1) int32 counters in 46 KB of shared memory.
DISPATCH_MAX_EXPERTS = 46 * 1024 // 4 // 2 - 1
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # as csrc/moe_layer_torch.cpp reads them
_INT32_MAX = 2**31 - 1


def _defined_by_extension() -> bool:
    try:
        torch.ops.moe_gemm._dispatch_kernel  # noqa: B018  (the lookup raises when no library defined the op)
    except (AttributeError, RuntimeError):
        return False
    return True


LAYER_KERNELS_BUILT = _defined_by_extension()


def dispatch_kernel_applies(ids: torch.Tensor, num_experts: int) -> bool:
    return (
        LAYER_KERNELS_BUILT
        and ids.is_cuda
        and not torch.compiler.is_compiling()
        and 0 <= num_experts <= DISPATCH_MAX_EXPERTS
        and ids.numel() <= _INT32_MAX
        and (ids.shape[1] >= 1 or ids.shape[0] == 0)
    )


def dispatch_pairs(ids: torch.Tensor, num_experts: int):
    """``(m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair)`` of ``ids [T, k]``, all int64, as
    ``dispatch.sort_pairs`` computes them (plus ``token_of_row = pair_of_row // k``); where
    ``dispatch_kernel_applies``."""
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    return torch.ops.moe_gemm._dispatch_kernel(ids, num_experts)


def activation_kernel_applies(gate_up: torch.Tensor, act: str) -> bool:
    return (
        LAYER_KERNELS_BUILT
        and gate_up.is_cuda
        and gate_up.dim() == 2
        and gate_up.dtype in KERNEL_DTYPES
        and gate_up.shape[1] % 16 == 0
        and gate_up.is_contiguous()
        and act in ACTIVATION_CODES
    )


def gated_activation(gate_up: torch.Tensor, act: str, concatenated: bool) -> torch.Tensor:
    """``act(gate) * up`` of ``[rows, 2I]``, ``[rows, I]``; where ``activation_kernel_applies``."""
    return torch.ops.moe_gemm._gated_activation_kernel(gate_up, ACTIVATION_CODES[act], concatenated)


def combine_kernel_applies(y_sorted: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> bool:
    return (
        LAYER_KERNELS_BUILT
        and y_sorted.is_cuda
        and y_sorted.dim() == 2
        and y_sorted.dtype in KERNEL_DTYPES
        and weights.dtype in KERNEL_DTYPES
        and y_sorted.shape[1] % 8 == 0
        and y_sorted.is_contiguous()
        and weights.device == y_sorted.device
        and ids.device == y_sorted.device
        and ids.shape[0] <= _INT32_MAX
    )


def combine(
    y_sorted: torch.Tensor, row_of_pair: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """``out[t] = sum_j [0 <= ids[t, j] < E] * weights[t, j] * y_sorted[row_of_pair[t * k + j]]`` in float32, ``[T, H]``
    in the dtype of ``y_sorted``; where ``combine_kernel_applies``."""
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    return torch.ops.moe_gemm._combine_kernel(y_sorted, row_of_pair, weights.contiguous(), ids, num_experts)
