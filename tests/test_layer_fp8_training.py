"""FP8 experts trained from high-precision weights (``experts_forward_fp8`` with both scales None), on the CPU: the
forward is the fp8 layer's on the weights' 128 x 128 block quantization, bit for bit; the weight gradients come from
the unquantized rows, against the float64 pipeline of tests/test_layer_fp8.py and within FP8's error of the
unquantized layer's."""

import pytest
import torch
from helpers import relative_error
from test_layer_fp8 import backward_pipeline_reference, fp8_gradients, make_fp8_problem

import moe_gemm
from moe_gemm.layer_fp8 import MoEExpertsFP8Training, experts_forward_fp8, quantize_fp8_weight
from moe_gemm.reference import experts_forward_reference


def trained_gradients(inputs: dict, grad_out: torch.Tensor, weight_dtype=torch.bfloat16, **options) -> dict:
    """out and the gradients of hidden, top_k_weights and both weights, given in ``weight_dtype`` to train."""
    hidden = inputs["hidden"].to(torch.bfloat16).requires_grad_()
    top_k_weights = inputs["top_k_weights"].clone().requires_grad_()
    weights = {name: inputs[name].to(weight_dtype).requires_grad_() for name in ("gate_up_proj", "down_proj")}
    out = experts_forward_fp8(hidden, inputs["top_k_index"], top_k_weights, weights["gate_up_proj"], None,
                              weights["down_proj"], None, **options)  # fmt: skip
    out.backward(grad_out)
    return {"out": out.detach(), "hidden": hidden.grad, "top_k_weights": top_k_weights.grad,
            **{name: value.grad for name, value in weights.items()}}  # fmt: skip


def quantized_as_the_layer_does(inputs: dict, weight_dtype=torch.bfloat16) -> dict:
    fp8 = {}
    for name in ("gate_up_proj", "down_proj"):
        fp8[name], fp8[f"{name}_scale"] = quantize_fp8_weight(inputs[name].to(weight_dtype))
    return fp8


def test_the_forward_is_the_fp8_layer_on_the_weights_block_quantization():
    inputs, _ = make_fp8_problem()
    hidden = inputs["hidden"].to(torch.bfloat16)
    fp8 = quantized_as_the_layer_does(inputs)
    frozen = experts_forward_fp8(hidden, inputs["top_k_index"], inputs["top_k_weights"], **fp8)
    weights = {name: inputs[name].to(torch.bfloat16) for name in ("gate_up_proj", "down_proj")}
    served = experts_forward_fp8(hidden, inputs["top_k_index"], inputs["top_k_weights"], weights["gate_up_proj"], None,
                                 weights["down_proj"], None)  # fmt: skip
    trained = trained_gradients(inputs, torch.ones_like(hidden))["out"]
    assert torch.equal(served, frozen) and torch.equal(trained, frozen)


def test_gradients_match_a_float64_pipeline_that_quantizes_at_the_same_points():
    inputs, _ = make_fp8_problem()
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = trained_gradients(inputs, grad_out)
    fp8 = quantized_as_the_layer_does(inputs)
    # The input gradients are the frozen layer's on the same fp8 weights, bit for bit.
    frozen = fp8_gradients(inputs, fp8, grad_out)
    assert torch.equal(got["hidden"], frozen["hidden"]) and torch.equal(got["top_k_weights"], frozen["top_k_weights"])
    expected = backward_pipeline_reference(inputs, fp8, grad_out)
    # The weight gradients are the float64 sums rounded to bfloat16, but for 0.1-0.2% of their elements one unit of
    # the last place away (float32 sums: 1.6e-4 seen); from fp8-quantized rows they would be 2-3% away.
    for name in ("gate_up_proj", "down_proj"):
        assert got[name].dtype == torch.bfloat16 and got[name].shape == inputs[name].shape
        assert relative_error(got[name].double(), expected[name].bfloat16().double()) < 1e-3, name
        # Expert 1 gets no rows (make_experts_problem): exact zeros.
        assert torch.equal(got[name][1], torch.zeros_like(got[name][1])), name


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_weight_gradients_stay_within_fp8_error_of_the_unquantized_layer(act):
    inputs, _ = make_fp8_problem()
    grad_out = torch.randn(inputs["hidden"].shape)
    got = trained_gradients(inputs, grad_out.to(torch.bfloat16), weight_dtype=torch.float32, act=act)
    exact = {name: inputs[name].double().requires_grad_() for name in ("gate_up_proj", "down_proj")}
    out = experts_forward_reference(inputs["hidden"].double(), inputs["top_k_index"], inputs["top_k_weights"].double(),
                                    exact["gate_up_proj"], exact["down_proj"], act=act)  # fmt: skip
    out.backward(grad_out.double())
    for name in ("gate_up_proj", "down_proj"):
        assert got[name].dtype == torch.float32  # the weights' dtype
        error = relative_error(got[name].double(), exact[name].grad)
        # The forward's fp8 roundings reach the weight gradients through the activation and grad_activated: 5.4%
        # seen for each, as for the input gradients.
        assert error < 0.1, (name, error)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_only_the_weights_require_grad_in_other_dtypes_and_a_callable_activation(dtype):
    inputs, _ = make_fp8_problem(num_tokens=16)
    grad_out = torch.randn(inputs["hidden"].shape).to(dtype)
    act = torch.nn.functional.silu
    weights = {name: inputs[name].to(dtype).requires_grad_() for name in ("gate_up_proj", "down_proj")}
    out = experts_forward_fp8(inputs["hidden"].to(dtype), inputs["top_k_index"], inputs["top_k_weights"],
                              weights["gate_up_proj"], None, weights["down_proj"], None,
                              act=lambda gate_up: act(gate_up.chunk(2, dim=-1)[0]) * gate_up.chunk(2, dim=-1)[1])
    out.backward(grad_out)
    everything = trained_gradients(inputs, grad_out.to(torch.bfloat16), weight_dtype=dtype)
    for name, value in weights.items():
        assert value.grad.dtype == dtype
        # The same gradients as with hidden and top_k_weights trained too, in bfloat16 and SwiGLU by name.
        assert relative_error(value.grad.double(), everything[name].double()) < 2e-2, name


def test_the_weights_are_quantized_a_few_experts_at_a_time(monkeypatch):
    weight = torch.randn(5, 200, 136, dtype=torch.bfloat16)
    whole = quantize_fp8_weight(weight)
    monkeypatch.setattr(moe_gemm.layer_fp8, "QUANTIZE_CHUNK_ELEMENTS", 2 * 256 * 256)  # two experts' blocks
    chunked = quantize_fp8_weight(weight)
    assert torch.equal(whole[0].view(torch.uint8), chunked[0].view(torch.uint8)) and torch.equal(whole[1], chunked[1])
    master = torch.randn(2, 256, 128)  # float32, whole blocks: the float32 copy could have been the weight itself
    before = master.clone()
    values, scale = quantize_fp8_weight(master)
    values_t, scale_t = quantize_fp8_weight(master.transpose(1, 2))  # the backward's: the same blocks, transposed
    assert torch.equal(master, before)
    assert torch.equal(values.transpose(1, 2).contiguous().view(torch.uint8), values_t.view(torch.uint8))
    assert torch.equal(scale.transpose(1, 2), scale_t)
    for shape in ((3, 0, 64), (3, 64, 0), (0, 64, 64)):
        values, scale = quantize_fp8_weight(torch.zeros(shape))
        assert values.shape == shape and scale.shape == (shape[0], -(-shape[1] // 128), -(-shape[2] // 128))


def test_no_tokens_give_zero_weight_gradients():
    inputs, _ = make_fp8_problem(num_tokens=0)
    got = trained_gradients(inputs, torch.zeros(0, inputs["hidden"].shape[1], dtype=torch.bfloat16))
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(got[name], torch.zeros_like(got[name])), name


def test_bad_arguments_raise():
    inputs, fp8 = make_fp8_problem(num_tokens=4)
    hidden, ids, weights = inputs["hidden"].to(torch.bfloat16), inputs["top_k_index"], inputs["top_k_weights"]
    gate_up, down = inputs["gate_up_proj"].to(torch.bfloat16), inputs["down_proj"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="both None"):
        experts_forward_fp8(hidden, ids, weights, fp8["gate_up_proj"], fp8["gate_up_proj_scale"], down, None)
    with pytest.raises(ValueError, match="weight_transposed"):
        experts_forward_fp8(hidden, ids, weights, gate_up, None, down, None, weight_transposed=True)
    with pytest.raises(TypeError, match="weights to train .* fp8 weights come with their scales"):
        experts_forward_fp8(hidden, ids, weights, fp8["gate_up_proj"], None, fp8["down_proj"], None)
    with pytest.raises(ValueError, match="down_proj: expected shape"):
        experts_forward_fp8(hidden, ids, weights, gate_up, None, down[:, :, :-8], None)


def test_the_module_trains_the_experts_own_parameters():
    torch.manual_seed(0)
    experts = moe_gemm.MoEExperts(num_experts=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
    optimizer = torch.optim.SGD(experts.parameters(), lr=0.1)
    trained = MoEExpertsFP8Training.from_experts(experts)
    assert trained.gate_up_proj is experts.gate_up_proj and trained.down_proj is experts.down_proj
    assert not isinstance(trained, moe_gemm.MoEExperts)  # expert_parallel() would make it a bf16 layer again
    hidden = torch.randn(32, 256, dtype=torch.bfloat16)
    ids = torch.randint(0, 4, (32, 2))
    weights = torch.rand(32, 2)
    out = trained(hidden, ids, weights)
    reference = experts_forward_fp8(hidden, ids, weights, experts.gate_up_proj, None, experts.down_proj, None)
    assert torch.equal(out, reference)
    before = experts.down_proj.detach().clone()
    out.float().square().sum().backward()
    optimizer.step()  # the optimizer built on the MoEExperts moves the parameters the FP8 module trained
    assert not torch.equal(experts.down_proj.detach(), before)
    assert "FP8" in repr(trained)


def test_the_module_refuses_what_it_cannot_train():
    with pytest.raises(TypeError, match="moe_gemm.MoEExperts"):
        MoEExpertsFP8Training.from_experts(torch.nn.Linear(2, 2))
    experts = moe_gemm.MoEExperts(num_experts=2, hidden_size=128, intermediate_size=64, bias=True)
    with pytest.raises(ValueError, match="biases"):
        MoEExpertsFP8Training.from_experts(experts)
    module = MoEExpertsFP8Training(num_experts=2, hidden_size=128, intermediate_size=64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="parameters are torch.bfloat16 but hidden is torch.float32"):
        module(torch.randn(3, 128), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def accumulate(module, batches) -> dict:
    """The gradients of ``module``'s weights summed over ``batches`` of ``(hidden, ids, weights)``."""
    for name in ("gate_up_proj", "down_proj"):
        getattr(module, name).grad = None
    for hidden, ids, weights in batches:
        module(hidden, ids, weights).float().square().sum().backward()
    return {name: getattr(module, name).grad.clone() for name in ("gate_up_proj", "down_proj")}


def micro_batches(count: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        hidden = torch.randn(24, 256, generator=generator).to(torch.bfloat16).requires_grad_()
        batches.append((hidden, torch.randint(0, 4, (24, 2), generator=generator), torch.rand(24, 2, generator=generator)))
    return batches


def counted_quantizations(monkeypatch) -> list:
    """The shapes of the weights ``quantize_fp8_weight`` quantizes from now on, in order."""
    quantized = []
    original = moe_gemm.layer_fp8.quantize_fp8_weight
    monkeypatch.setattr(moe_gemm.layer_fp8, "quantize_fp8_weight", lambda w: quantized.append(w.shape) or original(w))
    return quantized


def small_trained_module() -> tuple:
    torch.manual_seed(0)
    experts = moe_gemm.MoEExperts(num_experts=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
    return experts, MoEExpertsFP8Training.from_experts(experts)


def test_reused_quantized_weights_give_the_same_gradients_for_a_quarter_of_the_quantizations(monkeypatch):
    experts, module = small_trained_module()
    quantized = counted_quantizations(monkeypatch)
    batches = micro_batches(4, seed=1)
    expected = accumulate(module, batches)
    assert len(quantized) == 16  # both weights, as stored and transposed, in each of the four micro-batches
    quantized.clear()
    with moe_gemm.reuse_quantized_weights():
        got = accumulate(module, batches[:3])
    for name, value in accumulate(module, batches[3:]).items():  # after the block, quantized again
        got[name] += value
    assert len(quantized) == 4 + 4
    for name in expected:  # the same fp8 copies, so the same gradients, added up in the same order
        assert torch.equal(got[name], expected[name]), name


def test_reused_quantized_weights_refuse_a_weight_changed_inside_the_block():
    experts, module = small_trained_module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    (hidden, ids, weights), second = micro_batches(2, seed=2)
    with moe_gemm.reuse_quantized_weights():
        module(hidden, ids, weights).float().square().sum().backward()
        optimizer.step()
        with pytest.raises(RuntimeError, match="gate_up_proj changed inside moe_gemm.reuse_quantized_weights"):
            module(*second)
    # Outside the block the changed weights are quantized afresh, as without it.
    out = module(*second)
    assert torch.equal(out, experts_forward_fp8(*second, experts.gate_up_proj, None, experts.down_proj, None))


def test_the_forward_without_autograd_and_a_backward_after_the_block_reuse_too(monkeypatch):
    experts, module = small_trained_module()
    (hidden, ids, weights), second = micro_batches(2, seed=5)
    quantized = counted_quantizations(monkeypatch)
    with torch.no_grad():
        expected = module(hidden, ids, weights)
    quantized.clear()
    with torch.no_grad(), moe_gemm.reuse_quantized_weights():
        for _ in range(2):
            assert torch.equal(module(hidden, ids, weights), expected)
    assert len(quantized) == 2  # each weight once, as stored
    quantized.clear()
    with moe_gemm.reuse_quantized_weights():
        outs = [module(hidden, ids, weights), module(*second)]
    for out in outs:  # both backwards after the block: the second reuses the first's transposed copies
        out.float().square().sum().backward()
    assert len(quantized) == 4


def test_reused_quantized_weights_never_give_a_freed_weight_s_copy_to_a_new_one():
    # Masters cast to bf16 at each call: a freed cast and the next one of the same shape can share an address.
    generator = torch.Generator().manual_seed(6)
    masters = [[torch.randn(4, 256, 256, generator=generator), torch.randn(4, 256, 128, generator=generator)]
               for _ in range(3)]  # fmt: skip
    hidden, ids, weights = micro_batches(1, seed=7)[0]

    def layers() -> list:
        outs = []
        for gate_up, down in masters:
            outs.append(experts_forward_fp8(hidden, ids, weights, gate_up.to(torch.bfloat16), None,
                                            down.to(torch.bfloat16), None))  # fmt: skip
        return outs

    with torch.no_grad():
        expected = layers()
        with moe_gemm.reuse_quantized_weights():
            got = layers()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(expected[0], expected[1])


def test_the_trained_module_compiles_whole_without_reusing():
    experts, module = small_trained_module()
    hidden, ids, weights = micro_batches(1, seed=8)[0]
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with moe_gemm.reuse_quantized_weights():  # nothing to reuse under torch.compile: the same as without the block
        out = compiled(hidden, ids, weights)
    assert torch.equal(out, module(hidden, ids, weights))
    out.float().square().sum().backward()
    assert experts.gate_up_proj.grad is not None and experts.down_proj.grad is not None
