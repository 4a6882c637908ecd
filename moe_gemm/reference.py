"""Per-expert loop reference for the grouped GEMMs, and the one rule that maps ``m_sizes`` to row ranges.

The rule: expert ``e`` owns rows ``[start[e], end[e])`` of ``x``, where negative sizes count as 0 and every offset is
clamped to the number of rows ``M``::

    end[e]   = min(max(m_sizes[0], 0) + ... + max(m_sizes[e], 0), M)
    start[e] = end[e - 1]  (0 for e = 0)

so ``sum(m_sizes) > M`` drops the rows that would lie at or past ``M`` and nothing reads or writes out of bounds.
Rows past ``end[E - 1]`` belong to no expert: their output rows are zero and they contribute nothing to ``grad_W``.

The references compute in a wide dtype (float64 by default) and serve the tests, the benchmark and the CPU path.
"""

from collections.abc import Sequence

import torch


def clamped_row_ranges(m_sizes: Sequence[int], num_rows: int) -> list[tuple[int, int]]:
    """Return ``[(start, end)]`` per expert, on the host, following the rule above."""
    ranges = []
    start = 0
    for size in m_sizes:
        end = min(start + max(int(size), 0), num_rows)
        ranges.append((start, end))
        start = end
    return ranges


def clamped_group_ends(m_sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Return ``end[e]`` of the rule above as an int64 tensor on ``m_sizes``' device, without a host sync."""
    # int64 so that a cumulative sum of large int32 sizes cannot wrap before the clamp.
    return m_sizes.to(torch.int64).clamp_min(0).cumsum(0).clamp_max(num_rows)


def _expert_weight(weight: torch.Tensor, expert: int, weight_transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """Weight of one expert as the ``[K, N]`` right-hand side of ``x_e @ B``."""
    w = weight[expert].to(dtype)
    return w if weight_transposed else w.t()


def grouped_mm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    m_sizes: torch.Tensor | Sequence[int],
    weight_transposed: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Return ``y`` in ``dtype``: ``y[rows of e] = x[rows of e] @ W[e].T`` (``@ W[e]`` when ``weight_transposed``).

    ``weight`` is ``[E, N, K]``, or ``[E, K, N]`` when ``weight_transposed``. Rows past the last group are zero.
    """
    sizes = m_sizes.tolist() if isinstance(m_sizes, torch.Tensor) else list(m_sizes)
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    out = torch.zeros(x.shape[0], n, dtype=dtype, device=x.device)
    for expert, (start, end) in enumerate(clamped_row_ranges(sizes, x.shape[0])):
        if end > start:
            out[start:end] = x[start:end].to(dtype) @ _expert_weight(weight, expert, weight_transposed, dtype)
    return out


def grouped_mm_wgrad_reference(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    m_sizes: torch.Tensor | Sequence[int],
    weight_transposed: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Return the weight gradient in ``dtype``: ``grad_W[e] = grad_y_e.T @ x_e``, shaped like the weight.

    That is ``[E, N, K]``, or ``[E, K, N]`` (``x_e.T @ grad_y_e``) when ``weight_transposed``. Experts without rows get
    exactly zero.
    """
    sizes = m_sizes.tolist() if isinstance(m_sizes, torch.Tensor) else list(m_sizes)
    n, k = grad_y.shape[1], x.shape[1]
    shape = (len(sizes), k, n) if weight_transposed else (len(sizes), n, k)
    grad_w = torch.zeros(shape, dtype=dtype, device=x.device)
    for expert, (start, end) in enumerate(clamped_row_ranges(sizes, x.shape[0])):
        if end > start:
            x_e, grad_y_e = x[start:end].to(dtype), grad_y[start:end].to(dtype)
            grad_w[expert] = x_e.t() @ grad_y_e if weight_transposed else grad_y_e.t() @ x_e
    return grad_w
