"""Plain-loop references (the grouped GEMMs, routing, the MoE expert layer) and the rule mapping ``m_sizes`` to rows.

The rule: expert ``e`` owns rows ``[start[e], end[e])`` of ``x``, where negative sizes count as 0 and every offset is
clamped to the number of rows ``M``::

    end[e]   = min(max(m_sizes[0], 0) + ... + max(m_sizes[e], 0), M)
    start[e] = end[e - 1]  (0 for e = 0)

so ``sum(m_sizes) > M`` drops the rows that would lie at or past ``M`` and nothing reads or writes out of bounds.
Rows past ``end[E - 1]`` belong to no expert: their output rows are zero and they contribute nothing to ``grad_W``.

The GEMM references compute in a wide dtype (float64 by default): the ground truth of the tests and the benchmark,
and the float32 main-grad accumulation of the PyTorch path. The FP8 ones dequantize first, a 128-column group at a
time. ``route_reference`` and ``experts_forward_reference``
(float64, one token at a time) are the ground truth of the MoE layer's tests.
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


def expert_row_ranges(m_sizes: torch.Tensor | Sequence[int], num_rows: int) -> list[tuple[int, int, int]]:
    """``[(expert, start, end)]`` of the experts that own rows, following the rule above (reads sizes on the host)."""
    sizes = m_sizes.tolist() if isinstance(m_sizes, torch.Tensor) else m_sizes
    ranges = clamped_row_ranges(sizes, num_rows)
    return [(expert, start, end) for expert, (start, end) in enumerate(ranges) if end > start]


def _expert_weight(weight: torch.Tensor, expert: int, weight_transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """Weight of one expert as the ``[K, N]`` right-hand side of ``x_e @ B``."""
    w = weight[expert].to(dtype)
    return w if weight_transposed else w.t()


def grouped_mm_reference(x, weight, m_sizes, weight_transposed=False, dtype=torch.float64) -> torch.Tensor:
    """Return ``y`` in ``dtype``: ``y[rows of e] = x[rows of e] @ W[e].T`` (``@ W[e]`` when ``weight_transposed``).

    ``weight`` is ``[E, N, K]``, or ``[E, K, N]`` when ``weight_transposed``; ``m_sizes`` a tensor or a sequence of
    ints. Rows past the last group are zero.
    """
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    out = torch.zeros(x.shape[0], n, dtype=dtype, device=x.device)
    for expert, start, end in expert_row_ranges(m_sizes, x.shape[0]):
        out[start:end] = x[start:end].to(dtype) @ _expert_weight(weight, expert, weight_transposed, dtype)
    return out


def grouped_mm_wgrad_reference(x, grad_y, m_sizes, weight_transposed=False, dtype=torch.float64) -> torch.Tensor:
    """Return the weight gradient in ``dtype``: ``grad_W[e] = grad_y_e.T @ x_e``, shaped like the weight.

    That is ``[E, N, K]``, or ``[E, K, N]`` (``x_e.T @ grad_y_e``) when ``weight_transposed``. Experts without rows get
    exactly zero.
    """
    num_experts, n, k = len(m_sizes), grad_y.shape[1], x.shape[1]
    shape = (num_experts, k, n) if weight_transposed else (num_experts, n, k)
    grad_w = torch.zeros(shape, dtype=dtype, device=x.device)
    for expert, start, end in expert_row_ranges(m_sizes, x.shape[0]):
        x_e, grad_y_e = x[start:end].to(dtype), grad_y[start:end].to(dtype)
        grad_w[expert] = x_e.t() @ grad_y_e if weight_transposed else grad_y_e.t() @ x_e
    return grad_w


def dequantize_fp8_reference(values, scale, *, block_rows=1, dtype=torch.float64) -> torch.Tensor:
    """``values * scale`` in ``dtype``, for ``values`` ``[..., R, C]`` (float8_e4m3fn or any float) and ``scale``
    ``[..., R]`` (one per row), or ``[..., ceil(R / block_rows), ceil(C / 128)]``: ``scale[..., i, j]`` scales
    ``values[..., r, c]`` for ``r // block_rows == i`` and ``c // 128 == j``. ``x``'s scales have ``block_rows=1``,
    a ``[E, N, K]`` weight's 128 x 128 blocks ``block_rows=128``."""
    out = values.to(dtype, copy=True)
    scale = scale.to(dtype)
    if scale.dim() == values.dim() - 1:
        return out * scale.unsqueeze(-1)
    block_of_row = torch.arange(values.shape[-2], device=values.device) // block_rows
    for group in range(scale.shape[-1]):
        columns = slice(group * 128, (group + 1) * 128)
        out[..., columns] *= scale[..., block_of_row, group].unsqueeze(-1)
    return out


def grouped_mm_fp8_reference(
    x, x_scale, weight, weight_scale, m_sizes, weight_transposed=False, dtype=torch.float64
) -> torch.Tensor:
    """``grouped_mm_reference`` of the dequantized operands of ``grouped_forward_fp8``, in ``dtype``. Block scales
    follow the weight's dims (``[E, ceil(K / 128), ceil(N / 128)]`` when ``weight_transposed``); per-channel ones are
    ``[E, N]`` in both layouts."""
    if weight_transposed:
        weight = weight.transpose(-1, -2)
        weight_scale = weight_scale.transpose(-1, -2) if weight_scale.dim() == 3 else weight_scale
    x = dequantize_fp8_reference(x, x_scale, dtype=dtype)
    weight = dequantize_fp8_reference(weight, weight_scale, block_rows=128, dtype=dtype)
    return grouped_mm_reference(x, weight, m_sizes, dtype=dtype)


def _ranked(scores: Sequence[float], count: int) -> list[int]:
    """Indices of the ``count`` largest scores, largest first, equal scores in index order."""
    return sorted(range(len(scores)), key=lambda index: (-scores[index], index))[:count]


# The keyword arguments of moe_gemm.route, in the order of the op's schema, with route's defaults (a test checks that
# they agree with route's signature).
ROUTE_OPTIONS = {
    "scoring": "softmax",
    "renormalize": False,
    "n_group": None,
    "topk_group": None,
    "e_score_correction_bias": None,
    "routed_scaling_factor": 1.0,
}


def route_options(options: dict) -> dict:
    """``options`` completed with ``route``'s defaults, in ``ROUTE_OPTIONS`` order; TypeError for unknown keys."""
    unknown = sorted(options.keys() - ROUTE_OPTIONS.keys())
    if unknown:
        raise TypeError(f"unexpected routing options {unknown}; route takes {list(ROUTE_OPTIONS)}")
    return {name: options.get(name, default) for name, default in ROUTE_OPTIONS.items()}


def route_reference(router_logits: torch.Tensor, top_k: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_gemm.route`` one token at a time, selection in plain Python: ``(weights float32, ids int64)``, ``[T, k]``.

    ``options`` are ``route``'s keyword arguments (``ROUTE_OPTIONS``). Scores come from the same float32 elementwise
    ops as ``route``; group scores are float32 sums (a float64 sum of two float32 values rounds to the float32 sum
    exactly).
    """
    options = route_options(options)
    scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor = options.values()
    logits = torch.nan_to_num(router_logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    num_experts = logits.shape[1]
    all_ids, all_weights = [], []
    for row in range(logits.shape[0]):
        token_logits = logits[row].tolist()
        if scoring == "softmax":
            ids = _ranked(token_logits, top_k)
            probs = torch.softmax(logits[row], dim=0).tolist()
            weights = [probs[e] for e in ids]
            if renormalize:
                weights = [w / sum(weights) for w in weights]
        elif scoring == "softmax_topk":
            ids = _ranked(token_logits, top_k)
            weights = torch.softmax(torch.tensor([token_logits[e] for e in ids]), dim=0).tolist()
        else:
            scores = torch.sigmoid(logits[row])
            biased = (scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()).tolist()
            if n_group is not None:
                size = num_experts // n_group
                group_scores = []
                for group in range(n_group):
                    members = biased[group * size : (group + 1) * size]
                    best = [members[e] for e in _ranked(members, 2)]
                    group_scores.append(torch.tensor(sum(best), dtype=torch.float32).item())
                kept = set(_ranked(group_scores, topk_group))
                biased = [score if e // size in kept else float("-inf") for e, score in enumerate(biased)]
            ids = _ranked(biased, top_k)
            weights = [scores[e].item() for e in ids]
            if renormalize:
                weights = [w / (sum(weights) + 1e-20) for w in weights]
        all_ids.append(ids)
        all_weights.append([w * routed_scaling_factor for w in weights])
    shape = (logits.shape[0], top_k)
    return (
        torch.tensor(all_weights, dtype=torch.float32).view(shape),
        torch.tensor(all_ids, dtype=torch.int64).view(shape),
    )


def experts_forward_reference(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    act: str = "silu",
    weight_transposed: bool = False,
    concatenated: bool = True,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``moe_gemm.experts_forward`` in float64, one token and one chosen expert at a time; never groups rows."""
    activations = {
        "silu": torch.nn.functional.silu,
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    }
    num_experts = gate_up_proj.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for token in range(hidden.shape[0]):
        x = hidden[token].double().cpu()
        for expert, weight in zip(top_k_index[token].tolist(), top_k_weights[token].tolist()):
            if not 0 <= expert < num_experts:
                continue
            gate_up = x @ _expert_weight(gate_up_proj, expert, weight_transposed, torch.float64).cpu()
            if gate_up_bias is not None:
                gate_up = gate_up + gate_up_bias[expert].double().cpu()
            half = gate_up.shape[0] // 2
            gate, up = (gate_up[:half], gate_up[half:]) if concatenated else (gate_up[0::2], gate_up[1::2])
            y = (activations[act](gate) * up) @ _expert_weight(
                down_proj, expert, weight_transposed, torch.float64
            ).cpu()
            if down_bias is not None:
                y = y + down_bias[expert].double().cpu()
            out[token] += weight * y
    return out
