"""The public entry points: ``grouped_forward`` (validates its inputs and calls ``moe_gemm::grouped_mm``) and
``grouped_weight_grad`` (the weight gradient on its own, for trainers that keep float32 main-grads)."""

import os

import torch

from moe_gemm import _ops, _validation
from moe_gemm._ops import call_below_autograd, grouped_mm_backward


def grouped_forward(
    x: torch.Tensor, weight: torch.Tensor, m_sizes: torch.Tensor, *, weight_transposed: bool = False
) -> torch.Tensor:
    """Grouped GEMM of MoE experts: ``y[rows of e] = x[rows of e] @ W[e].T`` (``@ W[e]`` when ``weight_transposed``).

    Args:
        x: ``[M, K]`` bfloat16 or float16 (any float on the pure-PyTorch path), rows grouped by expert in expert
            order: expert ``e`` owns rows ``[offs[e], offs[e] + m_sizes[e])``, ``offs`` the exclusive prefix sum.
        weight: ``[E, N, K]`` (``nn.Linear`` layout), or ``[E, K, N]`` when ``weight_transposed``. Read in place. A
            weight whose memory is the other layout (``stride(-2) == 1``, e.g. ``w.transpose(-1, -2)`` of a
            contiguous ``w``) is read through its transposed view with the flag flipped, never copied.
        m_sizes: ``[E]`` int32 or int64 rows per expert, on the device of ``x`` (the CUDA path never syncs on it).
            Negative sizes count as 0 and rows at or past ``M`` are dropped; with ``MOE_GEMM_CHECK=1`` in the
            environment both raise ValueError instead (this reads the sizes on the host).

    Returns:
        ``[M, N]`` in the dtype of ``x``; rows past ``sum(m_sizes)`` are zero. Differentiable in ``x`` and ``weight``.
    """
    cuda_kernel = isinstance(x, torch.Tensor) and x.is_cuda and _ops.cuda_available()
    weight, weight_transposed = _validation.validate(x, weight, m_sizes, weight_transposed, cuda_kernel=cuda_kernel)
    m_sizes = m_sizes.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes, weight_transposed)
    # The check needs the sizes' values, which a torch.compile trace does not have: it runs in eager mode only.
    if os.environ.get("MOE_GEMM_CHECK") == "1":
        _validation.check_sizes_on_host(m_sizes, x.shape[0])
    return grouped_mm_eager(x, weight, m_sizes, weight_transposed)


class _GroupedMM(torch.autograd.Function):
    """``moe_gemm::grouped_mm`` with the backward of ``_ops._backward``, in one thin Function: eager calls pay for
    one autograd node rather than the op's generated Function around a Python redispatch.

    ``forward`` takes ``ctx`` (no ``setup_context``) on purpose: for Functions with ``setup_context``, ``apply``
    binds default arguments through ``inspect.signature`` on every call, which costs more than the rest. (The op's
    generated Function has no ``setup_context`` either: torch.func transforms refuse both alike.)
    """

    @staticmethod
    def forward(ctx, x, weight, m_sizes, weight_transposed):
        needs_grad_x, needs_grad_w = ctx.needs_input_grad[:2]
        # grad_x reads the weight, grad_W reads x: keep only what the requested gradients need.
        ctx.save_for_backward(x if needs_grad_w else None, weight if needs_grad_x else None, m_sizes)
        ctx.weight_transposed = weight_transposed
        return call_below_autograd(torch.ops.moe_gemm.grouped_mm.default, x, weight, m_sizes, weight_transposed)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, m_sizes = ctx.saved_tensors
        grad_x, grad_w = grouped_mm_backward(
            grad_y, x, weight, m_sizes, ctx.weight_transposed, *ctx.needs_input_grad[:2]
        )
        return grad_x, grad_w, None, None


def grouped_mm_eager(x, weight, m_sizes, weight_transposed):
    """``moe_gemm::grouped_mm`` on validated arguments (``weight`` with unit inner stride, ``m_sizes`` contiguous),
    in eager mode: the op's kernel directly when no gradient is wanted, ``_GroupedMM`` otherwise."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _GroupedMM.apply(x, weight, m_sizes, weight_transposed)
    return call_below_autograd(torch.ops.moe_gemm.grouped_mm.default, x, weight, m_sizes, weight_transposed)


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
    _check_weight_grad_inputs(x, grad_y, m_sizes, weight_transposed, main_grad)
    grad_y = grad_y.contiguous()
    if main_grad is None:
        return torch.ops.moe_gemm.grouped_mm_wgrad(x, grad_y, m_sizes.contiguous(), weight_transposed)
    torch.ops.moe_gemm.grouped_mm_wgrad_accumulate_(main_grad, x, grad_y, m_sizes.contiguous(), weight_transposed)
    return main_grad


def _check_weight_grad_inputs(x, grad_y, m_sizes, weight_transposed, main_grad) -> None:
    """Everything the CUDA kernel's binding checks, checked here first so that errors name the argument."""
    for name, value in (("x", x), ("grad_y", grad_y), ("m_sizes", m_sizes)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2 or grad_y.dim() != 2 or x.shape[0] != grad_y.shape[0]:
        raise ValueError(
            f"x [M, K] and grad_y [M, N] must be 2-D with the same rows, got {tuple(x.shape)} and {tuple(grad_y.shape)}"
        )
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y: expected the dtype of x ({x.dtype}), got {grad_y.dtype}")
    if m_sizes.dim() != 1 or m_sizes.dtype not in _validation.SIZE_DTYPES:
        raise TypeError(f"m_sizes: expected a 1-D int32 or int64 tensor, got {m_sizes.dtype} {tuple(m_sizes.shape)}")
    if len({t.device for t in (x, grad_y, m_sizes)}) != 1:
        raise ValueError(f"x, grad_y and m_sizes must be on one device, got {x.device}, {grad_y.device}, {m_sizes.device}")
    expected = (m_sizes.shape[0], x.shape[1], grad_y.shape[1])
    expected = expected if weight_transposed else (expected[0], expected[2], expected[1])
    if main_grad is not None:
        if not isinstance(main_grad, torch.Tensor) or main_grad.dtype != torch.float32:
            raise TypeError(f"main_grad: expected a torch.float32 tensor, got {getattr(main_grad, 'dtype', main_grad)}")
        if tuple(main_grad.shape) != expected or main_grad.device != x.device:
            raise ValueError(
                f"main_grad: expected shape {expected} on {x.device}, got {tuple(main_grad.shape)} on {main_grad.device}"
            )
    if x.device.type == "cuda" and _ops.cuda_available():
        if x.dtype not in _validation.KERNEL_DTYPES:
            raise TypeError(f"x: the CUDA kernel supports torch.bfloat16 and torch.float16, got {x.dtype}")
        for name, tensor in (("x", x), ("grad_y", grad_y.contiguous()), ("main_grad", main_grad)):
            problem = None if tensor is None else _validation.kernel_layout_problem(tensor)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")


# --- TEMPORARY SHIM (lead drops this at merge) ---
# The layer's private GEMM entry points (PLAN.md), built on today's functions until helper B's functional.py is
# merged.
def _expert_gemm(x, weight, m_sizes, weight_transposed, *, x_name="x", weight_name="weight"):
    cuda_kernel = x.is_cuda and _ops.cuda_available()
    try:
        weight_read, flag = _validation.validate(x, weight, m_sizes, weight_transposed, cuda_kernel=cuda_kernel)
    except (TypeError, ValueError) as error:
        message = str(error)
        for name, given in (("x", x_name), ("weight", weight_name)):
            if message.startswith(f"{name}:"):
                message = given + message[len(name) :]
        raise type(error)(message) from None
    if os.environ.get("MOE_GEMM_CHECK") == "1":
        _validation.check_sizes_on_host(m_sizes, x.shape[0])
    y = call_below_autograd(torch.ops.moe_gemm.grouped_mm.default, x, weight_read, m_sizes, flag)
    return y, weight_read, flag


def _expert_gemm_backward(grad_y, x, weight_read, m_sizes, weight_transposed_read, needs_grad_x, needs_grad_w):
    return grouped_mm_backward(grad_y, x, weight_read, m_sizes, weight_transposed_read, needs_grad_x, needs_grad_w)


# --- END SHIM ---
