"""Top-k routing of tokens to experts, as the MoE models on the Hugging Face hub do it, deterministic and sync-free.

``route(router_logits, top_k, ...)`` returns float32 weights and int64 expert ids, ``[T, top_k]`` each. Three scorings:

- ``"softmax"`` (Mixtral, Qwen-MoE): softmax over the experts, the ``top_k`` largest probabilities, optionally
  renormalised to sum to 1.
- ``"softmax_topk"`` (GPT-OSS): the ``top_k`` largest logits, then a softmax over those ``top_k``.
- ``"sigmoid"`` (DeepSeek-V3): biased grouped top-k, see ``route``.

Every top-k here is a stable descending sort, so equal scores go to the lower expert index (``torch.topk`` promises
no order among ties) and ids come out in descending score order. On CUDA, where the extension is built, ``route`` is
one launch of the fused kernel behind ``torch.ops.moe_gemm.route`` (``csrc/moe_routing.cu``, registered in
``_routing_ops.py``), which picks exactly the ids of the tensor ops here; elsewhere, and beyond the kernel's limits
(``E > 1024``, ``top_k > 32``, ``n_group > 32``), it is ``route_torch_ops``. Either way shapes depend only on input
shapes: no host sync, CUDA-graph capturable.
"""

import torch

from moe_gemm import _routing_ops

SCORINGS = ("softmax", "softmax_topk", "sigmoid")


def topk_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries along the last dim; ties go to the lower index."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def _check_arguments(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias):
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a floating-point [T, E] tensor, got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if scoring != "sigmoid":
        if n_group is not None or topk_group is not None or e_score_correction_bias is not None:
            raise ValueError("n_group, topk_group and e_score_correction_bias apply to scoring='sigmoid' only")
        return
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group go together")
    if n_group is not None and (num_experts % n_group != 0 or not 1 <= topk_group <= n_group):
        raise ValueError(
            f"need n_group dividing {num_experts} and 1 <= topk_group <= n_group, got {n_group}, {topk_group}"
        )
    if e_score_correction_bias is not None and tuple(e_score_correction_bias.shape) != (num_experts,):
        raise ValueError(f"e_score_correction_bias must be [{num_experts}], got {tuple(e_score_correction_bias.shape)}")


def _mask_groups(biased: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``biased`` with the experts outside the ``topk_group`` best groups set to -inf (``[T, E]``)."""
    num_tokens, num_experts = biased.shape
    grouped = biased.view(num_tokens, n_group, num_experts // n_group)
    # A group's score is the sum of its two best biased scores (its only score when a group has one expert).
    best_two, _ = topk_lowest_index_first(grouped, min(2, grouped.shape[-1]))
    _, kept_groups = topk_lowest_index_first(best_two.sum(dim=-1), topk_group)
    kept = torch.zeros(num_tokens, n_group, dtype=torch.bool, device=biased.device).scatter_(1, kept_groups, True)
    return grouped.masked_fill(~kept[..., None], float("-inf")).view(num_tokens, num_experts)


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    n_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token: ``(weights float32 [T, top_k], ids int64 [T, top_k])``.

    Args:
        router_logits: ``[T, E]``, any floating dtype; scored in float32.
        top_k: experts per token, ``1 <= top_k <= E``.
        scoring: ``"softmax"``: weights are the softmax probabilities of the chosen experts, which are those with
            the largest logits (the probabilities' order, without the ties that rounding can create).
            ``"softmax_topk"``: the ``top_k`` largest logits, weights their softmax. ``"sigmoid"`` (DeepSeek-V3):
            ``s = sigmoid(logits)``; experts are chosen on ``s + e_score_correction_bias``; with ``n_group``, each
            of the ``n_group`` consecutive groups of experts scores the sum of its two best biased scores, and
            only the experts of the ``topk_group`` best groups can be chosen (the others score -inf); weights are
            the unbiased ``s`` of the chosen experts.
        renormalize: divide the ``top_k`` weights by their sum (``sum + 1e-20`` for ``"sigmoid"``, as DeepSeek-V3;
            ``"softmax_topk"`` weights already sum to 1).
        n_group, topk_group, e_score_correction_bias: ``"sigmoid"`` only; the bias is ``[E]``, finite.
        routed_scaling_factor: multiplies the weights last.

    Ids are in descending order of the selection score, equal scores going to the lower expert index (also among
    groups). NaN logits count as -inf: under the softmax scorings a NaN expert is never chosen over one with a
    non-NaN logit and gets weight 0, and under ``"sigmoid"`` it scores ``s = 0``. Weights follow float32
    arithmetic otherwise: a row whose logits are all -inf (or NaN), or that holds +inf, gets NaN softmax weights.
    The weights are differentiable in ``router_logits``; the bias only steers the choice and gets no gradient.
    """
    _check_arguments(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias)
    if _routing_ops.kernel_applies(router_logits, top_k, n_group):
        return torch.ops.moe_gemm.route(
            router_logits,
            top_k,
            scoring,
            renormalize,
            n_group,
            topk_group,
            e_score_correction_bias,
            float(routed_scaling_factor),
        )
    return route_torch_ops(
        router_logits,
        top_k,
        scoring=scoring,
        renormalize=renormalize,
        n_group=n_group,
        topk_group=topk_group,
        e_score_correction_bias=e_score_correction_bias,
        routed_scaling_factor=routed_scaling_factor,
    )


def route_torch_ops(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    n_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``route`` in PyTorch tensor ops on any device (arguments not checked): the path off CUDA, the reference of the
    fused kernel, and the kernel of ``torch.ops.moe_gemm.route`` on CPU. Differentiable in the logits."""
    logits = torch.nan_to_num(router_logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if scoring == "softmax":
        _, ids = topk_lowest_index_first(logits, top_k)
        weights = torch.softmax(logits, dim=-1).gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif scoring == "softmax_topk":
        top_logits, ids = topk_lowest_index_first(logits, top_k)
        weights = torch.softmax(top_logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        biased = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
        if n_group is not None:
            biased = _mask_groups(biased, n_group, topk_group)
        _, ids = topk_lowest_index_first(biased, top_k)
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids
