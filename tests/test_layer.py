"""The MoE layer: ``dispatch`` / ``combine``, ``experts_forward`` against the float64 per-token reference (both
layouts, concatenated and interleaved gate/up, biases, activations, sentinel ids, experts without tokens), gradcheck,
bitwise determinism, the modules, and a ``torch.compile(fullgraph=True)`` trace (no host sync, no data-dependent
shapes)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference

import moe_gemm
from moe_gemm import _ops
from moe_gemm.layer import gated_activation
from moe_gemm.reference import experts_forward_reference, route_reference


def random_ids(num_tokens: int, top_k: int, num_experts: int, *, sentinels: float = 0.0) -> torch.Tensor:
    """``[T, top_k]`` distinct experts per token; about a fraction ``sentinels`` of them replaced by ``-1`` or ``E``."""
    ids = torch.rand(num_tokens, num_experts).argsort(dim=1)[:, :top_k]
    drop = torch.rand(num_tokens, top_k) < sentinels
    return torch.where(drop, torch.where(torch.rand(num_tokens, top_k) < 0.5, -1, num_experts), ids)


def test_dispatch_groups_rows_by_expert_stably_with_sentinels_last():
    hidden = torch.randn(5, 3)
    ids = torch.tensor([[2, 0], [2, 4], [0, -1], [3, 2], [7, 0]])  # E = 4: 4, -1 and 7 are dropped
    info = moe_gemm.dispatch(hidden, ids, num_experts=4)

    assert info.m_sizes.tolist() == [3, 0, 3, 1] and info.m_sizes.dtype == torch.int64
    # Pairs p = t * 2 + j; expert 0 holds pairs 1, 4, 9 in that order, then expert 2: 0, 2, 7, expert 3: 6.
    assert info.pair_of_row[:7].tolist() == [1, 4, 9, 0, 2, 7, 6]
    assert sorted(info.pair_of_row[7:].tolist()) == [3, 5, 8]
    assert info.expert_of_row.tolist() == [0, 0, 0, 2, 2, 2, 3, 4, 4, 4]
    assert torch.equal(info.pair_of_row[info.row_of_pair], torch.arange(10))
    assert torch.equal(info.x_sorted, hidden[info.pair_of_row // 2])
    assert info.valid_pair.tolist() == [[True, True], [True, False], [True, False], [True, True], [False, True]]


def test_combine_sums_weighted_rows_and_ignores_dropped_pairs():
    num_tokens, top_k, num_experts = 6, 3, 4
    ids = random_ids(num_tokens, top_k, num_experts, sentinels=0.25)
    info = moe_gemm.dispatch(torch.randn(num_tokens, 2), ids, num_experts)
    y_sorted = torch.randn(num_tokens * top_k, 5, dtype=torch.float64)
    y_sorted[info.expert_of_row == num_experts] = float("nan")  # whatever dropped rows hold adds nothing
    weights = torch.rand(num_tokens, top_k, dtype=torch.float64)

    expected = torch.zeros(num_tokens, 5, dtype=torch.float64)
    for token in range(num_tokens):
        for slot in range(top_k):
            if 0 <= ids[token, slot] < num_experts:
                expected[token] += weights[token, slot] * y_sorted[info.row_of_pair[token * top_k + slot]]
    assert_close_to_reference(moe_gemm.combine(y_sorted, info, weights), expected)


def make_experts_problem(
    num_tokens=24,
    num_experts=6,
    top_k=3,
    hidden=16,
    intermediate=8,
    *,
    transposed=False,
    bias=False,
    dtype=torch.float64,
    sentinels=0.25,
    device="cpu",
):
    """Random inputs of ``experts_forward`` (drawn in float32 on the CPU, then moved): expert 1 never chosen, about a
    fraction ``sentinels`` of the ids -1 or E. Returns ``(inputs, {"weight_transposed": transposed})``."""
    ids = random_ids(num_tokens, top_k, num_experts - 1, sentinels=sentinels)
    ids = torch.where(ids >= 1, ids + 1, ids)  # skip expert 1, keep -1 and move E - 1 to the sentinel E
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden) / hidden**0.5
    down = torch.randn(num_experts, hidden, intermediate) / intermediate**0.5
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    inputs = {
        "hidden": torch.randn(num_tokens, hidden),
        "top_k_index": ids,
        "top_k_weights": torch.rand(num_tokens, top_k),
        "gate_up_proj": gate_up,
        "down_proj": down,
    }
    if bias:
        inputs["gate_up_bias"] = torch.randn(num_experts, 2 * intermediate) / 4
        inputs["down_bias"] = torch.randn(num_experts, hidden) / 4
    inputs = {
        name: t.to(device=device) if name == "top_k_index" else t.to(device=device, dtype=dtype)
        for name, t in inputs.items()
    }
    return inputs, {"weight_transposed": transposed}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_experts_forward_matches_per_token_reference(transposed, concatenated, bias, act, dtype):
    inputs, options = make_experts_problem(transposed=transposed, bias=bias, dtype=dtype)
    options.update(act=act, concatenated=concatenated)
    out = moe_gemm.experts_forward(**inputs, **options)
    assert out.dtype == dtype
    ref = experts_forward_reference(**inputs, **options)
    assert_close_to_reference(out, ref)
    # Tokens whose ids are all sentinels get exactly zero.
    dropped = ((inputs["top_k_index"] < 0) | (inputs["top_k_index"] >= 6)).all(dim=1)
    assert (out[dropped] == 0).all()


def test_experts_forward_with_a_gate_callable():
    # GPT-OSS style: a model's own gating function over interleaved gate/up columns.
    inputs, options = make_experts_problem(transposed=True, bias=True)

    def clamped_swiglu(gate_up):
        gate, up = gate_up[:, 0::2].clamp(max=0.5), gate_up[:, 1::2].clamp(-0.5, 0.5)
        return (up + 1) * gate * torch.sigmoid(1.7 * gate)

    out = moe_gemm.experts_forward(**inputs, **options, act=clamped_swiglu)
    # The same gate written as GeGLU would not match, so compare with a direct per-token computation.
    expected = torch.zeros_like(out)
    for token in range(out.shape[0]):
        for expert, weight in zip(inputs["top_k_index"][token].tolist(), inputs["top_k_weights"][token].tolist()):
            if 0 <= expert < 6:
                h = inputs["hidden"][token] @ inputs["gate_up_proj"][expert] + inputs["gate_up_bias"][expert]
                y = clamped_swiglu(h[None])[0] @ inputs["down_proj"][expert] + inputs["down_bias"][expert]
                expected[token] += weight * y
    assert_close_to_reference(out, expected)


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_experts_forward_gradcheck(transposed):
    inputs, options = make_experts_problem(
        num_tokens=5, num_experts=4, top_k=2, hidden=4, intermediate=3, transposed=transposed, bias=True
    )
    ids = inputs.pop("top_k_index")
    names = list(inputs)

    def forward(*tensors):
        return moe_gemm.experts_forward(top_k_index=ids, **dict(zip(names, tensors)), **options)

    tensors = [t.requires_grad_() for t in inputs.values()]
    assert torch.autograd.gradcheck(forward, tensors)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
def test_experts_forward_takes_zero_tokens(fused):
    # An expert-parallel rank may have no tokens of its own, or receive none.
    inputs, options = make_experts_problem(num_tokens=0, bias=True)
    for tensor in inputs.values():
        tensor.requires_grad_(tensor.is_floating_point())
    out = moe_gemm.experts_forward(**inputs, **options, fused=fused)
    assert out.shape == (0, 16)
    grads = torch.autograd.grad(out.sum(), [inputs["hidden"], inputs["top_k_weights"], inputs["gate_up_proj"]])
    assert grads[0].shape == (0, 16) and grads[1].shape == (0, 3) and not grads[2].any()


def test_experts_forward_is_deterministic():
    inputs, options = make_experts_problem(num_tokens=64, top_k=4, hidden=32, dtype=torch.bfloat16, bias=True)
    for tensor in (inputs["hidden"], inputs["top_k_weights"], inputs["gate_up_proj"]):
        tensor.requires_grad_()
    runs = []
    for _ in range(2):
        out = moe_gemm.experts_forward(**inputs, **options)
        grads = torch.autograd.grad(out.float().square().sum(), (inputs["hidden"], inputs["top_k_weights"]))
        runs.append((out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("weights_dtype", [None, torch.float32], ids=["weights_same", "weights_f32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("layout", ["nk", "kn", "nk_viewed"])
def test_fused_layer_matches_the_composed_ops(layout, concatenated, bias, act, dtype, weights_dtype):
    # The fused layer (one autograd Function, the default for a named activation in eager mode) and the composition
    # of dispatch, grouped_forward, the activation and combine (fused=False) compute the same forward bits. Their
    # gradients round differently: each must be as close to the float64 gradient as the composition's, or closer.
    inputs, options = make_experts_problem(transposed=layout == "kn", bias=bias, dtype=dtype)
    if layout == "nk_viewed":  # weights stored [E, K, N], passed as their [E, N, K] views
        for name in ("gate_up_proj", "down_proj"):
            inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    if weights_dtype is not None:
        inputs["top_k_weights"] = inputs["top_k_weights"].to(weights_dtype)
    options.update(concatenated=concatenated, act=act)
    differentiable = [name for name in inputs if name != "top_k_index"]
    grad_out = torch.randn(inputs["hidden"].shape, dtype=dtype)

    def run(tensors, fused):
        leaves = {name: t.detach().requires_grad_(name != "top_k_index") for name, t in tensors.items()}
        out = moe_gemm.experts_forward(**leaves, **options, fused=fused)
        grads = torch.autograd.grad(out, [leaves[name] for name in differentiable], grad_out.to(out.dtype))
        return (out, *grads)

    fused, composed = run(inputs, True), run(inputs, False)
    float64 = {name: t.double() if t.is_floating_point() else t for name, t in inputs.items()}
    reference = run(float64, False)
    assert fused[0].dtype == dtype and torch.equal(fused[0], composed[0])
    for name, a, b, ref in zip(differentiable, fused[1:], composed[1:], reference[1:]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        fused_error = ((a.double() - ref).norm() / ref.norm()).item()
        composed_error = ((b.double() - ref).norm() / ref.norm()).item()
        assert fused_error <= 1.5 * composed_error + 1e-12, f"{name}: {fused_error:.2e} against {composed_error:.2e}"
    with torch.no_grad():
        assert torch.equal(moe_gemm.experts_forward(**inputs, **options), fused[0])


def test_fused_experts_forward_computes_only_requested_gradients():
    inputs, options = make_experts_problem(bias=True)
    inputs["down_proj"].requires_grad_()
    out = moe_gemm.experts_forward(**inputs, **options)
    (grad_down,) = torch.autograd.grad(out.sum(), inputs["down_proj"])
    inputs["hidden"].requires_grad_()
    inputs["down_proj"].requires_grad_(False)
    out = moe_gemm.experts_forward(**inputs, **options)
    (grad_hidden,) = torch.autograd.grad(out.sum(), inputs["hidden"])
    assert grad_down.shape == inputs["down_proj"].shape and grad_hidden.shape == inputs["hidden"].shape


def test_experts_forward_rejects_an_unknown_activation():
    inputs, options = make_experts_problem()
    with pytest.raises(ValueError, match="act"):
        moe_gemm.experts_forward(**inputs, **options, act="relu")


def swapped_weights(inputs):
    inputs["gate_up_proj"], inputs["down_proj"] = inputs["down_proj"], inputs["gate_up_proj"]


def _set(name, make):
    return lambda inputs: inputs.__setitem__(name, make(inputs))


# Each case breaks one argument of experts_forward; the error must name that argument, never the GEMM's x or weight.
BAD_ARGUMENTS = {
    "gate_up_proj_shape": (
        _set("gate_up_proj", lambda i: i["gate_up_proj"][:, :, :-1]),
        ValueError,
        r"^gate_up_proj: ",
    ),
    "swapped_weights": (swapped_weights, ValueError, r"^gate_up_proj: .*swapped"),
    "other_layout": (
        _set("gate_up_proj", lambda i: i["gate_up_proj"].transpose(1, 2).contiguous()),
        ValueError,
        r"^gate_up_proj: .*weight_transposed=True",
    ),
    "down_proj_intermediate": (_set("down_proj", lambda i: i["down_proj"][:, :, :-1]), ValueError, r"^down_proj: "),
    "down_proj_experts": (_set("down_proj", lambda i: i["down_proj"][:-1]), ValueError, r"^down_proj: .*E = 6"),
    "gate_up_proj_dtype": (
        _set("gate_up_proj", lambda i: i["gate_up_proj"].float()),
        TypeError,
        r"^gate_up_proj: expected the dtype of hidden \(torch.float64\), got torch.float32",
    ),
    "down_proj_dtype": (_set("down_proj", lambda i: i["down_proj"].bfloat16()), TypeError, r"^down_proj: .*dtype"),
    "hidden_3d": (_set("hidden", lambda i: i["hidden"][None]), ValueError, r"^hidden: "),
    "top_k_index_float": (_set("top_k_index", lambda i: i["top_k_index"].double()), TypeError, r"^top_k_index: "),
    "top_k_index_tokens": (_set("top_k_index", lambda i: i["top_k_index"][:-1]), ValueError, r"^top_k_index: "),
    "top_k_weights_shape": (
        _set("top_k_weights", lambda i: i["top_k_weights"][:, :2]),
        ValueError,
        r"^top_k_weights: ",
    ),
    "top_k_weights_int": (_set("top_k_weights", lambda i: i["top_k_index"]), TypeError, r"^top_k_weights: "),
    "gate_up_bias_shape": (_set("gate_up_bias", lambda i: i["gate_up_bias"][:, :-2]), ValueError, r"^gate_up_bias: "),
    "down_bias_dtype": (_set("down_bias", lambda i: i["down_bias"].float()), TypeError, r"^down_bias: "),
    "down_bias_list": (_set("down_bias", lambda i: i["down_bias"].tolist()), TypeError, r"^down_bias: "),
}


@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("case", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_experts_forward_errors_name_the_callers_arguments(case, path):
    inputs, options = make_experts_problem(hidden=16, intermediate=4, bias=True)  # H != 2I: a swap shows
    break_inputs, error, message = case
    break_inputs(inputs)
    # A named activation runs as one autograd node; a callable takes the composition of ops: both check first.
    act = "silu" if path == "fused" else (lambda gate_up: gated_activation(gate_up, "silu"))
    with pytest.raises(error, match=message):
        moe_gemm.experts_forward(**inputs, **options, act=act)


def fast_check(inputs, transposed):
    names = ("hidden", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")
    return moe_gemm.layer._arguments_fit(*[inputs.get(name) for name in names], transposed, True)


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_valid_arguments_take_the_fast_check(bias, transposed):
    # The checks run on every eager call: valid arguments must pass the quick test, not only the one that explains,
    # and every broken argument must fail it.
    inputs, _ = make_experts_problem(hidden=16, intermediate=4, bias=bias, transposed=transposed)
    assert fast_check(inputs, transposed)
    for break_inputs, _, _ in BAD_ARGUMENTS.values() if bias else ():
        broken = dict(inputs)
        break_inputs(broken)
        assert not fast_check(broken, transposed)


def test_modules_take_their_sizes_by_keyword():
    with pytest.raises(TypeError, match="positional"):
        moe_gemm.MoEExperts(4, 16, 8)
    with pytest.raises(TypeError, match="positional"):
        moe_gemm.MoE(16, 4, 8, 2)


def test_module_errors_name_the_modules_dtype_and_size():
    layer = moe_gemm.MoE(hidden_size=16, num_experts=4, intermediate_size=8, top_k=2)
    with pytest.raises(TypeError, match=r"^MoE parameters are torch.float32 but hidden is torch.bfloat16"):
        layer(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"^hidden: expected shape \[..., H\] with H = 16"):
        layer(torch.randn(3, 8))
    ids, weights = random_ids(3, 2, 4), torch.rand(3, 2)
    with pytest.raises(TypeError, match=r"^MoEExperts parameters are torch.float32 but hidden is torch.float64"):
        layer.experts(torch.randn(3, 16, dtype=torch.float64), ids, weights)


def experts_weights(experts: moe_gemm.MoEExperts) -> tuple[torch.Tensor, torch.Tensor]:
    return experts.gate_up_proj.detach(), experts.down_proj.detach()


def test_moe_experts_module_uses_hugging_face_names_and_layouts():
    experts = moe_gemm.MoEExperts(num_experts=4, hidden_size=16, intermediate_size=8, bias=True, dtype=torch.float64)
    shapes = {name: tuple(p.shape) for name, p in experts.named_parameters()}
    expected = {"gate_up_proj": (4, 16, 16), "down_proj": (4, 16, 8), "gate_up_proj_bias": (4, 16)}
    assert shapes == {**expected, "down_proj_bias": (4, 16)}
    hidden, ids, weights = torch.randn(10, 16, dtype=torch.float64), random_ids(10, 2, 4), torch.rand(10, 2)
    out = experts(hidden, ids, weights)
    biases = {"gate_up_bias": experts.gate_up_proj_bias, "down_bias": experts.down_proj_bias}
    assert_close_to_reference(out, experts_forward_reference(hidden, ids, weights, *experts_weights(experts), **biases))


@pytest.mark.parametrize(
    "options",
    [
        {"scoring": "softmax", "renormalize": True, "shared_intermediate_size": 12},
        {"scoring": "sigmoid", "renormalize": True, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
        {"scoring": "softmax_topk", "router_bias": True, "expert_bias": True, "act": "gelu"},
    ],
    ids=["qwen", "deepseek", "gpt_oss"],
)
def test_moe_layer_matches_routing_and_per_token_references(options):
    layer = moe_gemm.MoE(
        hidden_size=16, num_experts=6, intermediate_size=8, top_k=2, dtype=torch.float64, **options
    )
    if layer.e_score_correction_bias is not None:
        layer.e_score_correction_bias.normal_()
    hidden = torch.randn(3, 5, 16, dtype=torch.float64)
    out = layer(hidden)

    tokens = hidden.view(-1, 16)
    router_bias = None if layer.router.bias is None else layer.router.bias.float()
    logits = F.linear(tokens.float(), layer.router.weight.float(), router_bias)
    weights, ids = route_reference(
        logits, 2, e_score_correction_bias=layer.e_score_correction_bias, **layer.route_options
    )
    experts = layer.experts
    biases = {"gate_up_bias": experts.gate_up_proj_bias, "down_bias": experts.down_proj_bias}
    ref = experts_forward_reference(tokens, ids, weights, *experts_weights(experts), act=experts.act, **biases)
    if layer.shared_expert is not None:
        ref = ref + layer.shared_expert(tokens)
    assert out.shape == hidden.shape
    # float32 routing weights bound the agreement.
    torch.testing.assert_close(out, ref.view(hidden.shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
def test_routing_and_experts_trace_without_graph_breaks(fused):
    # fullgraph=True fails on anything that needs the host: .item(), .tolist(), nonzero, boolean-mask indexing. The
    # fused layer's autograd.Function is traced whole, forward and backward.
    inputs, _ = make_experts_problem(dtype=torch.float32, bias=True)
    del inputs["top_k_index"], inputs["top_k_weights"]
    num_experts = inputs["gate_up_proj"].shape[0]
    logits = torch.randn(inputs["hidden"].shape[0], num_experts, requires_grad=True)
    bias = torch.randn(num_experts)
    for tensor in inputs.values():
        tensor.requires_grad_()

    def layer(logits, hidden, gate_up_proj, down_proj, gate_up_bias, down_bias):
        weights, ids = moe_gemm.route(
            logits, 2, scoring="sigmoid", n_group=3, topk_group=2, e_score_correction_bias=bias
        )
        return moe_gemm.experts_forward(
            hidden, ids, weights, gate_up_proj, down_proj, gate_up_bias=gate_up_bias, down_bias=down_bias,
            fused=fused,
        )  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out, expected = compiled(logits, **inputs), layer(logits, **inputs)
    torch.testing.assert_close(out, expected)
    leaves = [logits, *inputs.values()]
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"top_k": 9}, r"top_k must be in \[1, 8\], got 9"),
        ({"top_k": 2, "scoring": "sigmoid", "n_group": 3, "topk_group": 1}, "need n_group dividing 8"),
        ({"top_k": 4, "scoring": "sigmoid", "n_group": 4, "topk_group": 1}, "top_k = 4 experts cannot come from"),
        ({"top_k": 2, "n_group": 2, "topk_group": 1}, "apply to scoring='sigmoid' only"),
        ({"top_k": 2, "scoring": "sigmoid", "n_group": 2}, "n_group and topk_group go together"),
        ({"top_k": 2, "scoring": "top"}, "scoring must be one of"),
    ],
)
def test_moe_refuses_impossible_route_options_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        moe_gemm.MoE(hidden_size=16, num_experts=8, intermediate_size=8, **options)


def test_from_modules_needs_biases_in_every_expert_or_none():
    class Expert(torch.nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.gate_proj = torch.nn.Linear(16, 8, bias=bias)
            self.up_proj = torch.nn.Linear(16, 8, bias=bias)
            self.down_proj = torch.nn.Linear(8, 16, bias=bias)
            self.act_fn = torch.nn.SiLU()

    experts = torch.nn.ModuleList([Expert(True), Expert(True), Expert(False)])
    with pytest.raises(ValueError, match="biases in every expert or in none: expert 0 has them, expert 2 has none"):
        moe_gemm.MoEExperts.from_modules(experts)


def test_the_up_projection_gathers_at_many_rows_per_expert_and_few_columns():
    assert _ops.gather_in_gemm(32768 * 8, 128, 1024)  # sonic-3: 2048 rows per expert into 1024 columns
    assert _ops.gather_in_gemm(32768 * 4, 64, 4096)  # sonic-1: 4096 columns, 16 n-blocks
    assert not _ops.gather_in_gemm(32768 * 4, 64, 5760)  # wider than measured
    assert not _ops.gather_in_gemm(2048 * 8, 128, 1024)  # 128 rows per expert
    assert not _ops.gather_in_gemm(0, 8, 512)


@pytest.mark.parametrize("num_tokens, expect_gather", [(96, True), (24, False)])
def test_up_projection_gathers_its_rows_when_the_rule_says_so(num_tokens, expect_gather, monkeypatch):
    # With the threshold at 32 rows per expert (4 experts, top-2: 96 tokens give 48 rows each) the up-projection reads
    # hidden's rows through grouped_mm_gather, below from a copy; the values are the float64 reference's either way.
    monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 32)
    inputs, options = make_experts_problem(num_tokens, 4, 2, sentinels=0.1)
    names = []
    gemm_op = _ops.gemm_op
    monkeypatch.setattr(_ops, "gemm_op", lambda name, device: names.append(name) or gemm_op(name, device))
    out = moe_gemm.experts_forward(**inputs, **options)
    assert ("grouped_mm_gather" in names) == expect_gather and names.count("grouped_mm") == (1 if expect_gather else 2)
    expected = experts_forward_reference(
        inputs["hidden"], inputs["top_k_index"], inputs["top_k_weights"], inputs["gate_up_proj"], inputs["down_proj"]
    )
    assert_close_to_reference(out, expected)


def test_up_projection_copies_a_hidden_the_kernels_cannot_read_in_place(monkeypatch):
    # Every other column of a wider tensor: the gathering kernel needs rows of unit stride, so the rows are copied.
    monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 1)
    inputs, options = make_experts_problem(96, 4, 2, sentinels=0.1)
    strided = torch.stack([inputs["hidden"], torch.full_like(inputs["hidden"], float("nan"))], dim=2).flatten(1)[:, ::2]
    assert torch.equal(strided, inputs["hidden"]) and not strided.is_contiguous()
    names = []
    gemm_op = _ops.gemm_op
    monkeypatch.setattr(_ops, "gemm_op", lambda name, device: names.append(name) or gemm_op(name, device))
    out = moe_gemm.experts_forward(**(inputs | {"hidden": strided}), **options)
    assert "grouped_mm_gather" not in names
    expected = experts_forward_reference(
        inputs["hidden"], inputs["top_k_index"], inputs["top_k_weights"], inputs["gate_up_proj"], inputs["down_proj"]
    )
    assert_close_to_reference(out, expected)


def test_the_weight_gradients_gather_at_many_rows_per_expert_read_by_few_tiles():
    # sonic-4 (32768 tokens, top-16 over 256 experts: 2048 rows per expert), n = 256.
    assert _ops.gather_in_wgrad(32768 * 16, 256, 512, gathered_is_l=False)  # gate/up, hidden as R: 4 tiles of 128
    assert _ops.gather_in_wgrad(32768 * 16, 256, 256, gathered_is_l=True)  # down, grad_out as L: 1 tile of 256
    assert _ops.gather_in_wgrad(32768 * 4, 64, 4096, gathered_is_l=False)  # sonic-1's gate/up: 32 tiles of 128
    assert not _ops.gather_in_wgrad(32768 * 4, 64, 8192, gathered_is_l=False)  # 64 tiles: more than measured
    assert _ops.gather_in_wgrad(32768 * 8, 128, 1024, gathered_is_l=True)  # 4 tiles of 256
    assert _ops.gather_in_wgrad(32768 * 8, 128, 1024, gathered_is_l=False)  # 8 tiles of 128
    assert not _ops.gather_in_wgrad(2048 * 8, 128, 512, gathered_is_l=True)  # 128 rows per expert
    assert not _ops.gather_in_wgrad(0, 8, 512, gathered_is_l=True)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("layout", ["nk", "kn", "nk_viewed"])
def test_backward_reading_rows_in_place_gives_the_copys_gradients(layout, bias, monkeypatch):
    # With the thresholds lowered, the backward reads grad_out[token_of_row] (the down-projection's input gradient and
    # weight gradient; copied instead when there is a down bias, whose gradient reads the copy) and
    # hidden[token_of_row] (the gate/up weight gradient) in place. The gradients are the copying backward's, in
    # float64 where both are exact to the last bits of the same sums.
    inputs, options = make_experts_problem(96, 4, 2, transposed=layout == "kn", bias=bias, sentinels=0.1)
    if layout == "nk_viewed":
        for name in ("gate_up_proj", "down_proj"):
            inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    differentiable = [name for name in inputs if name != "top_k_index"]
    grad_out = torch.randn(inputs["hidden"].shape, dtype=torch.float64)

    def gradients():
        leaves = {name: t.detach().requires_grad_(name != "top_k_index") for name, t in inputs.items()}
        out = moe_gemm.experts_forward(**leaves, **options)
        return torch.autograd.grad(out, [leaves[name] for name in differentiable], grad_out)

    copied = gradients()
    monkeypatch.setattr(_ops, "WGRAD_GATHER_MIN_ROWS_PER_EXPERT", 32)
    monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 32)
    names = []
    gemm_op = _ops.gemm_op
    monkeypatch.setattr(_ops, "gemm_op", lambda name, device: names.append(name) or gemm_op(name, device))
    gathered = gradients()
    assert names.count("grouped_mm_wgrad_gather") == (1 if bias else 2)
    assert names.count("grouped_mm_gather") == (1 if bias else 2)  # the up-projection, the down's input gradient
    for name, a, b in zip(differentiable, gathered, copied):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "max_reads, expected", [(1, {"nk": 1, "kn": 0}), (2, {"nk": 1, "kn": 2})], ids=["one_read", "two_reads"]
)
def test_each_weight_gradient_gathers_by_its_own_operand_side(max_reads, expected, monkeypatch):
    # n = 192: the down weight gradient's other operand is 192 wide, one tile of 256 when grad_out's rows are L
    # ([E, N, K] weights, "nk") and two of 128 when they are R ("kn"); the gate/up one's is 384 wide, hidden's rows
    # R for "nk" (3 reads) and L for "kn" (2). At most one read: only nk's down gathers; two: nk's down, kn's both.
    monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 1)
    monkeypatch.setattr(_ops, "WGRAD_GATHER_MIN_ROWS_PER_EXPERT", 1)
    monkeypatch.setattr(_ops, "WGRAD_GATHER_MAX_READS", max_reads)
    for layout, count in expected.items():
        inputs, options = make_experts_problem(24, 4, 2, 16, 192, transposed=layout == "kn", sentinels=0.1)
        leaves = {name: t.requires_grad_(name != "top_k_index") for name, t in inputs.items()}
        names = []
        gemm_op = _ops.gemm_op
        monkeypatch.setattr(_ops, "gemm_op", lambda name, device: names.append(name) or gemm_op(name, device))
        moe_gemm.experts_forward(**leaves, **options).sum().backward()
        monkeypatch.setattr(_ops, "gemm_op", gemm_op)
        assert names.count("grouped_mm_wgrad_gather") == count, (layout, names)
