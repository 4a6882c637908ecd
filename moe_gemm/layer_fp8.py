"""The experts layer with FP8 expert weights, for inference: ``experts_forward_fp8``.

The weights are float8_e4m3fn with float32 scales, one per 128 x 128 block (as DeepSeek-V3's checkpoints and
transformers' fine-grained FP8 store them) or one per output channel; the activations are quantized on the fly, one
scale per row and 128 columns, as transformers' "dynamic" activation scheme does. One forward:

1. ``hidden [T, H]`` is quantized once (``quantize_fp8``): T rows, not T * k, since a token's rows are all copies;
2. the pairs are sorted by expert, and each row's fp8 values and scales gathered from its token's;
3. the gate/up GEMM (``grouped_forward_fp8``) writes the hidden dtype, and the gated activation follows;
4. the activation is quantized per row and 128 columns for the down GEMM;
5. each token's rows are summed with their routing weights in float32, in slot order (``combine_pairs``).

E.g. DeepSeek-V3 (H = 7168, I = 2048, top-8): the up GEMM reads 7168 / 128 = 56 scales per row and 16 x 56 per
expert's gate/up block grid. No backward: FP8 training is not supported, and inputs that require gradients under
grad mode raise.
"""

from collections.abc import Callable

import torch

from moe_gemm import _ops, _validation
from moe_gemm.dispatch import combine_pairs, sort_pairs, valid_pairs
from moe_gemm.functional import grouped_forward_fp8, quantize_fp8
from moe_gemm.layer import _check_activation_name, gated_activation


def experts_forward_fp8(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
    *,
    act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
    weight_transposed: bool = False,
    concatenated: bool = True,
) -> torch.Tensor:
    """``experts_forward`` of FP8 experts: ``out[t] = sum_j w[t, j] * expert_{id[t, j]}(hidden[t])``, ``[T, H]``.

    Args:
        hidden: ``[T, H]`` bfloat16, float16 or float32; the output's dtype, and that of the GEMMs' outputs.
        top_k_index, top_k_weights: ``[T, k]``, as for ``experts_forward`` (ids outside ``[0, E)`` add nothing).
        gate_up_proj, down_proj: float8_e4m3fn ``[E, 2I, H]`` and ``[E, H, I]`` (``[E, H, 2I]`` and ``[E, I, H]``
            when ``weight_transposed``).
        gate_up_proj_scale, down_proj_scale: their float32 scales, ``grouped_forward_fp8``'s ``weight_scale``:
            one per 128 x 128 block (``[E, ceil(2I / 128), ceil(H / 128)]`` and ``[E, ceil(H / 128), ceil(I / 128)]``)
            or per output channel (``[E, 2I]`` and ``[E, H]``).
        act, concatenated: as for ``experts_forward``; a callable maps the ``[rows, 2I]`` gate/up output (in the
            dtype of ``hidden``) to the ``[rows, I]`` input of the down projection.

    Returns:
        ``[T, H]`` in the dtype of ``hidden``.

    Raises:
        TypeError, ValueError: for arguments that do not fit (``grouped_forward_fp8``'s checks name the weight);
        ValueError for an input that requires gradients while grad mode is on.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D tensor [T, H], got {_describe(hidden)}")
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"hidden: expected torch.bfloat16, torch.float16 or torch.float32, got {hidden.dtype}")
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"top_k_index: expected [T, k] with T = {hidden.shape[0]} (hidden's rows), got {_describe(top_k_index)}"
        )
    if not isinstance(top_k_weights, torch.Tensor) or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights: expected the shape of top_k_index {tuple(top_k_index.shape)}, "
            f"got {_describe(top_k_weights)}"
        )
    if isinstance(act, str):
        _check_activation_name(act)
    _validation.check_no_grad("experts_forward_fp8", {"hidden": hidden, "top_k_weights": top_k_weights})
    num_experts, top_k = gate_up_proj.shape[0], top_k_index.shape[1]

    hidden_fp8, hidden_scale = quantize_fp8(hidden)
    if _ops.dispatch_kernel_applies(top_k_index, num_experts):
        m_sizes, _, _, token_of_row, row_of_pair = _ops.dispatch_kernel(top_k_index, num_experts)
    else:
        m_sizes, _, pair_of_row, row_of_pair, _ = sort_pairs(top_k_index, num_experts)
        token_of_row = pair_of_row // max(top_k, 1)
    # fp8 rows are gathered as bytes: index_select has no float8 kernel on every device.
    x_fp8 = hidden_fp8.view(torch.uint8).index_select(0, token_of_row).view(torch.float8_e4m3fn)
    x_scale = hidden_scale.index_select(0, token_of_row)
    fp8 = {"weight_transposed": weight_transposed, "out_dtype": hidden.dtype}
    gate_up = grouped_forward_fp8(x_fp8, x_scale, gate_up_proj, gate_up_proj_scale, m_sizes, **fp8)
    activated = gated_activation(gate_up, act, concatenated) if isinstance(act, str) else act(gate_up)
    del gate_up
    activated_fp8, activated_scale = quantize_fp8(activated)
    del activated
    y_sorted = grouped_forward_fp8(activated_fp8, activated_scale, down_proj, down_proj_scale, m_sizes, **fp8)
    if _ops.combine_kernel_applies(y_sorted, top_k_weights, top_k_index):
        return _ops.combine_kernel(y_sorted, row_of_pair, top_k_weights, top_k_index, num_experts)
    return combine_pairs(y_sorted, row_of_pair, valid_pairs(top_k_index, num_experts), top_k_weights)


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
