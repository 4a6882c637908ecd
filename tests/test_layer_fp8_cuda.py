"""The FP8 experts layer on the GPU (``experts_forward_fp8`` through the FP8 kernels): forward and the gradients of
``hidden`` and ``top_k_weights`` against the float64 pipeline of tests/test_layer_fp8.py that quantizes at the same
points, block and per-channel scales, both weight layouts; and weights given to train, with their gradients (the
weight-gradient kernels on the unquantized rows)."""

import pytest
import torch
from helpers import relative_error, requires_cuda_op
from test_layer_fp8 import (
    backward_pipeline_reference,
    fp8_gradients,
    make_fp8_problem,
    pipeline_reference,
    quantize_blocks,
    quantize_channels,
)

from test_layer_fp8_training import quantized_as_the_layer_does, trained_gradients

from moe_gemm import _ops

pytestmark = [pytest.mark.gpu, requires_cuda_op,
              pytest.mark.skipif(not _ops.FP8_KERNEL_BUILT, reason="the FP8 kernel is not built")]  # fmt: skip


def on(device, tensors: dict) -> dict:
    return {name: value.to(device) for name, value in tensors.items()}


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, hidden, intermediate", [(40, 6, 3, 200, 72), (300, 8, 4, 512, 256)]
)
def test_forward_and_gradients_match_the_float64_pipeline(num_tokens, num_experts, top_k, hidden, intermediate):
    inputs, fp8 = make_fp8_problem(num_tokens, num_experts, top_k, hidden, intermediate)
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = fp8_gradients(on("cuda", inputs), on("cuda", fp8), grad_out.cuda())
    assert all(value.is_cuda for value in got.values())
    expected = backward_pipeline_reference(inputs, fp8, grad_out)
    expected["out"] = pipeline_reference(inputs, fp8)
    # Other sums, and now and then an fp8 rounding flipped by them: 5.3e-3 and 1.4e-3 seen for the two gradients
    # (1.7e-3 and 6e-5 on the CPU's float32 path), 4-7% for the unquantized layer.
    for name, tolerance in (("out", 5e-3), ("hidden", 1e-2), ("top_k_weights", 5e-3)):
        assert relative_error(got[name].cpu().double(), expected[name]) < tolerance, name


@pytest.mark.parametrize("granularity", ["blocks", "channels"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_gradients_of_both_scalings_and_layouts_match_the_float64_pipeline(granularity, transposed):
    inputs, _ = make_fp8_problem(num_tokens=200, num_experts=8, top_k=4, hidden=384, intermediate=128)
    quantize = quantize_blocks if granularity == "blocks" else quantize_channels
    logical, layer = {}, {}  # the [E, N, K] weights of the reference; the layer's, in the layout under test
    for name in ("gate_up_proj", "down_proj"):
        values, scale = quantize(inputs[name])
        logical |= {name: values, f"{name}_scale": scale}
        if transposed:
            values = values.transpose(1, 2).contiguous()
            scale = scale.transpose(1, 2).contiguous() if scale.dim() == 3 else scale
        layer |= {name: values, f"{name}_scale": scale}
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = fp8_gradients(on("cuda", inputs), on("cuda", layer), grad_out.cuda(), weight_transposed=transposed)
    expected = backward_pipeline_reference(inputs, logical, grad_out)
    for name, tolerance in (("hidden", 1e-2), ("top_k_weights", 5e-3)):  # as above
        assert relative_error(got[name].cpu().double(), expected[name]) < tolerance, name


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, hidden, intermediate", [(40, 6, 3, 200, 72), (300, 8, 4, 512, 256)]
)
def test_trained_weights_and_their_gradients_match_the_float64_pipeline(num_tokens, num_experts, top_k, hidden,
                                                                         intermediate):  # fmt: skip
    inputs, _ = make_fp8_problem(num_tokens, num_experts, top_k, hidden, intermediate)
    grad_out = torch.randn(inputs["hidden"].shape).to(torch.bfloat16)
    got = trained_gradients(on("cuda", inputs), grad_out.cuda())
    fp8 = quantized_as_the_layer_does(inputs)
    expected = backward_pipeline_reference(inputs, fp8, grad_out)
    expected["out"] = pipeline_reference(inputs, fp8)
    # As for frozen weights above; the weight gradients are float32 sums in the kernels' order, rounded to bfloat16
    # (1.7e-3 from the float64 sums on the CPU).
    tolerances = {"out": 5e-3, "hidden": 1e-2, "top_k_weights": 5e-3, "gate_up_proj": 1e-2, "down_proj": 1e-2}
    for name, tolerance in tolerances.items():
        assert got[name].is_cuda and relative_error(got[name].cpu().double(), expected[name]) < tolerance, name
    for name in ("gate_up_proj", "down_proj"):  # expert 1 gets no rows
        assert torch.equal(got[name][1], torch.zeros_like(got[name][1])), name
