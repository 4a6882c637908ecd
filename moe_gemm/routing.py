"""Top-k routing of tokens to experts, as the MoE models on the Hugging Face hub do it, deterministic and sync-free.

``route(router_logits, top_k, ...)`` returns float32 weights and int64 expert ids, ``[T, top_k]`` each. Three scorings:

- ``"softmax"`` (Mixtral, Qwen-MoE): softmax over the experts, the ``top_k`` largest probabilities, optionally
  renormalised to sum to 1.
- ``"softmax_topk"`` (GPT-OSS): the ``top_k`` largest logits, then a softmax over those ``top_k``.
- ``"sigmoid"`` (DeepSeek-V3): biased grouped top-k, see ``route``.

Every top-k here is a stable descending sort, so equal scores go to the lower expert index (``torch.topk`` promises
no order among ties) and ids come out in descending score order. On CUDA, where the kernels are available, ``route`` is
one launch of the fused kernel behind ``torch.ops.moe_gemm.route`` (``csrc/moe_routing.cu``, the op registered in
``_ops.py``), which picks exactly the ids of the tensor ops (``_ops.route_torch``); elsewhere, and beyond the kernel's
limits (``E > 1024``, ``top_k > 32``, ``n_group > 32``), it is the tensor ops. Either way shapes depend only on input
shapes: no host sync, CUDA-graph capturable.
"""

import torch

from moe_gemm import _ops, _validation
from moe_gemm.reference import route_options

SCORINGS = _validation.SCORINGS


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
        top_k: experts per token, ``1 <= top_k <= E``; with ``n_group``, at most ``topk_group * E / n_group`` (the
            experts of the kept groups), else ValueError.
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
    _validation.check_route_arguments(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias)
    arguments = (router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias)
    if _ops.route_kernel_applies(router_logits, top_k, n_group):
        return torch.ops.moe_gemm.route(*arguments, float(routed_scaling_factor))
    return _ops.route_torch(*arguments, routed_scaling_factor)


def route_torch_ops(router_logits: torch.Tensor, top_k: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``route`` computed with PyTorch tensor ops on any device, never the fused kernel, arguments not checked:
    ``options`` are ``route``'s keyword arguments. The reference that the fused kernel is tested and timed against.
    Differentiable in the logits."""
    return _ops.route_torch(router_logits, top_k, *route_options(options).values())
