"""The public GEMM entry points, ``grouped_forward`` and ``grouped_weight_grad`` (the weight gradient on its own, for
trainers that keep float32 main-grads), their FP8 forms ``grouped_forward_fp8`` and ``quantize_fp8``, and the MoE
layer's private ones, ``_expert_gemm`` and ``_expert_gemm_backward``. All validate their inputs, then call their op
(``moe_gemm::grouped_mm*``, ``moe_gemm::quantize_fp8``), or its PyTorch path where the CUDA kernels cannot run on the
device (``_ops.kernels_available``)."""

import os

import torch

from moe_gemm import _ops, _validation
from moe_gemm._ops import call_below_autograd, grouped_mm_backward


def _kernels_for(x) -> bool:
    """Whether ``x`` is a CUDA tensor whose device runs the kernels (warns once where the GPU is not sm_90)."""
    return isinstance(x, torch.Tensor) and x.is_cuda and _ops.use_kernels(x.device)


def _check_sizes_if_asked(m_sizes: torch.Tensor, num_rows: int) -> None:
    # MOE_GEMM_CHECK=1 (a documented debug switch) reads the sizes on the host: eager mode only, a torch.compile trace
    # does not have their values.
    if not torch.compiler.is_compiling() and os.environ.get("MOE_GEMM_CHECK") == "1":
        _validation.check_sizes_on_host(m_sizes, num_rows)


def grouped_forward(
    x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, *, weight_transposed: bool = False
) -> torch.Tensor:
    """Grouped GEMM of MoE experts: ``y[rows of e] = x[rows of e] @ W[e].T`` (``@ W[e]`` when ``weight_transposed``).

    Args:
        x: ``[M, K]`` bfloat16 or float16 (any float on the PyTorch path), rows grouped by expert in expert
            order: expert ``e`` owns rows ``[offs[e], offs[e] + m_sizes[e])``, ``offs`` the exclusive prefix sum.
        weight: ``[E, N, K]`` (``nn.Linear`` layout), or ``[E, K, N]`` when ``weight_transposed``. Read in place. A
            weight whose memory is the other layout (``stride(-2) == 1``, e.g. ``w.transpose(-1, -2)`` of a
            contiguous ``w``) is read through its transposed view with the flag flipped, never copied.
        m_sizes: ``[E]`` int32 or int64 rows per expert, on the device of ``x`` (the CUDA path never syncs on it).
            Negative sizes count as 0 and rows at or past ``M`` are dropped; with ``MOE_GEMM_CHECK=1`` in the
            environment both raise ValueError instead (this reads the sizes on the host).

    Returns:
        ``[M, N]`` in the dtype of ``x``; rows past ``sum(m_sizes)`` are zero. Differentiable in ``x`` and ``weight``.

    On a CUDA GPU that is not sm_90 (the kernels are built for sm_90a only), the PyTorch path runs, with one warning
    per process.
    """
    kernels = _kernels_for(x)
    weight, weight_transposed = _validation.validate(x, weight, m_sizes, weight_transposed, cuda_kernel=kernels)
    m_sizes = m_sizes.contiguous()
    _check_sizes_if_asked(m_sizes, x.shape[0])
    if torch.compiler.is_compiling() and _ops.gemm_op("grouped_mm", x.device) is not _ops.grouped_mm_torch:
        # The op itself: its fake kernel and registered autograd let the trace see through it.
        return torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, weight_transposed)
    return _grouped_mm_eager(x, weight, m_sizes, weight_transposed)


class _GroupedMM(torch.autograd.Function):
    """``moe_gemm::grouped_mm`` with the backward of ``_ops.grouped_mm_backward``, in one thin Function: eager calls
    pay for one autograd node rather than the op's generated Function around a Python redispatch.

    ``forward`` takes ``ctx`` (no ``setup_context``) on purpose: for Functions with ``setup_context``, ``apply``
    binds default arguments through ``inspect.signature`` on every call, which costs more than the rest. (The op's
    generated Function has no ``setup_context`` either: torch.func transforms refuse both alike.)
    """

    @staticmethod
    def forward(ctx, x, weight, m_sizes, weight_transposed):
        _ops.grouped_mm_setup_context(ctx, (x, weight, m_sizes, weight_transposed), None)
        return call_below_autograd(_ops.gemm_op("grouped_mm", x.device), x, weight, m_sizes, weight_transposed)

    @staticmethod
    def backward(ctx, grad_y):
        return _ops.grouped_mm_autograd_backward(ctx, grad_y)


def _grouped_mm_eager(x, weight, m_sizes, weight_transposed):
    """``moe_gemm::grouped_mm`` on validated arguments (``weight`` with unit inner stride, ``m_sizes`` contiguous),
    in eager mode: the kernel directly when no gradient is wanted, ``_GroupedMM`` otherwise."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _GroupedMM.apply(x, weight, m_sizes, weight_transposed)
    return call_below_autograd(_ops.gemm_op("grouped_mm", x.device), x, weight, m_sizes, weight_transposed)


def grouped_weight_grad(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    weight_transposed: bool = False,
    main_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight gradient of ``grouped_forward``: ``grad_W[e] = grad_y_e.T @ x_e`` (``x_e.T @ grad_y_e`` when
    ``weight_transposed``), shaped like the weight, float32 sums over each expert's rows.

    Args:
        x: ``[M, K]``, the forward input, rows grouped by expert as for ``grouped_forward``.
        grad_y: ``[M, N]``, the gradient of the forward output.
        m_sizes: ``[E]`` rows per expert on the device of ``x`` (never read on the host by the CUDA path).
        main_grad: optional float32 ``[E, N, K]`` (``[E, K, N]``) buffer: the gradient is added into it in place
            (``main_grad += grad_W``) and it is returned, as trainers that keep float32 gradients want.

    Returns:
        ``grad_W`` in the dtype of ``x``, or ``main_grad``. Experts without rows get exact zeros (add nothing).
    """
    kernels = _kernels_for(x)
    _validation.check_wgrad_inputs(x, grad_y, m_sizes, weight_transposed, main_grad, cuda_kernel=kernels)
    grad_y, m_sizes = grad_y.contiguous(), m_sizes.contiguous()
    if main_grad is None:
        return _ops.gemm_op("grouped_mm_wgrad", x.device)(x, grad_y, m_sizes, weight_transposed)
    _ops.gemm_op("grouped_mm_wgrad_accumulate_", x.device)(main_grad, x, grad_y, m_sizes, weight_transposed)
    return main_grad


def grouped_forward_fp8(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    weight_transposed: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``grouped_forward`` of FP8 operands: ``y[rows of e] = X[rows of e] @ W[e].T`` (``@ W[e]`` when
    ``weight_transposed``) for the dequantized ``X = x * x_scale`` and ``W = weight * weight_scale``, each scale
    repeated over the elements it covers; float32 accumulation.

    Args:
        x: ``[M, K]`` float8_e4m3fn, rows grouped by expert as for ``grouped_forward``.
        x_scale: float32, ``[M, ceil(K / 128)]``: ``x_scale[r, c // 128]`` scales ``x[r, c]`` (the last group of a row
            partial when 128 does not divide K), as ``quantize_fp8(x_high)`` gives; or ``[M]``, one per row.
        weight: ``[E, N, K]`` float8_e4m3fn, or ``[E, K, N]`` when ``weight_transposed``. As for ``grouped_forward``,
            a weight whose memory is the other layout is read through its transposed view, with its block scales.
        weight_scale: float32, ``[E, ceil(N / 128), ceil(K / 128)]``: one per 128 x 128 block, ``weight_scale[e, i //
            128, j // 128]`` scaling ``weight[e, i, j]`` (DeepSeek-V3's ``weight_scale_inv``). The block dims follow
            the weight's, so ``[E, ceil(K / 128), ceil(N / 128)]`` when ``weight_transposed``: the transposes of a
            weight and its scales describe the same matrices. Or ``[E, N]``, one per output channel, in both layouts.
            Either granularity goes with either of ``x_scale``'s.
        m_sizes: ``[E]`` int32 or int64 on the device of ``x``; negative sizes count as 0, rows at or past ``M`` are
            dropped (``MOE_GEMM_CHECK=1`` raises instead), as for ``grouped_forward``.
        out_dtype: torch.bfloat16, torch.float16 or torch.float32.

    Returns:
        ``[M, N]`` in ``out_dtype``; rows past ``sum(m_sizes)`` are zero, whatever ``x`` and ``x_scale`` hold there.
        Not differentiable (FP8 experts train through ``experts_forward_fp8``): an argument that requires grad
        while grad mode is on raises ValueError, rather than a result silently cut off from the graph.

    On an sm_90 GPU with the kernels built, ``[E, N, K]`` weights with a bf16 output run the FP8 CUDA kernel, with
    rowwise scales (``x_scale [M]``, ``weight_scale [E, N]``) or blockwise weight scales (either ``x_scale``); the
    other cases, and every other device, run PyTorch ops (dequantized per expert to float32, a host read of the
    sizes).
    """
    weight, weight_scale, weight_transposed = _validation.validate_fp8(
        x, x_scale, weight, weight_scale, m_sizes, weight_transposed, out_dtype
    )
    inputs = {"x": x, "x_scale": x_scale, "weight": weight, "weight_scale": weight_scale}
    _validation.check_no_grad("grouped_forward_fp8", inputs)
    # The scales are 1/128 of the operands or less: a copy of strided ones costs little.
    x_scale, weight_scale, m_sizes = x_scale.contiguous(), weight_scale.contiguous(), m_sizes.contiguous()
    _check_sizes_if_asked(m_sizes, x.shape[0])
    op = _ops.gemm_op("grouped_mm_fp8", x.device)
    return call_below_autograd(op, x, x_scale, weight, weight_scale, m_sizes, weight_transposed, out_dtype)


def quantize_fp8(x: torch.Tensor, group: int | None = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, x_scale)``: ``x [M, K]`` (any float dtype) in float8_e4m3fn and its float32 scales, the inputs of
    ``grouped_forward_fp8``: ``x ~= x_fp8 * x_scale`` per element, within half a step of e4m3 (3 mantissa bits: a
    relative error of at most 2**-4, or 2**-10 * scale for the values that land among its subnormals).

    ``group`` 128: ``x_scale [M, ceil(K / 128)]``, one scale per row and 128 columns; None: ``x_scale [M]``, one per
    row. A group's scale is its amax / 448 (e4m3's largest value), so its largest value becomes +-448; a group whose
    amax is below 448 * 1.2e-38 (all zeros) gets the smallest normal float32, 1.2e-38, never 0, inf or NaN. The values
    are not checked (that would read them on the host): a NaN or +-inf in a group makes its scale NaN or inf, and the
    whole group dequantizes, and multiplies, as NaN. No backward: ``x`` requiring grad while grad mode is on raises
    ValueError.
    """
    _validation.check_quantize_fp8(x, group)
    _validation.check_no_grad("quantize_fp8", {"x": x})
    return call_below_autograd(_ops.gemm_op("quantize_fp8", x.device), x, group)


def _expert_gemm(x, weight, m_sizes, weight_transposed, *, x_name="x", weight_name="weight", gather_rows=None):
    """Validated forward, below autograd: returns ``(y, weight_read, weight_transposed_read)``; a weight whose memory
    is the other layout is read through its transposed view (``weight_read`` is that view). Errors name ``x_name``
    and ``weight_name``. Takes the PyTorch path where ``_ops.kernels_available(x.device)`` is False. With
    ``gather_rows``, the GEMM's rows are ``x[gather_rows]``, read in place (``grouped_mm_gather``)."""
    kernels = _kernels_for(x)
    weight_read, flag = _validation.validate(
        x, weight, m_sizes, weight_transposed, cuda_kernel=kernels, x_name=x_name, weight_name=weight_name
    )
    m_sizes = m_sizes.contiguous()
    if gather_rows is None:
        _check_sizes_if_asked(m_sizes, x.shape[0])
        y = call_below_autograd(_ops.gemm_op("grouped_mm", x.device), x, weight_read, m_sizes, flag)
    else:
        _check_sizes_if_asked(m_sizes, gather_rows.shape[0])
        y = call_below_autograd(_ops.gemm_op("grouped_mm_gather", x.device), x, gather_rows, weight_read, m_sizes, flag)
    return y, weight_read, flag


def _expert_gemm_gated(
    x, weight, m_sizes, weight_transposed, act, concatenated, write_pre_activation, *, gather_rows=None, **names
):
    """``_expert_gemm`` of the up-projection with its gated activation in the GEMM's epilogue
    (``grouped_mm_gated``): returns ``(activated, gate_up or None, weight_read, weight_transposed_read)``, the same bits
    as ``_expert_gemm`` followed by ``_ops.gated_activation_kernel``. For CUDA inputs whose device runs the kernels
    (``gated_gemm_applies``)."""
    kernels = _kernels_for(x)
    weight_read, flag = _validation.validate(x, weight, m_sizes, weight_transposed, cuda_kernel=kernels, **names)
    m_sizes = m_sizes.contiguous()
    _check_sizes_if_asked(m_sizes, x.shape[0] if gather_rows is None else gather_rows.shape[0])
    activated, gate_up = call_below_autograd(
        torch.ops.moe_gemm.grouped_mm_gated.default, x, gather_rows, weight_read, m_sizes, flag, act, concatenated,
        write_pre_activation,
    )  # fmt: skip
    return activated, gate_up, weight_read, flag


def gated_gemm_applies(x: torch.Tensor, act) -> bool:
    """Whether the layer's up-projection can run ``grouped_mm_gated`` (the activation in the GEMM's epilogue): a named
    activation on 16-bit CUDA rows whose device runs the kernels."""
    return (
        _ops.GATED_KERNEL_BUILT and _kernels_for(x) and x.dtype in (torch.bfloat16, torch.float16)
        and act in _ops.ACTIVATIONS
    )  # fmt: skip


def _expert_gemm_backward(grad_y, x, weight_read, m_sizes, weight_transposed_read, needs_grad_x, needs_grad_w):
    """``(grad_x, grad_w)`` of ``y = _expert_gemm(...)[0]``; None where not needed. ``grad_w`` is the gradient of
    ``weight_read`` (transpose it back for a weight that was read through its transposed view)."""
    return grouped_mm_backward(
        grad_y, x, weight_read, m_sizes.contiguous(), weight_transposed_read, needs_grad_x, needs_grad_w
    )
