"""``moe_gemm.route`` against the plain-loop ``route_reference``: exact ids on random and tie-heavy logits for every
scoring, weights, the tie rule, non-finite logits and argument checks."""

import pytest
import torch

import moe_gemm
from moe_gemm.reference import route_reference

SCORING_OPTIONS = {
    "softmax": {"scoring": "softmax"},
    "softmax_renormalized": {"scoring": "softmax", "renormalize": True},
    "softmax_topk": {"scoring": "softmax_topk"},
    "sigmoid": {"scoring": "sigmoid", "renormalize": True, "routed_scaling_factor": 2.5},
    "sigmoid_grouped": {"scoring": "sigmoid", "renormalize": True, "n_group": 4, "topk_group": 2},
    "sigmoid_grouped_unnormalized": {"scoring": "sigmoid", "n_group": 8, "topk_group": 3},
}


def _options_with_bias(options: dict, num_experts: int, tie_heavy: bool) -> dict:
    if options["scoring"] != "sigmoid":
        return options
    bias = torch.randn(num_experts) / 4
    # Rounded to a few values so that biased scores tie too.
    return {**options, "e_score_correction_bias": bias.round(decimals=1) if tie_heavy else bias}


@pytest.mark.parametrize("tie_heavy", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("options", SCORING_OPTIONS.values(), ids=SCORING_OPTIONS.keys())
def test_route_matches_reference(options, tie_heavy):
    num_tokens, num_experts, top_k = 64, 16, 4
    logits = torch.randn(num_tokens, num_experts, dtype=torch.bfloat16)
    if tie_heavy:
        logits = torch.randint(-2, 3, (num_tokens, num_experts)).to(torch.bfloat16)
    options = _options_with_bias(options, num_experts, tie_heavy)

    weights, ids = moe_gemm.route(logits, top_k, **options)
    ref_weights, ref_ids = route_reference(logits, top_k, **options)

    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "a token's experts must be distinct"


@pytest.mark.parametrize("scoring", ["softmax", "softmax_topk", "sigmoid"])
def test_equal_scores_go_to_the_lower_expert_index(scoring):
    logits = torch.zeros(3, 8)
    logits[1, 5] = 1.0  # a clear winner, then ties
    logits[2] = torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0])
    _, ids = moe_gemm.route(logits, 3, scoring=scoring)
    assert ids.tolist() == [[0, 1, 2], [5, 0, 1], [1, 3, 6]]


def test_group_ties_go_to_the_lower_group_index():
    # Four groups of two experts, all of equal group score: groups 0 and 1 are kept, so experts 0 to 3 are chosen
    # even though expert 7 has a larger score than experts 2 and 3 (and the same group score as them).
    logits = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, -1.0, 2.0]])
    _, ids = moe_gemm.route(logits, 4, scoring="sigmoid", n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 3, 1, 2]]


def test_deepseek_masks_other_groups_to_minus_infinity():
    # Only group 0 is kept; its experts have negative biased scores, which would lose to masked scores of 0.
    logits = torch.tensor([[3.0, 2.0, -5.0, -5.0]])
    bias = torch.tensor([-1.2, -1.2, -2.0, -2.0])
    weights, ids = moe_gemm.route(
        logits, 2, scoring="sigmoid", n_group=2, topk_group=1, e_score_correction_bias=bias, routed_scaling_factor=2.0
    )
    assert ids.tolist() == [[0, 1]]
    # Weights are the unbiased sigmoid scores, not the biased ones used for the choice.
    torch.testing.assert_close(weights, 2.0 * torch.sigmoid(torch.tensor([[3.0, 2.0]])))


@pytest.mark.parametrize("scoring", ["softmax", "softmax_topk"])
def test_nan_logits_are_never_chosen_over_finite_ones(scoring):
    logits = torch.tensor([[float("nan"), 1.0, float("nan"), -30.0], [float("nan")] * 4])
    weights, ids = moe_gemm.route(logits, 2, scoring=scoring)
    assert ids.tolist() == [[1, 3], [0, 1]]
    assert torch.isfinite(weights[0]).all() and weights[0, 0] > 0.99
    assert torch.isnan(weights[1]).all(), "all -inf logits have no softmax"


def test_nan_logits_score_zero_under_sigmoid():
    logits = torch.tensor([[float("nan"), -1.0, float("-inf"), float("inf")]])
    weights, ids = moe_gemm.route(logits, 3, scoring="sigmoid")
    assert ids.tolist() == [[3, 1, 0]]
    torch.testing.assert_close(weights, torch.tensor([[1.0, torch.sigmoid(torch.tensor(-1.0)).item(), 0.0]]))


@pytest.mark.parametrize(
    ("top_k", "options", "message"),
    [
        (0, {}, "top_k"),
        (9, {}, "top_k"),
        (2, {"scoring": "relu"}, "scoring"),
        (2, {"n_group": 2, "topk_group": 1}, "sigmoid"),
        (2, {"scoring": "sigmoid", "n_group": 3, "topk_group": 1}, "n_group"),
        (2, {"scoring": "sigmoid", "n_group": 2}, "go together"),
        (2, {"scoring": "sigmoid", "e_score_correction_bias": torch.zeros(4)}, "e_score_correction_bias"),
    ],
)
def test_route_rejects_bad_arguments(top_k, options, message):
    with pytest.raises(ValueError, match=message):
        moe_gemm.route(torch.randn(5, 8), top_k, **options)


def test_route_refuses_groups_that_cannot_supply_top_k_experts():
    # 2 kept groups of 16 / 4 = 4 experts hold 8 experts: top_k = 9 would have to weight experts outside them.
    logits = torch.randn(5, 16)
    message = r"top_k = 9 experts cannot come from topk_group = 2 groups of E / n_group = 16 / 4 = 4 experts \(at most 8"
    with pytest.raises(ValueError, match=message):
        moe_gemm.route(logits, 9, scoring="sigmoid", n_group=4, topk_group=2)
    weights, ids = moe_gemm.route(logits, 8, scoring="sigmoid", n_group=4, topk_group=2)
    assert torch.isfinite(weights).all() and len(set((ids // 4)[0].tolist())) == 2, "all 8 from the 2 kept groups"
