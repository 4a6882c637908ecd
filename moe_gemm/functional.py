"""The public GEMM entry points, ``grouped_forward`` and ``grouped_weight_grad`` (the weight gradient on its own, for
trainers that keep float32 main-grads), and the MoE layer's private ones, ``_expert_gemm`` and
``_expert_gemm_backward``. All validate their inputs, then call ``moe_gemm::grouped_mm*``, or the PyTorch path where
the CUDA kernels cannot run on the device (``_ops.kernels_available``)."""

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


def _expert_gemm_backward(grad_y, x, weight_read, m_sizes, weight_transposed_read, needs_grad_x, needs_grad_w):
    """``(grad_x, grad_w)`` of ``y = _expert_gemm(...)[0]``; None where not needed. ``grad_w`` is the gradient of
    ``weight_read`` (transpose it back for a weight that was read through its transposed view)."""
    return grouped_mm_backward(
        grad_y, x, weight_read, m_sizes.contiguous(), weight_transposed_read, needs_grad_x, needs_grad_w
    )
