"""The PyTorch path on a CUDA GPU, as a GPU that is not sm_90 takes it: on the test GPU with the capability query
patched to 8.0, ``grouped_forward``, its backward, ``grouped_weight_grad``, ``route``, ``experts_forward`` and the
``MoE`` layer must match the float64 reference (``torch._grouped_mm`` for bfloat16, the per-expert loop otherwise),
experts without rows, rows past the last expert and clamped sizes included, and warn once, naming the caller's
line."""

import warnings

import pytest
import torch
from helpers import assert_close_to_reference, make_problem, requires_cuda_op

import moe_gemm
from moe_gemm import _ops
from moe_gemm.reference import (
    clamped_row_ranges,
    experts_forward_reference,
    grouped_mm_wgrad_reference,
    route_reference,
)

pytestmark = [pytest.mark.gpu, requires_cuda_op]

# Expert 1 is empty and expert 3 has a negative size; in "ragged" expert 5 starts past M = 48, in "rows_past_the_end"
# rows 40.. belong to no expert.
SIZES = {
    "ragged": ([9, 0, 17, -4, 22, 6], 48),
    "rows_past_the_end": ([9, 0, 17, 3, 11], 48),
    "no_expert_owns_a_row": ([0, 0, 0, -1, 0], 16),
    "no_rows": ([0, 0, 0, 0], 0),
}


@pytest.fixture
def sm80(monkeypatch):
    """The test GPU, reported as compute capability 8.0."""
    monkeypatch.setattr(_ops, "_device_capability", lambda index: (8, 0))
    monkeypatch.setattr(_ops, "_DEVICE_PROBLEMS", {})
    monkeypatch.setattr(_ops, "_fallback_warned", False)
    assert not _ops.kernels_available("cuda")


def test_the_test_gpu_runs_the_kernels():
    assert moe_gemm.kernels_available() and _ops.kernels_unavailable_reason(torch.device("cuda")) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("sizes", SIZES)
def test_forward_and_backward_match_the_reference(sm80, sizes, transposed, dtype):
    sizes, num_rows = SIZES[sizes]
    problem = make_problem(sizes, n=64, k=128, dtype=dtype, device="cuda", transposed=transposed, num_rows=num_rows,
                           requires_grad=True)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="compute capability 8.0"):
        y = problem.run()
    assert_close_to_reference(y, problem.reference())
    assert not y[sum(max(s, 0) for s in sizes) :].any()
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expected_grad_w = grouped_mm_wgrad_reference(problem.x.detach(), grad_y, sizes, transposed)
    assert_close_to_reference(problem.weight.grad, expected_grad_w)
    # Experts that own no row (empty, negative, or starting at or past M) get exact zeros.
    for expert, (start, end) in enumerate(clamped_row_ranges(sizes, num_rows)):
        if start == end:
            assert not problem.weight.grad[expert].any(), f"expert {expert} owns no row"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_grouped_weight_grad_matches_the_reference(sm80, transposed, dtype):
    sizes, num_rows = SIZES["ragged"]
    x = torch.randn(num_rows, 128, device="cuda", dtype=dtype)
    grad_y = torch.randn(num_rows, 64, device="cuda", dtype=dtype)
    m_sizes = torch.tensor(sizes, device="cuda", dtype=torch.int32)
    expected = grouped_mm_wgrad_reference(x, grad_y, sizes, transposed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad_w = moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, weight_transposed=transposed)
        main_grad = torch.zeros(expected.shape, device="cuda")
        moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, weight_transposed=transposed, main_grad=main_grad)
    assert_close_to_reference(grad_w, expected)
    assert_close_to_reference(main_grad, expected, dtype=dtype)
    assert not grad_w[1].any() and not grad_w[3].any() and not grad_w[5].any()


def test_route_matches_the_reference(sm80):
    logits = torch.randn(64, 64, device="cuda")
    options = {"scoring": "sigmoid", "renormalize": True, "n_group": 8, "topk_group": 4}
    with pytest.warns(RuntimeWarning, match="compute capability 8.0"):
        weights, ids = moe_gemm.route(logits, 6, **options)
    ref_weights, ref_ids = route_reference(logits.cpu(), 6, **options)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)


def fallback_warnings(record) -> list[str]:
    """The files that the fallback warnings in ``record`` point at."""
    return [w.filename for w in record if "compute capability 8.0" in str(w.message)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return (torch.linalg.vector_norm(out.double().cpu() - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_experts_forward_matches_the_reference(sm80, dtype):
    tokens, experts, top_k, hidden, intermediate = 64, 16, 4, 256, 128
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    gate_up_proj = torch.randn(experts, 2 * intermediate, hidden, device="cuda", dtype=dtype) / hidden**0.5
    down_proj = torch.randn(experts, hidden, intermediate, device="cuda", dtype=dtype) / intermediate**0.5
    # Experts 0 and 15 own no token.
    weights, ids = route_reference(torch.randn(tokens, experts)[:, 1:15], top_k)
    weights, ids = weights.cuda(), (ids + 1).cuda()
    with pytest.warns(RuntimeWarning, match="compute capability 8.0") as record:
        out = moe_gemm.experts_forward(x, ids, weights, gate_up_proj, down_proj)
    assert fallback_warnings(record) == [__file__]
    expected = experts_forward_reference(x.cpu(), ids.cpu(), weights.cpu(), gate_up_proj.cpu(), down_proj.cpu())
    assert out.shape == (tokens, hidden) and out.dtype == dtype and out.is_cuda
    assert bool(torch.isfinite(out).all())
    assert relative_error(out, expected) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_moe_layer_matches_the_reference_and_trains(sm80):
    sizes = {"hidden_size": 256, "num_experts": 16, "intermediate_size": 128, "top_k": 4}
    layer = moe_gemm.MoE(**sizes, scoring="sigmoid", n_group=4, topk_group=2, renormalize=True, device="cuda",
                         dtype=torch.bfloat16)  # fmt: skip
    hidden = torch.randn(2, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="compute capability 8.0") as record:
        out = layer(hidden)
    assert fallback_warnings(record) == [__file__]
    tokens = hidden.detach().reshape(-1, 256)
    with torch.no_grad():
        # The ids as the layer chose them (test_route_matches_the_reference checks route itself).
        logits = torch.nn.functional.linear(tokens.float(), layer.router.weight.float())
        weights, ids = moe_gemm.route(logits, 4, scoring="sigmoid", n_group=4, topk_group=2, renormalize=True,
                                      e_score_correction_bias=layer.e_score_correction_bias)  # fmt: skip
    experts = layer.experts
    expected = experts_forward_reference(
        tokens.cpu(), ids.cpu(), weights.cpu(), experts.gate_up_proj.detach().cpu(), experts.down_proj.detach().cpu()
    )
    assert out.shape == hidden.shape and out.dtype == torch.bfloat16
    assert relative_error(out.reshape(-1, 256), expected) <= 1e-2
    out.float().square().sum().backward()
    for tensor in (hidden.grad, experts.gate_up_proj.grad, experts.down_proj.grad, layer.router.weight.grad):
        assert tensor is not None and bool(torch.isfinite(tensor).all())
