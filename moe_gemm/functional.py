"""The public entry point: ``grouped_forward``, which validates its inputs and calls ``moe_gemm::grouped_mm``."""

import os

import torch

from moe_gemm import _ops, _validation


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
    cuda_kernel = isinstance(x, torch.Tensor) and x.device.type == "cuda" and _ops.cuda_available()
    weight, weight_transposed = _validation.validate(x, weight, m_sizes, weight_transposed, cuda_kernel=cuda_kernel)
    # The check needs the sizes' values, which a torch.compile trace does not have: it runs in eager mode only.
    if os.environ.get("MOE_GEMM_CHECK") == "1" and not torch.compiler.is_compiling():
        _validation.check_sizes_on_host(m_sizes, x.shape[0])
    return torch.ops.moe_gemm.grouped_mm(x, weight, m_sizes.contiguous(), weight_transposed)
