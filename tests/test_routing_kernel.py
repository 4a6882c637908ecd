"""The fused CUDA routing kernel behind ``torch.ops.moe_gemm.route`` against the same computation in PyTorch ops on
the same GPU (``route_torch_ops``): ids exactly equal, weights close, on random, tie-heavy and non-finite logits, every
scoring, E from 8 to 512, in every logits dtype; and the limits beyond which ``route`` falls back."""

import pytest
import torch
from helpers import requires_cuda_op

import moe_gemm
from moe_gemm.reference import route_reference
from moe_gemm.routing import route_torch_ops

pytestmark = [pytest.mark.gpu, requires_cuda_op]

SCORINGS = {
    "softmax": {"scoring": "softmax"},
    "softmax_renormalized": {"scoring": "softmax", "renormalize": True, "routed_scaling_factor": 1.5},
    "softmax_topk": {"scoring": "softmax_topk"},
    "sigmoid": {"scoring": "sigmoid", "renormalize": True, "routed_scaling_factor": 2.5},
    "sigmoid_unnormalized": {"scoring": "sigmoid"},
    "sigmoid_grouped": {"scoring": "sigmoid", "renormalize": True, "n_group": 4, "topk_group": 2},
    "sigmoid_grouped_one_group_kept": {"scoring": "sigmoid", "n_group": 4, "topk_group": 1},
}
EXPERTS = [8, 60, 128, 256, 512]


def make_logits(num_tokens, num_experts, kind, dtype):
    if kind == "random":
        logits = torch.randn(num_tokens, num_experts)
    elif kind == "ties":
        logits = torch.randint(-2, 3, (num_tokens, num_experts)).float()
    else:  # non-finite: NaN, -inf and +inf sprinkled, whole rows of NaN and of -inf
        logits = torch.randn(num_tokens, num_experts)
        special = torch.tensor([float("nan"), float("-inf"), float("inf")])
        mask = torch.rand(num_tokens, num_experts) < 0.2
        logits[mask] = special[torch.randint(0, 3, (int(mask.sum()),))]
        logits[0], logits[1] = float("nan"), float("-inf")
    return logits.to(device="cuda", dtype=dtype)


def options_for(options, num_experts, kind):
    options = dict(options)
    if options["scoring"] == "sigmoid":
        bias = torch.randn(num_experts) / 4
        options["e_score_correction_bias"] = (bias.round(decimals=1) if kind == "ties" else bias).cuda()
    if options.get("n_group") and num_experts % options["n_group"]:
        options["n_group"] = 2 if num_experts % 2 == 0 else 1
        options["topk_group"] = 1
    return options


def top_k_for(num_experts, options):
    """8, or fewer where the kept groups hold fewer experts (``route`` refuses a ``top_k`` beyond them)."""
    capacity = num_experts
    if options.get("n_group"):
        capacity = options["topk_group"] * (num_experts // options["n_group"])
    return min(8, capacity)


def check_against_torch_ops(logits, top_k, options):
    weights, ids = moe_gemm.route(logits, top_k, **options)
    ref_weights, ref_ids = route_torch_ops(logits, top_k, **options)
    torch.cuda.synchronize()
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.is_cuda
    assert torch.equal(ids, ref_ids), f"{(ids != ref_ids).any(dim=1).sum().item()} tokens choose other experts"
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7, equal_nan=True)
    return weights, ids


@pytest.mark.parametrize("kind", ["random", "ties", "non_finite"])
@pytest.mark.parametrize("options", SCORINGS.values(), ids=SCORINGS.keys())
@pytest.mark.parametrize("num_experts", EXPERTS)
def test_kernel_matches_torch_ops(num_experts, options, kind):
    options = options_for(options, num_experts, kind)
    top_k = top_k_for(num_experts, options)
    logits = make_logits(333, num_experts, kind, torch.float32)
    check_against_torch_ops(logits, top_k, options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", SCORINGS.values(), ids=SCORINGS.keys())
def test_kernel_reads_16_bit_logits_and_strided_rows(options, dtype):
    logits = make_logits(100, 256, "ties", torch.float32).to(dtype)
    check_against_torch_ops(logits, 6, options_for(options, 256, "ties"))
    wide = make_logits(100, 300, "random", dtype)
    check_against_torch_ops(wide[:, :256], 6, options_for(options, 256, "random"))  # row stride 300


@pytest.mark.parametrize("scoring", ["softmax", "softmax_renormalized", "softmax_topk"])
def test_kernel_matches_plain_reference_on_the_host(scoring):
    # Also against the plain-Python reference on the host: the softmax scorings choose on the logits themselves,
    # so the ids must agree exactly whatever the host's exp (the sigmoid scorings are left to the GPU's own ops).
    options = SCORINGS[scoring]
    logits = make_logits(50, 64, "random", torch.float32)
    weights, ids = moe_gemm.route(logits, 5, **options)
    ref_weights, ref_ids = route_reference(logits.cpu(), 5, **options)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 31, 32])
def test_top_k_and_group_extremes(top_k):
    logits = make_logits(65, 512, "ties", torch.float32)
    check_against_torch_ops(logits, top_k, {"scoring": "softmax", "renormalize": True})
    bias = torch.randn(512, device="cuda") / 4
    sigmoid = {"scoring": "sigmoid", "e_score_correction_bias": bias}
    check_against_torch_ops(logits, top_k, {**sigmoid, "n_group": 32, "topk_group": 3})
    # One expert per group: the group score is the expert's own score; the 5 kept groups hold 5 experts.
    check_against_torch_ops(logits[:, :32], min(top_k, 5), {**sigmoid, "e_score_correction_bias": bias[:32],
                                                             "n_group": 32, "topk_group": 5})  # fmt: skip


def test_empty_and_single_token_inputs():
    for num_tokens in (0, 1, 5):
        logits = make_logits(num_tokens, 60, "random", torch.float32)
        weights, ids = check_against_torch_ops(logits, 4, {"scoring": "softmax"})
        assert tuple(ids.shape) == tuple(weights.shape) == (num_tokens, 4)


def test_non_finite_rows_are_defined():
    logits = torch.tensor([[float("nan")] * 8, [float("-inf")] * 8, [1.0, float("inf"), 0.0, 2.0, 0, 0, 0, 0]])
    logits = logits.cuda()
    weights, ids = moe_gemm.route(logits, 2, scoring="softmax")
    assert ids.tolist() == [[0, 1], [0, 1], [1, 3]]
    assert torch.isnan(weights).all(), "no softmax of all -inf, or of +inf"
    weights, ids = moe_gemm.route(logits, 2, scoring="sigmoid")
    assert ids.tolist() == [[0, 1], [0, 1], [1, 3]]
    assert weights[:2].eq(0).all() and weights[2, 0] == 1.0


def test_gradients_match_torch_ops():
    logits = make_logits(64, 256, "random", torch.bfloat16).requires_grad_()
    bias = torch.randn(256, device="cuda") / 4
    options = {"scoring": "sigmoid", "renormalize": True, "n_group": 8, "topk_group": 4,
               "e_score_correction_bias": bias, "routed_scaling_factor": 2.5}  # fmt: skip
    grad_weights = torch.randn(64, 8, device="cuda")
    (grad,) = torch.autograd.grad(moe_gemm.route(logits, 8, **options)[0], logits, grad_weights)
    (ref_grad,) = torch.autograd.grad(route_torch_ops(logits, 8, **options)[0], logits, grad_weights)
    torch.testing.assert_close(grad, ref_grad)


def test_beyond_the_kernel_route_falls_back_and_the_op_refuses():
    logits = make_logits(10, 1040, "random", torch.float32)
    weights, ids = moe_gemm.route(logits, 40, scoring="softmax")  # E > 1024, top_k > 32: PyTorch ops
    ref_weights, ref_ids = route_torch_ops(logits, 40, scoring="softmax")
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    with pytest.raises(RuntimeError, match="up to 1024 experts"):
        torch.ops.moe_gemm.route(logits, 40, "softmax", False, None, None, None, 1.0)


def test_cuda_graph_replay_and_compile():
    logits = make_logits(128, 256, "random", torch.float32)
    bias = torch.randn(256, device="cuda") / 4
    options = {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "e_score_correction_bias": bias}
    moe_gemm.route(logits, 8, **options)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = moe_gemm.route(logits, 8, **options)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    ref_weights, ref_ids = route_torch_ops(logits, 8, **options)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: moe_gemm.route(x, 8, **options), fullgraph=True)
    assert torch.equal(compiled(logits)[1], ref_ids)
