"""The gated backward's CUDA kernel (grouped_mm_gated_backward: the activation's backward in the epilogue of the
down-projection's input gradient) against grouped_mm (or grouped_mm_gather) followed by the separate
gated_activation_backward kernel. The epilogue rounds the GEMM's tile to 16 bits, then applies the same float32 formula
(csrc/moe_activation.h, gated_gradient) and the same roundings, so under the same plan grad_gate_up and
weighted_activated agree in every bit; each row's dot product (the routing weight's gradient) is summed in another
order, so it agrees to float32 rounding. silu / gelu / gelu_tanh, both gate/up layouts, both weight layouts, bf16 and
fp16, ragged and empty experts, tails of one warpgroup, rows past the last expert (zeros), gathering or not, I not a
multiple of the tile, and the op's unfused path (decode sizes, a forced narrower tile)."""

import pytest
import torch
from helpers import make_problem, requires_cuda_op

from moe_gemm import _ops
from moe_gemm.testing import GATED_TILE_CONFIGS, PlanOverride, plan_override

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
ACTS = ["silu", "gelu", "gelu_tanh"]


def poison_allocator(shapes):
    """NaN-fill blocks of the op's outputs' sizes and free them: the caching allocator hands them to the op's outputs,
    so any element the kernel fails to write stays NaN (float32 blocks: any 16-bit view of NaN words is NaN too)."""
    poison = [torch.full(shape, float("nan"), device="cuda") for shape in shapes]
    del poison


def check(sizes, n, k, dtype, transposed, act, concatenated, gather=False, num_rows=None, expected_config=None):
    """Runs the op and the two launches it replaces; returns the op's outputs. `n` is I, the down GEMM's N here."""
    problem = make_problem(sizes, n, k, dtype, "cuda", transposed, num_rows=num_rows)
    num_rows = problem.x.shape[0]
    covered = min(num_rows, sum(max(size, 0) for size in sizes))
    if gather:
        source = torch.randn(max(1, num_rows // 3), k, device="cuda").to(dtype)
        rows = (torch.arange(num_rows, dtype=torch.int64) * 7919 % source.shape[0]).cuda()
        grad_y, gathered = source, source.index_select(0, rows)
    else:
        grad_y, rows, gathered = problem.x, None, problem.x
    gate_up = torch.randn(num_rows, 2 * n, device="cuda").to(dtype)
    row_weights = torch.rand(num_rows, device="cuda")
    # As the layer saves them: rows past the last expert hold zeros and weigh 0.
    gate_up[covered:] = 0
    row_weights[covered:] = 0
    poison_allocator([(num_rows, n), (num_rows, 2 * n), (num_rows,), (max(1, n // 128), num_rows)])
    grad_gate_up, weighted, grad_row_weights = torch.ops.moe_gemm.grouped_mm_gated_backward(
        grad_y, rows, problem.weight, problem.m_sizes, transposed, gate_up, row_weights, act, concatenated)
    with plan_override(tile_config=expected_config or "auto", split_k=1):
        grad_activated = torch.ops.moe_gemm.grouped_mm(gathered, problem.weight, problem.m_sizes, transposed)
    expected = _ops.gated_activation_backward_kernel(grad_activated, gate_up, row_weights, act, concatenated)
    torch.cuda.synchronize()
    assert grad_gate_up.shape == (num_rows, 2 * n) and weighted.shape == (num_rows, n)
    assert grad_gate_up.dtype == weighted.dtype == dtype and grad_row_weights.dtype == torch.float32
    for name, got, want in (("grad_gate_up", grad_gate_up, expected[0]), ("weighted_activated", weighted, expected[1])):
        assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} {name} elements differ"
    assert not grad_row_weights.isnan().any()
    torch.testing.assert_close(grad_row_weights, expected[2], rtol=1e-5, atol=1e-5 * n**0.5)
    assert (grad_gate_up[covered:] == 0).all() and (weighted[covered:] == 0).all()
    assert (grad_row_weights[covered:] == 0).all()
    return grad_gate_up, weighted, grad_row_weights


@pytest.fixture(params=GATED_TILE_CONFIGS)
def gated_config(request):
    with plan_override(PlanOverride(request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
def test_fused_equals_gemm_then_backward_kernel(gated_config, dtype, transposed, concatenated, act, gather):
    # Ragged, empty experts, a tail of <= 64 rows (one warpgroup), rows past the last expert; I = 768 (three 256-column
    # n-blocks, so three partial dot products per row), K not a multiple of the k-block.
    check([0, 5, 300, 0, 17, 130], 768, 328, dtype, transposed, act, concatenated, gather, num_rows=480,
          expected_config=gated_config)


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("n", [320, 200, 8], ids=["I320", "I200", "I8"])
def test_i_not_a_multiple_of_the_tile(gated_config, concatenated, n):
    # The last n-block is partial (columns past I are neither read nor written); I = 8, one 16-byte row of gate.
    check([200, 0, 77], n, 256, torch.bfloat16, False, "silu", concatenated, expected_config=gated_config)


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("sizes", [[1], [2, 0, 1], [64], [65, 63], [300, 0, 500]], ids=str)
def test_heuristic_plans(sizes, concatenated):
    # The heuristic's own plan: decode sizes (swapped tiles) and up to 128 rows per expert (128x128) run the GEMM,
    # then the separate kernel, inside the op; 266 rows per expert fuse. The same outputs either way.
    check(sizes, 512, 256, torch.bfloat16, False, "gelu", concatenated)


def test_a_forced_narrower_tile_runs_unfused_with_the_same_outputs():
    # 128x128 has no gated kernel: the op runs the GEMM with it, then the separate kernel, and zeroes the tail rows.
    check([150, 0, 90], 384, 192, torch.bfloat16, True, "silu", True, num_rows=260, expected_config="128x128")
    with plan_override(PlanOverride("128x128")):
        check([150, 0, 90], 384, 192, torch.bfloat16, True, "silu", True, num_rows=260, expected_config="128x128")


def test_reruns_are_bitwise_equal(gated_config):
    problem = make_problem([400, 3, 0, 250], 512, 256, torch.bfloat16, "cuda")
    gate_up = torch.randn(653, 1024, device="cuda").bfloat16()
    row_weights = torch.rand(653, device="cuda")
    args = (problem.x, None, problem.weight, problem.m_sizes, False, gate_up, row_weights, "silu", True)
    first = torch.ops.moe_gemm.grouped_mm_gated_backward(*args)
    second = torch.ops.moe_gemm.grouped_mm_gated_backward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_reduction_and_no_experts():
    # K = 0: grad_activated is zero, but weight * activated is not (the op runs the separate kernel); no experts: every
    # row is past the last one.
    problem = make_problem([3, 4], 256, 0, torch.bfloat16, "cuda", num_rows=9)
    gate_up = torch.randn(9, 512, device="cuda").bfloat16()
    row_weights = torch.rand(9, device="cuda")
    grad_gate_up, weighted, dots = torch.ops.moe_gemm.grouped_mm_gated_backward(
        problem.x, None, problem.weight, problem.m_sizes, False, gate_up, row_weights, "silu", True)
    assert (grad_gate_up == 0).all() and (dots == 0).all()
    expected = _ops.gated_activation_backward_kernel(torch.zeros(9, 256, device="cuda").bfloat16(), gate_up,
                                                     row_weights, "silu", True)[1]
    assert torch.equal(weighted[:7], expected[:7]) and (weighted[7:] == 0).all() and (weighted[:7] != 0).any()
    empty = make_problem([], 256, 64, torch.bfloat16, "cuda", num_rows=5)
    outputs = torch.ops.moe_gemm.grouped_mm_gated_backward(
        empty.x, None, empty.weight, empty.m_sizes, False, gate_up[:5], row_weights[:5], "gelu", False)
    assert all((out == 0).all() for out in outputs)


def test_bad_inputs_are_refused():
    problem = make_problem([4, 4], 64, 32, torch.bfloat16, "cuda")
    gate_up = torch.randn(8, 128, device="cuda").bfloat16()
    weights = torch.rand(8, device="cuda")
    op = torch.ops.moe_gemm.grouped_mm_gated_backward
    with pytest.raises(RuntimeError, match="gate_up must be"):
        op(problem.x, None, problem.weight, problem.m_sizes, False, gate_up[:, :64], weights, "silu", True)
    with pytest.raises(RuntimeError, match="row_weights must be float32"):
        op(problem.x, None, problem.weight, problem.m_sizes, False, gate_up, weights.double(), "silu", True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(problem.x, None, problem.weight, problem.m_sizes, False, gate_up.t().contiguous().t(), weights, "silu",
           True)
    with pytest.raises(RuntimeError, match="act"):
        op(problem.x, None, problem.weight, problem.m_sizes, False, gate_up, weights, "relu", True)
