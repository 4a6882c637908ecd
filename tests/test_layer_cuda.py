"""``experts_forward`` through the CUDA grouped GEMM (and the fused routing kernel for ``MoE``) against the float32
reference: forward and gradients of the hidden states, routing weights, expert weights and biases, in bfloat16 and
float16, both layouts, with sentinel ids and experts without tokens."""

import pytest
import torch
from helpers import assert_close_to_reference, relative_error, requires_cuda_op
from test_layer import make_experts_problem

import moe_gemm
from moe_gemm import _ops, layer
from moe_gemm.reference import experts_forward_reference
from moe_gemm.testing import PlanOverride, plan_override, resolved_gated_plan

pytestmark = [pytest.mark.gpu, requires_cuda_op]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, hidden, intermediate",
    [(1, 8, 2, 256, 128), (77, 60, 4, 256, 176), (600, 128, 8, 512, 96)],
)
def test_experts_forward_and_gradients_match_float32_reference(
    num_tokens, num_experts, top_k, hidden, intermediate, transposed, bias, dtype
):
    tensors, _ = make_experts_problem(
        num_tokens, num_experts, top_k, hidden, intermediate, transposed=transposed, bias=bias, dtype=dtype,
        sentinels=0.1, device="cuda",
    )  # fmt: skip
    ids = tensors.pop("top_k_index")
    tensors["top_k_weights"] = tensors["top_k_weights"].float()
    leaves = {name: t.requires_grad_() for name, t in tensors.items()}
    out = moe_gemm.experts_forward(top_k_index=ids, **leaves, weight_transposed=transposed)
    assert out.dtype == dtype and out.is_cuda

    # The float32 reference: the same composition on float32 copies on the CPU (the CUDA kernel takes 16-bit types
    # only), through the PyTorch path of grouped_forward; its forward is checked against the per-token float64
    # reference below.
    ref_leaves = {name: t.detach().float().cpu().requires_grad_() for name, t in tensors.items()}
    ref = moe_gemm.experts_forward(top_k_index=ids.cpu(), **ref_leaves, weight_transposed=transposed)
    host = {name: t.detach() for name, t in ref_leaves.items()}
    per_token = experts_forward_reference(
        host["hidden"], ids.cpu(), host["top_k_weights"], host["gate_up_proj"], host["down_proj"],
        weight_transposed=transposed, gate_up_bias=host.get("gate_up_bias"), down_bias=host.get("down_bias"),
    )  # fmt: skip
    assert_close_to_reference(ref, per_token, dtype=torch.float32)
    assert_close_to_reference(out.float().cpu(), per_token, dtype=dtype)

    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device="cuda", dtype=dtype))
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), grad_out)
    for name, grad, ref_grad in zip(leaves, grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        error = relative_error(grad.float().cpu(), ref_grad)
        assert error <= 2e-2, f"gradient of {name}: relative error {error:.2e}"
    # Expert 1 has no tokens: exactly zero weight gradients.
    assert (grads[2][1] == 0).all() and (grads[3][1] == 0).all()


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_up_projection_reading_hidden_in_place_matches_float32_reference(transposed, bias, monkeypatch):
    # The suite's sizes are below the rule's threshold (_ops.gather_in_gemm): lowered, the up-projection reads
    # hidden[token_of_row] through grouped_mm_gather (37 rows per expert here, ragged, expert 1 empty).
    monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 1)
    names = []
    gemm_op = _ops.gemm_op
    monkeypatch.setattr(_ops, "gemm_op", lambda name, device: names.append(name) or gemm_op(name, device))
    test_experts_forward_and_gradients_match_float32_reference(600, 128, 8, 512, 96, transposed, bias, torch.bfloat16)
    assert "grouped_mm_gather" in names


def test_moe_layer_with_fused_routing_matches_float32():
    sizes = {"hidden_size": 256, "num_experts": 256, "intermediate_size": 128, "top_k": 8}
    routing = {"scoring": "sigmoid", "renormalize": True, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
    layer = moe_gemm.MoE(**sizes, **routing, device="cuda", dtype=torch.bfloat16)
    layer.e_score_correction_bias.normal_(0, 0.1)
    hidden = torch.randn(3, 50, 256, device="cuda", dtype=torch.bfloat16)
    out = layer(hidden)
    # The float32 twin runs on the CPU: the grouped GEMM's CUDA kernel takes 16-bit types only.
    layer_fp32 = moe_gemm.MoE(**sizes, **routing, dtype=torch.float32)
    layer_fp32.load_state_dict({name: t.float().cpu() for name, t in layer.state_dict().items()})
    ref = layer_fp32(hidden.float().cpu())
    assert_close_to_reference(out.float().cpu(), ref, dtype=torch.bfloat16)
    out.float().square().sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().max() > 0


@pytest.mark.parametrize("gather", [False, True], ids=["copied_rows", "gathered_rows"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_inference_runs_the_gated_epilogue_with_the_training_paths_bits(act, gather, monkeypatch):
    # Without a gradient the up-projection is grouped_mm_gated (the activation in the GEMM's epilogue); with one, the
    # GEMM and then the activation kernel. Both round alike, so the layer's outputs agree bit for bit.
    if gather:
        monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 1)
    num_tokens, num_experts, top_k, hidden, intermediate = 2048, 8, 2, 512, 512
    tensors, _ = make_experts_problem(
        num_tokens, num_experts, top_k, hidden, intermediate, dtype=torch.bfloat16, sentinels=0.05, device="cuda"
    )
    ids = tensors.pop("top_k_index")
    _, fused = resolved_gated_plan(num_tokens * top_k, 2 * intermediate, hidden, num_experts, True, gather)
    assert fused  # these sizes plan the gated 128x256 tile
    gathered = []
    gated_gemm = layer._expert_gemm_gated

    def recording_gated_gemm(*args, **kwargs):
        gathered.append(kwargs["gather_rows"] is not None)
        return gated_gemm(*args, **kwargs)

    monkeypatch.setattr(layer, "_expert_gemm_gated", recording_gated_gemm)
    # One tile configuration for both (the training path's GEMM would otherwise run 128x256 in clusters of two).
    with plan_override(PlanOverride("128x256")):
        with torch.no_grad():
            served = moe_gemm.experts_forward(top_k_index=ids, act=act, **tensors)
        assert gathered == [gather]
        trained = moe_gemm.experts_forward(
            top_k_index=ids, act=act, **{name: t.requires_grad_() for name, t in tensors.items()}
        )
    assert gathered == [gather]  # the training forward did not call it
    assert torch.equal(served, trained.detach())


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_backward_reading_rows_in_place_matches_float32_reference(transposed, bias, monkeypatch):
    # Thresholds lowered: the weight gradients read hidden[token_of_row] and grad_out[token_of_row] in place
    # (grouped_mm_wgrad_gather), the down-projection's input gradient too (grouped_mm_gather) unless a down bias
    # needs the copy; 37 rows per expert, ragged, expert 1 empty.
    monkeypatch.setattr(_ops, "GATHER_MIN_ROWS_PER_EXPERT", 1)
    monkeypatch.setattr(_ops, "WGRAD_GATHER_MIN_ROWS_PER_EXPERT", 1)
    names = []
    gemm_op = _ops.gemm_op
    monkeypatch.setattr(_ops, "gemm_op", lambda name, device: names.append(name) or gemm_op(name, device))
    test_experts_forward_and_gradients_match_float32_reference(600, 128, 8, 512, 96, transposed, bias, torch.bfloat16)
    # The float32 reference on the CPU takes the same paths (through the ops' PyTorch kernels): twice the counts.
    assert names.count("grouped_mm_wgrad_gather") == 2 * (1 if bias else 2), names
    assert names.count("grouped_mm_gather") == 2 * (1 if bias else 2), names
