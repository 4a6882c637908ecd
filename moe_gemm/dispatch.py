"""Dispatch (tokens to expert-sorted rows) and combine (expert rows back to tokens), without a host sync.

``dispatch`` lays the ``T * top_k`` (token, slot) pairs out as rows grouped by expert, in expert order, which is what
``grouped_forward`` reads; ``combine`` gathers each token's ``top_k`` rows back and sums them with the routing
weights. Shapes depend only on input shapes (``[T * top_k, ...]`` whatever the routing), so both are CUDA-graph
capturable, and both are deterministic: a stable sort and gathers, no atomics.
"""

from dataclasses import dataclass

import torch

from moe_gemm import _ops


@dataclass
class DispatchInfo:
    """What ``dispatch`` returns and ``combine`` reads, over ``P = T * top_k`` pairs (token ``t``, slot ``j``), pair
    ``p = t * top_k + j``.

    Attributes:
        x_sorted: ``[P, H]``, row ``r`` the hidden state of the token of pair ``pair_of_row[r]``: grouped by expert in
            expert order, token order kept within an expert; rows of dropped pairs (ids outside ``[0, E)``) last.
        m_sizes: ``[E]`` int64 rows per expert; the dropped rows lie past ``sum(m_sizes)``.
        expert_of_row: ``[P]`` int64 expert of each row, ``E`` for dropped rows.
        pair_of_row: ``[P]`` int64, the permutation: row ``r`` holds pair ``pair_of_row[r]``.
        row_of_pair: ``[P]`` int64, its inverse: pair ``p`` lies in row ``row_of_pair[p]``.
        valid_pair: ``[T, top_k]`` bool, whether the pair's expert id is in ``[0, E)``.
    """

    x_sorted: torch.Tensor
    m_sizes: torch.Tensor
    expert_of_row: torch.Tensor
    pair_of_row: torch.Tensor
    row_of_pair: torch.Tensor
    valid_pair: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.valid_pair.shape[1]


class _GatherTokens(torch.autograd.Function):
    """``hidden[token of each row]``, whose gradient sums each token's ``top_k`` rows by a gather, in slot order.

    Autograd's own gradient of the indexing is ``index_put_(accumulate=True)``, which on CUDA adds a token's rows
    with atomics, in no fixed order. ``forward`` takes ``ctx`` rather than a ``setup_context``: ``apply`` of the
    latter binds arguments through ``inspect.signature`` at every call, more host time than the gather.
    """

    @staticmethod
    def forward(ctx, hidden, pair_of_row, row_of_pair, top_k):
        ctx.save_for_backward(row_of_pair)
        ctx.top_k = top_k
        return gather_tokens(hidden, pair_of_row, top_k)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_of_pair,) = ctx.saved_tensors
        return sum_token_rows(grad_rows, row_of_pair, ctx.top_k), None, None, None


def gather_tokens(hidden: torch.Tensor, pair_of_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """``x_sorted``: row ``r`` is the hidden state of the token of pair ``pair_of_row[r]``."""
    return hidden.index_select(0, pair_of_row // top_k)


def sum_token_rows(grad_rows: torch.Tensor, row_of_pair: torch.Tensor, top_k: int) -> torch.Tensor:
    """The gradient of ``gather_tokens``: each token's ``top_k`` rows summed in slot order, ``[T, H]``."""
    return grad_rows.index_select(0, row_of_pair).view(-1, top_k, grad_rows.shape[1]).sum(dim=1)


# torch.arange results reused across calls, keyed by (length, device): one launch fewer each on CUDA.
_ARANGE_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}
_ARANGE_CACHE_MAX_ENTRIES = 64


def cached_arange(length: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(length, device=device)`` (int64), read-only by convention, shared across calls.

    Not cached where a stored tensor would be wrong: under torch.compile (a global tensor would be baked into the
    graph) and while a CUDA graph is captured (its values are written only when the graph replays).
    """
    if torch.compiler.is_compiling():
        return torch.arange(length, device=device)
    key = (length, device)
    cached = _ARANGE_CACHE.get(key)
    if cached is not None:
        return cached
    values = torch.arange(length, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return values
    if len(_ARANGE_CACHE) >= _ARANGE_CACHE_MAX_ENTRIES:
        _ARANGE_CACHE.clear()
    _ARANGE_CACHE[key] = values
    return values


def valid_pairs(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, top_k]`` bool: whether each pair's expert id lies in ``[0, num_experts)``."""
    return (ids >= 0) & (ids < num_experts)


def sort_pairs(
    ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair)`` of ``DispatchInfo`` for ``ids [T, k]``.

    Where ``_ops.dispatch_kernel_applies`` (CUDA, the extension usable), one counting-sort kernel computes the same
    layout.
    """
    ids = ids.to(torch.int64)
    valid_pair = valid_pairs(ids, num_experts)
    if _ops.dispatch_kernel_applies(ids, num_experts):
        m_sizes, expert_of_row, pair_of_row, _, row_of_pair = _ops.dispatch_kernel(ids, num_experts)
        return m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair
    expert_of_pair = torch.where(valid_pair, ids, num_experts).reshape(-1)
    # Stable: within an expert, pairs keep their (token, slot) order, so the layout is a function of ids alone.
    expert_of_row, pair_of_row = torch.sort(expert_of_pair, stable=True)
    # The sorted ids are non-decreasing: expert e's rows start at the number of ids below e.
    group_starts = torch.searchsorted(expert_of_row, cached_arange(num_experts + 1, ids.device))
    m_sizes = torch.diff(group_starts)
    rows = cached_arange(pair_of_row.shape[0], ids.device)
    row_of_pair = torch.empty_like(pair_of_row).scatter_(0, pair_of_row, rows)
    return m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair


def check_dispatch_arguments(hidden: torch.Tensor, ids: torch.Tensor) -> None:
    if hidden.dim() != 2 or ids.dim() != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"need hidden [T, H] and ids [T, top_k], got {tuple(hidden.shape)} and {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")


def dispatch(hidden: torch.Tensor, ids: torch.Tensor, num_experts: int) -> DispatchInfo:
    """Sort the (token, slot) pairs by expert: see ``DispatchInfo``.

    Args:
        hidden: ``[T, H]`` hidden states.
        ids: ``[T, top_k]`` integer expert ids. Ids outside ``[0, num_experts)``, such as the sentinels of expert
            parallelism, are dropped: their rows go last, past ``sum(m_sizes)``, where ``grouped_forward`` writes
            zeros, and ``combine`` ignores them.
        num_experts: ``E``.
    """
    check_dispatch_arguments(hidden, ids)
    m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair = sort_pairs(ids, num_experts)
    if torch.is_grad_enabled() and hidden.requires_grad:
        x_sorted = _GatherTokens.apply(hidden, pair_of_row, row_of_pair, ids.shape[1])
    else:
        x_sorted = gather_tokens(hidden, pair_of_row, ids.shape[1])
    return DispatchInfo(x_sorted, m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair)


def combine(y_sorted: torch.Tensor, info: DispatchInfo, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y_sorted[row of pair (t, j)]``, over the valid pairs only: ``[T, N]``.

    ``y_sorted`` is ``[T * top_k, N]`` in the row order of ``info``. The sum runs over the ``top_k`` slots in a fixed
    order, in float32 (float64 for float64 inputs), and is returned in the dtype of ``y_sorted``. Dropped pairs add
    exactly nothing, whatever their rows or weights hold, and get zero gradients.
    """
    num_tokens, top_k = info.valid_pair.shape
    if tuple(weights.shape) != (num_tokens, top_k) or y_sorted.shape[0] != num_tokens * top_k:
        raise ValueError(
            f"need y_sorted [{num_tokens * top_k}, N] and weights [{num_tokens}, {top_k}], "
            f"got {tuple(y_sorted.shape)} and {tuple(weights.shape)}"
        )
    return combine_pairs(y_sorted, info.row_of_pair, info.valid_pair, weights)


def _accumulation_dtype(y_sorted: torch.Tensor, weights: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (y_sorted.dtype, weights.dtype) else torch.float32


def _gather_pairs(y_sorted: torch.Tensor, row_of_pair: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``y_pairs [T, k, N]``: each pair's row, in the accumulation dtype."""
    num_tokens, top_k = weights.shape
    y_pairs = y_sorted.index_select(0, row_of_pair).view(num_tokens, top_k, y_sorted.shape[1])
    return y_pairs.to(_accumulation_dtype(y_sorted, weights))


def combine_pairs(
    y_sorted: torch.Tensor, row_of_pair: torch.Tensor, valid_pair: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The one formula of ``combine``, on ``DispatchInfo``'s fields: ``out[t] = sum_j where(valid_pair[t, j],
    weights[t, j] * y_sorted[row_of_pair[t * k + j]], 0)``, accumulated in float32 (float64 for float64 inputs),
    ``[T, N]`` in the dtype of ``y_sorted``. ``_ops.combine_kernel`` computes the same in one CUDA kernel, summing
    each token's slots in slot order, which PyTorch's reduction may not (a last-bit difference at most)."""
    acc_weights = weights.to(_accumulation_dtype(y_sorted, weights))[..., None]
    # A gather and a sum over top_k rather than index_add_: no atomics, so the result is bitwise reproducible.
    weighted = torch.where(valid_pair[..., None], _gather_pairs(y_sorted, row_of_pair, weights) * acc_weights, 0)
    return weighted.sum(dim=1).to(y_sorted.dtype)


def combine_pairs_backward(
    grad_out: torch.Tensor,
    y_sorted: torch.Tensor,
    row_of_pair: torch.Tensor,
    pair_of_row: torch.Tensor,
    valid_pair: torch.Tensor,
    weights: torch.Tensor,
    needs_grad_y: bool,
    needs_grad_weights: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_y_sorted, grad_weights)`` of ``combine_pairs``, None where not needed: autograd's formulas for its ops,
    so the results are the bits autograd computes. The gradient of the gather by ``row_of_pair`` is the gather by
    its inverse permutation ``pair_of_row`` (no atomics)."""
    acc_dtype = _accumulation_dtype(y_sorted, weights)
    grad_products = torch.where(valid_pair[..., None], grad_out.to(acc_dtype).unsqueeze(1), 0)
    grad_y_sorted = grad_weights = None
    if needs_grad_weights:
        y_pairs = _gather_pairs(y_sorted, row_of_pair, weights)
        grad_weights = (grad_products * y_pairs).sum(dim=2, keepdim=True).squeeze(-1).to(weights.dtype)
    if needs_grad_y:
        grad_pairs = (grad_products * weights.to(acc_dtype)[..., None]).to(y_sorted.dtype)
        grad_y_sorted = grad_pairs.view(-1, grad_pairs.shape[-1]).index_select(0, pair_of_row)
    return grad_y_sorted, grad_weights
