"""The experts layer with FP8 weights (``experts_forward_fp8``) and transformers' FP8 experts through
``experts_implementation="moe_gemm"``, on the CPU: against a float64 pipeline that quantizes at the same points, and
against the unquantized layer within FP8's error."""

import pytest
import torch
from helpers import relative_error
from test_layer import make_experts_problem

import moe_gemm
import moe_gemm.layer
from moe_gemm.layer_fp8 import experts_forward_fp8
from moe_gemm.reference import experts_forward_reference


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, N, K]`` -> float8_e4m3fn weight and ``[E, ceil(N/128), ceil(K/128)]`` scales, amax / 448 per 128 x 128
    block (as a product with the reciprocal, the package's rounding): written here apart from the package's
    ``quantize_fp8_weight``, which is checked against it."""
    num_experts, n, k = weight.shape
    nb, kb = -(-n // 128), -(-k // 128)
    padded = torch.nn.functional.pad(weight.float(), (0, kb * 128 - k, 0, nb * 128 - n))
    blocks = padded.reshape(num_experts, nb, 128, kb, 128)
    scale = (blocks.abs().amax(dim=(2, 4)) * (1.0 / 448)).clamp_min(1e-12)
    quantized = (blocks / scale[:, :, None, :, None]).reshape(num_experts, nb * 128, kb * 128)[:, :n, :k]
    return quantized.to(torch.float8_e4m3fn), scale


def dequantize_blocks(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape[1:]
    expanded = scale.repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :n, :k]
    return weight.double() * expanded.double()


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``quantize_fp8`` and back, in float64: what the layer's GEMMs read."""
    values, scale = moe_gemm.quantize_fp8(x)
    return values.double() * scale.double().repeat_interleave(128, dim=1)[:, : x.shape[1]]


def make_fp8_problem(num_tokens=40, num_experts=6, top_k=3, hidden=200, intermediate=72):
    inputs, _ = make_experts_problem(num_tokens, num_experts, top_k, hidden, intermediate, sentinels=0.1)
    gate_up, gate_up_scale = quantize_blocks(inputs["gate_up_proj"])
    down, down_scale = quantize_blocks(inputs["down_proj"])
    fp8 = {"gate_up_proj": gate_up, "gate_up_proj_scale": gate_up_scale, "down_proj": down,
           "down_proj_scale": down_scale}  # fmt: skip
    return inputs, fp8


def pairs_reference(hidden, ids, weights, gate_up, down, gate, quantize) -> torch.Tensor:
    """Per pair in float64 GEMMs: ``gate`` of the bfloat16 gate/up output, the down projection of its result (through
    ``quantize``), each rounded to bfloat16 as the layer's outputs are, weighted and summed per token; ids outside
    [0, E) add nothing."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t, (experts, row_weights) in enumerate(zip(ids.tolist(), weights.tolist())):
        for expert, weight in zip(experts, row_weights):
            if 0 <= expert < gate_up.shape[0]:
                activated = gate((hidden[t] @ gate_up[expert].T).to(torch.bfloat16)[None])
                out[t] += weight * (quantize(activated)[0] @ down[expert].T).to(torch.bfloat16).double()
    return out


def pipeline_reference(inputs: dict, fp8: dict) -> torch.Tensor:
    """The layer's steps with float64 GEMMs: the hidden rows quantized, the weights dequantized, SwiGLU in bfloat16
    (as the layer computes it), the activation quantized."""
    gate_up = dequantize_blocks(fp8["gate_up_proj"], fp8["gate_up_proj_scale"])
    down = dequantize_blocks(fp8["down_proj"], fp8["down_proj_scale"])
    hidden = quantized_rows(inputs["hidden"].to(torch.bfloat16))
    return pairs_reference(hidden, inputs["top_k_index"], inputs["top_k_weights"], gate_up, down,
                           moe_gemm.layer.gated_activation, quantized_rows)  # fmt: skip


def test_matches_a_float64_pipeline_that_quantizes_at_the_same_points():
    inputs, fp8 = make_fp8_problem()
    hidden = inputs["hidden"].to(torch.bfloat16)
    out = experts_forward_fp8(hidden, inputs["top_k_index"], inputs["top_k_weights"], **fp8)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape
    # 1.6e-3 seen: float32 against float64 sums, now and then one fp8 rounding flipped by them.
    assert relative_error(out.double(), pipeline_reference(inputs, fp8)) < 5e-3


def test_stays_within_fp8_error_of_the_unquantized_layer():
    inputs, fp8 = make_fp8_problem()
    hidden = inputs["hidden"].to(torch.bfloat16)
    out = experts_forward_fp8(hidden, inputs["top_k_index"], inputs["top_k_weights"], **fp8)
    exact = experts_forward_reference(
        inputs["hidden"], inputs["top_k_index"], inputs["top_k_weights"], inputs["gate_up_proj"], inputs["down_proj"]
    )
    error = relative_error(out.double(), exact.double())
    # Weights and activations each rounded to 3 mantissa bits (at most 2**-4 relative per element, 3.6% RMS): 6.7%
    # seen, far more than bf16's rounding alone.
    assert 1e-2 < error < 0.1


def quantize_channels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, N, K]`` -> float8_e4m3fn weight and ``[E, N]`` scales, amax / 448 per output channel."""
    scale = (weight.float().abs().amax(dim=2) * (1.0 / 448)).clamp_min(1e-12)
    return (weight.float() / scale[:, :, None]).to(torch.float8_e4m3fn), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return weight.double() * scale.double()[:, :, None] if scale.dim() == 2 else dequantize_blocks(weight, scale)


def fp8_gradients(inputs: dict, fp8: dict, grad_out: torch.Tensor, **options) -> dict[str, torch.Tensor]:
    hidden = inputs["hidden"].to(torch.bfloat16).requires_grad_()
    weights = inputs["top_k_weights"].clone().requires_grad_()
    out = experts_forward_fp8(hidden, inputs["top_k_index"], weights, **fp8, **options)
    out.backward(grad_out)
    return {"out": out.detach(), "hidden": hidden.grad, "top_k_weights": weights.grad}


def backward_pipeline_reference(inputs: dict, fp8: dict, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backward's steps per pair with float64 GEMMs, quantized where the layer quantizes: each token's output
    gradient (per row and 128 columns), through the down weight's transpose (rounded to bfloat16), SwiGLU's backward
    from the bfloat16 pre-activation with the forward's roundings (rounded to bfloat16), quantized, through the
    gate/up weight's transpose (rounded to bfloat16), summed per token; the routing weight's gradient
    <grad_activated, activated>. With per-channel scales ``[E, N]`` each pair's gradient row is multiplied by its
    expert's scale (in float32) before it is quantized, and the GEMM reads the unscaled fp8 values. The weight
    gradients of weights to train, from the unquantized rows: ``gate_up_proj`` sums grad_pre (x) hidden[t] over the
    expert's pairs, ``down_proj`` grad_out[t] (x) (w * activated, rounded to bfloat16)."""
    gate_up_weight = dequantize(fp8["gate_up_proj"], fp8["gate_up_proj_scale"])
    hidden = quantized_rows(inputs["hidden"].to(torch.bfloat16))
    grad_rows = quantized_rows(grad_out)

    def transposed_gemm(row: torch.Tensor, name: str, expert: int, token_row=None) -> torch.Tensor:
        """``row @ W_e`` as the layer computes it, rounded to bfloat16."""
        values, scale = fp8[name], fp8[f"{name}_scale"]
        if scale.dim() == 2:
            quantized = quantized_rows((row.float() * scale[expert])[None])[0]
            return (quantized @ values[expert].double()).to(torch.bfloat16).double()
        quantized = token_row if token_row is not None else quantized_rows(row[None])[0]
        return (quantized @ dequantize(values, scale)[expert]).to(torch.bfloat16).double()

    ids, weights = inputs["top_k_index"], inputs["top_k_weights"]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float64)
    grad_weights = torch.zeros(ids.shape, dtype=torch.float64)
    unquantized = inputs["hidden"].to(torch.bfloat16).double()
    grad_gate_up_proj = torch.zeros(fp8["gate_up_proj"].shape, dtype=torch.float64)
    grad_down_proj = torch.zeros(fp8["down_proj"].shape, dtype=torch.float64)
    for t, experts in enumerate(ids.tolist()):
        for j, expert in enumerate(experts):
            if not 0 <= expert < gate_up_weight.shape[0]:
                continue
            pre = (hidden[t] @ gate_up_weight[expert].T).to(torch.bfloat16).double()
            gate, up = pre.chunk(2)
            sigmoid = torch.sigmoid(gate)
            # silu(gate) and the activation rounded to bfloat16 as the forward rounds them.
            activated_gate = (gate * sigmoid).to(torch.bfloat16).double()
            activated = (activated_gate * up).to(torch.bfloat16).double()
            grad_activated = transposed_gemm(grad_out[t], "down_proj", expert, token_row=grad_rows[t])
            grad_weights[t, j] = (grad_activated * activated).sum()
            weighted = grad_activated * weights[t, j].double()
            grad_gate = weighted * up * sigmoid * (1 + gate * (1 - sigmoid))
            grad_pre = torch.cat([grad_gate, weighted * activated_gate]).to(torch.bfloat16)
            grad_hidden[t] += transposed_gemm(grad_pre, "gate_up_proj", expert)
            grad_gate_up_proj[expert] += torch.outer(grad_pre.double(), unquantized[t])
            weighted_activated = (activated * weights[t, j].double()).to(torch.bfloat16).double()
            grad_down_proj[expert] += torch.outer(grad_out[t].double(), weighted_activated)
    return {"hidden": grad_hidden, "top_k_weights": grad_weights, "gate_up_proj": grad_gate_up_proj,
            "down_proj": grad_down_proj}  # fmt: skip


def test_gradients_match_a_float64_pipeline_that_quantizes_at_the_same_points():
    inputs, fp8 = make_fp8_problem()
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = fp8_gradients(inputs, fp8, grad_out)
    expected = backward_pipeline_reference(inputs, fp8, grad_out)
    # float32 sums against float64, and now and then an fp8 rounding flipped by them: 1.7e-3 and 6e-5 seen (the
    # unquantized layer is 4-7% away).
    for name, tolerance in (("hidden", 5e-3), ("top_k_weights", 5e-4)):
        assert got[name].dtype == (torch.bfloat16 if name == "hidden" else inputs["top_k_weights"].dtype)
        assert relative_error(got[name].double(), expected[name]) < tolerance, name
    dropped = (inputs["top_k_index"] < 0) | (inputs["top_k_index"] >= fp8["gate_up_proj"].shape[0])
    assert dropped.any() and torch.equal(got["top_k_weights"][dropped], torch.zeros_like(got["top_k_weights"][dropped]))


@pytest.mark.parametrize("granularity", ["blocks", "channels"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_gradients_of_both_scalings_and_layouts_match_the_float64_pipeline(granularity, transposed):
    inputs, _ = make_fp8_problem()
    quantize = quantize_blocks if granularity == "blocks" else quantize_channels
    logical, layer = {}, {}  # the [E, N, K] weights of the reference; the layer's, in the layout under test
    for name in ("gate_up_proj", "down_proj"):
        values, scale = quantize(inputs[name])
        logical |= {name: values, f"{name}_scale": scale}
        if transposed:  # the other layout in memory, with its blocks (a per-channel scale stays [E, N])
            values = values.transpose(1, 2).contiguous()
            scale = scale.transpose(1, 2).contiguous() if scale.dim() == 3 else scale
        layer |= {name: values, f"{name}_scale": scale}
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = fp8_gradients(inputs, layer, grad_out, weight_transposed=transposed)
    expected = backward_pipeline_reference(inputs, logical, grad_out)
    # As above (the unquantized layer: 4-7%).
    assert relative_error(got["hidden"].double(), expected["hidden"]) < 5e-3
    assert relative_error(got["top_k_weights"].double(), expected["top_k_weights"]) < 5e-4


@pytest.mark.parametrize("granularity", ["blocks", "channels"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "callable"])
def test_gradients_stay_within_fp8_error_of_the_unquantized_layer(granularity, transposed, act):
    inputs, _ = make_fp8_problem()
    quantize = quantize_blocks if granularity == "blocks" else quantize_channels
    fp8 = {}
    for name in ("gate_up_proj", "down_proj"):
        values, scale = quantize(inputs[name])
        dequantized = dequantize(values, scale)
        if transposed:  # the other layout in memory, with its blocks (a per-channel scale stays [E, N])
            values = values.transpose(1, 2).contiguous()
            scale = scale.transpose(1, 2).contiguous() if scale.dim() == 3 else scale
        fp8 |= {name: values, f"{name}_scale": scale, f"exact_{name}": dequantized}
    exact_weights = {name: fp8.pop(f"exact_{name}") for name in ("gate_up_proj", "down_proj")}
    options = {"weight_transposed": transposed, "act": torch.nn.functional.silu if act == "callable" else act}
    if act == "callable":  # experts_forward_fp8's callable maps the [rows, 2I] pre-activation to [rows, I]
        options["act"] = lambda gate_up: torch.nn.functional.silu(gate_up.chunk(2, -1)[0]) * gate_up.chunk(2, -1)[1]
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = fp8_gradients(inputs, fp8, grad_out, **options)
    # float64 autograd through the dequantized weights, activations unquantized.
    hidden = inputs["hidden"].double().requires_grad_()
    weights = inputs["top_k_weights"].double().requires_grad_()
    exact = moe_gemm.experts_forward(hidden, inputs["top_k_index"], weights, exact_weights["gate_up_proj"],
                                     exact_weights["down_proj"], act="silu" if act == "callable" else act)  # fmt: skip
    exact.backward(grad_out.double())
    for name, want in (("out", exact.detach()), ("hidden", hidden.grad), ("top_k_weights", weights.grad)):
        # Each GEMM's operands rounded to 3 mantissa bits: 4-7% seen, a wrong transpose or scale is ~100%.
        assert 1e-3 < relative_error(got[name].double(), want) < 0.1, name


def test_gradients_of_experts_without_rows_and_of_no_tokens():
    inputs, fp8 = make_fp8_problem(num_tokens=5)
    inputs["top_k_index"][:, :] = torch.tensor([0, 2, -1])  # experts 1, 3-5 get no rows
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = fp8_gradients(inputs, fp8, grad_out)
    assert torch.isfinite(got["hidden"]).all() and got["hidden"].abs().sum() > 0
    assert torch.equal(got["top_k_weights"][:, 2], torch.zeros(5))
    none = {"hidden": inputs["hidden"][:0], "top_k_index": inputs["top_k_index"][:0],
            "top_k_weights": inputs["top_k_weights"][:0]}  # fmt: skip
    empty = fp8_gradients(none, fp8, grad_out[:0])
    assert empty["hidden"].shape == (0, inputs["hidden"].shape[1]) and empty["top_k_weights"].shape == (0, 3)


def test_the_transposed_weight_is_made_once_and_again_when_the_weight_changes():
    import gc

    from moe_gemm import layer_fp8

    _, fp8 = make_fp8_problem(num_tokens=1)
    weight = fp8["down_proj"].clone()
    first = layer_fp8._transposed_in_memory(weight)
    assert first.is_contiguous() and torch.equal(first.view(torch.uint8), weight.transpose(1, 2).view(torch.uint8))
    assert layer_fp8._transposed_in_memory(weight) is first  # kept
    weight.view(torch.uint8)[0, 0, 0] += 1  # an in-place change: made again
    again = layer_fp8._transposed_in_memory(weight)
    assert again is not first and torch.equal(again.view(torch.uint8), weight.transpose(1, 2).view(torch.uint8))
    assert not hasattr(weight, "_moe_gemm_transposed")  # kept beside the weight, not on it (torch.save, deepcopy)
    key = id(weight)
    del weight, first, again
    gc.collect()
    assert key not in layer_fp8._TRANSPOSED  # dropped with its weight


def test_each_backward_reuses_the_transposes_when_the_scales_are_new_views(monkeypatch):
    # transformers' integration passes a new view of each scale per call (weight_scale_inv.float()[:, :n]): the
    # weight's transpose is still made once.
    from moe_gemm import layer_fp8

    inputs, fp8 = make_fp8_problem(num_tokens=8)
    made = []
    original = torch.Tensor.contiguous

    def counting(tensor, *args, **kwargs):
        if tensor.dtype == torch.float8_e4m3fn and not tensor.is_contiguous():
            made.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", counting)
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    for _ in range(3):
        views = fp8 | {name: fp8[name][:] for name in ("gate_up_proj_scale", "down_proj_scale")}
        fp8_gradients(inputs, views, grad_out)
    assert len(made) == 2  # down_proj's and gate_up_proj's, at the first backward only
    assert layer_fp8._TRANSPOSED  # kept


def test_tokens_whose_ids_are_all_sentinels_are_zero_and_no_tokens_give_no_rows():
    inputs, fp8 = make_fp8_problem(num_tokens=5)
    inputs["hidden"] = inputs["hidden"].to(torch.bfloat16)
    ids = inputs["top_k_index"].clone()
    ids[2] = -1
    ids[3] = fp8["gate_up_proj"].shape[0]
    out = experts_forward_fp8(inputs["hidden"], ids, inputs["top_k_weights"], **fp8)
    assert torch.equal(out[2:4], torch.zeros_like(out[2:4])) and out[0].abs().sum() > 0
    empty = experts_forward_fp8(inputs["hidden"][:0], ids[:0], inputs["top_k_weights"][:0], **fp8)
    assert empty.shape == (0, inputs["hidden"].shape[1])


def test_bad_arguments_raise():
    inputs, fp8 = make_fp8_problem(num_tokens=4)
    hidden, ids, weights = inputs["hidden"].to(torch.bfloat16), inputs["top_k_index"], inputs["top_k_weights"]
    with pytest.raises(TypeError, match="hidden: expected torch.bfloat16, torch.float16 or torch.float32"):
        experts_forward_fp8(hidden.double(), ids, weights, **fp8)
    with pytest.raises(ValueError, match="top_k_index: expected"):
        experts_forward_fp8(hidden, ids[:3], weights, **fp8)
    with pytest.raises(ValueError, match="act must be one of"):
        experts_forward_fp8(hidden, ids, weights, **fp8, act="relu")
    with pytest.raises(ValueError, match="down_proj_scale: experts_forward_fp8 computes no gradient for fp8 weights"):
        experts_forward_fp8(hidden, ids, weights, **(fp8 | {"down_proj_scale": fp8["down_proj_scale"].detach().requires_grad_()}))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        experts_forward_fp8(hidden.detach(), ids, weights, **(fp8 | {"down_proj": fp8["down_proj"].float()}))


@pytest.mark.parametrize("variant", ["swiglu", "clamped_swiglu"])
def test_transformers_fp8_experts_run_on_moe_gemm(variant):
    # transformers' FP8Experts (fine-grained FP8, 128 x 128 blocks) with experts_implementation="moe_gemm": the same
    # output as its own code on the dequantized weights within FP8's activation rounding; the clamped SwiGLU of
    # GPT-OSS-style configs goes through the module's own gate.
    try:
        from transformers import Qwen3MoeConfig
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
        from transformers.integrations.moe import use_experts_implementation
    except ImportError as error:
        pytest.skip(f"this transformers has no fine-grained FP8 experts interface: {error}")

    from moe_gemm.integrations import transformers as integration

    integration.register()
    config = Qwen3MoeConfig(hidden_size=200, moe_intermediate_size=72, num_experts=6, num_experts_per_tok=3)
    if variant == "clamped_swiglu":
        config.swiglu_alpha, config.swiglu_limit = 1.702, 0.5
    config._experts_implementation = "moe_gemm"
    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS,
                                     has_bias=False, has_gate=True)  # fmt: skip
    module = cls(config=config, block_size=(128, 128))
    inputs, fp8 = make_fp8_problem(hidden=200, intermediate=72)
    with torch.no_grad():
        module.gate_up_proj.copy_(fp8["gate_up_proj"])
        module.gate_up_proj_scale_inv.copy_(fp8["gate_up_proj_scale"])
        module.down_proj.copy_(fp8["down_proj"])
        module.down_proj_scale_inv.copy_(fp8["down_proj_scale"])
    hidden = inputs["hidden"].to(torch.bfloat16)
    with torch.no_grad():
        out = module(hidden, inputs["top_k_index"].clamp(0, 5), inputs["top_k_weights"])
    # The module's own gate on the dequantized weights in float64 GEMMs, the activations unquantized.
    gate_up = dequantize_blocks(fp8["gate_up_proj"], fp8["gate_up_proj_scale"])
    down = dequantize_blocks(fp8["down_proj"], fp8["down_proj_scale"])
    expected = pairs_reference(hidden.double(), inputs["top_k_index"].clamp(0, 5), inputs["top_k_weights"], gate_up,
                               down, module._apply_gate, lambda a: a.double())  # fmt: skip
    assert out.dtype == torch.bfloat16
    error = relative_error(out.double(), expected)
    assert 1e-3 < error < 0.06  # FP8 rounding of the activations, both GEMMs


def test_quantize_fp8_weight_matches_the_blockwise_quantization_written_here():
    weight = torch.randn(3, 200, 300) * torch.logspace(-3, 1, 300)  # columns of very different magnitudes
    weight[1] = 0  # an all-zero expert: tiny scales, exact zeros back
    values, scale = moe_gemm.quantize_fp8_weight(weight.to(torch.bfloat16))
    expected_values, expected_scale = quantize_blocks(weight.to(torch.bfloat16))
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (3, 2, 3) and scale.dtype == torch.float32
    assert torch.equal(scale[[0, 2]], expected_scale[[0, 2]])
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    back = dequantize_blocks(values, scale)
    assert torch.equal(back[1], torch.zeros_like(back[1])) and (scale[1] > 0).all()
    # Half a step of e4m3 (2**-4 relative) at most, except values under the block's subnormal range.
    big = weight.double().abs() > scale.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :300] * 2**-6
    rounded = weight.to(torch.bfloat16).double()
    assert ((back - rounded).abs() <= rounded.abs() * 2**-4)[big].all()
    with pytest.raises(ValueError, match="weight: expected a 3-D float tensor"):
        moe_gemm.quantize_fp8_weight(weight[0])


def test_moe_layer_served_in_fp8_by_swapping_its_experts():
    torch.manual_seed(0)
    layer = moe_gemm.MoE(hidden_size=256, num_experts=8, intermediate_size=192, top_k=2, dtype=torch.bfloat16)
    hidden = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = layer(hidden)
        layer.experts = moe_gemm.MoEExpertsFP8.from_experts(layer.experts)
        out = layer(hidden)
    assert isinstance(layer.experts, moe_gemm.MoEExpertsFP8) and layer.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert out.shape == exact.shape and 1e-3 < relative_error(out.double(), exact.double()) < 0.1
    assert "float8_e4m3fn in 128 x 128 blocks" in repr(layer.experts)
    with pytest.raises(ValueError, match="biases"):
        moe_gemm.MoEExpertsFP8.from_experts(moe_gemm.MoEExperts(num_experts=2, hidden_size=8, intermediate_size=4,
                                                                 bias=True))  # fmt: skip


def test_compiles_whole_and_computes_the_same():
    inputs, fp8 = make_fp8_problem(num_tokens=6)
    arguments = (inputs["hidden"].to(torch.bfloat16), inputs["top_k_index"], inputs["top_k_weights"])
    compiled = torch.compile(experts_forward_fp8, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*arguments, **fp8), experts_forward_fp8(*arguments, **fp8))


def test_fp8_experts_of_a_callable_activation_keep_the_activation_not_the_bf16_module():
    import gc
    import weakref

    torch.manual_seed(1)
    experts = moe_gemm.MoEExperts(num_experts=4, hidden_size=128, intermediate_size=64, act=torch.nn.SiLU(),
                                  dtype=torch.bfloat16)  # fmt: skip
    hidden = torch.randn(10, 128, dtype=torch.bfloat16)
    ids, weights = torch.randint(0, 4, (10, 2)), torch.rand(10, 2)
    with torch.no_grad():
        exact = experts(hidden, ids, weights)
    fp8_experts = moe_gemm.MoEExpertsFP8.from_experts(experts)
    module = weakref.ref(experts)
    del experts
    gc.collect()
    assert module() is None  # its bf16 weights are freed
    with torch.no_grad():
        out = fp8_experts(hidden, ids, weights)
    assert 1e-3 < relative_error(out.double(), exact.double()) < 0.1


def test_transformers_fp8_experts_without_blocks_are_refused():
    try:
        from transformers import Qwen3MoeConfig
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
        from transformers.integrations.moe import use_experts_implementation
    except ImportError as error:
        pytest.skip(f"this transformers has no fine-grained FP8 experts interface: {error}")
    from moe_gemm.integrations import transformers as integration

    integration.register()
    config = Qwen3MoeConfig(hidden_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "moe_gemm"
    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS,
                                     has_bias=False, has_gate=True)  # fmt: skip
    module = cls(config=config, block_size=None)
    with pytest.raises(NotImplementedError, match="128 x 128 weight blocks"):
        module(torch.randn(3, 128, dtype=torch.bfloat16), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2))
