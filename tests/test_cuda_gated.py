"""The gated-epilogue CUDA kernel (grouped_mm_gated) against grouped_mm (or grouped_mm_gather) followed by the separate
activation kernel (_ops.gated_activation_kernel), bitwise: the epilogue rounds gate_up to 16 bits, then applies the
same float32 formula (csrc/moe_activation.h) and the same two roundings, so under the same plan the two paths must
agree in every bit, for the pre-activation and the activation alike. The gated configurations, silu / gelu /
gelu_tanh, both gate/up layouts, both weight layouts, bf16 and fp16, ragged and empty experts, rows past the last
expert, with and without the pre-activation output, gathering or not."""

import pytest
import torch
from helpers import make_problem, requires_cuda_op

from moe_gemm import _ops
from moe_gemm.testing import GATED_TILE_CONFIGS, PlanOverride, plan_override, resolved_gated_plan

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
ACTS = ["silu", "gelu", "gelu_tanh"]


def poison_allocator(shapes, dtype):
    """NaN-fill tensors of the op's output shapes and free them: the caching allocator hands the same blocks to the
    op's outputs (of the same sizes, from the same pool), so any element the kernel fails to write stays NaN."""
    poison = [torch.full(shape, float("nan"), device="cuda", dtype=dtype) for shape in shapes]
    del poison


def check(sizes, n, k, dtype, transposed, act, concatenated, write_pre, gather=False, num_rows=None):
    problem = make_problem(sizes, n, k, dtype, "cuda", transposed, num_rows=num_rows)
    num_rows = problem.x.shape[0]
    if gather:
        source = torch.randn(max(1, num_rows // 3), k, device="cuda").to(dtype)
        rows = (torch.arange(num_rows, dtype=torch.int64) * 7919 % source.shape[0]).cuda()
        x, gathered = source, source.index_select(0, rows)
    else:
        x, rows, gathered = problem.x, None, problem.x
    config, fused = resolved_gated_plan(num_rows, n, k, len(sizes), concatenated, gather)
    poison_allocator([(num_rows, n // 2), (num_rows, n)], dtype)
    activated, gate_up = torch.ops.moe_gemm.grouped_mm_gated(x, rows, problem.weight, problem.m_sizes, transposed,
                                                             act, concatenated, write_pre)
    with plan_override(tile_config=config, split_k=1):
        expected_gate_up = torch.ops.moe_gemm.grouped_mm(gathered, problem.weight, problem.m_sizes, transposed)
    expected = _ops.gated_activation_kernel(expected_gate_up, act, concatenated)
    torch.cuda.synchronize()
    assert activated.shape == (num_rows, n // 2) and activated.dtype == dtype
    assert torch.equal(activated, expected), (
        f"{(activated != expected).sum().item()} of {activated.numel()} activated elements differ "
        f"(config {config}, fused {fused})")
    if write_pre:
        assert torch.equal(gate_up, expected_gate_up)
    else:
        assert gate_up is None
    covered = sum(max(size, 0) for size in sizes)
    assert (activated[covered:] == 0).all()
    return fused


@pytest.fixture(params=GATED_TILE_CONFIGS)
def gated_config(request):
    with plan_override(PlanOverride(request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("write_pre", [True, False], ids=["with_pre", "no_pre"])
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
def test_fused_equals_gemm_then_activation_kernel(gated_config, dtype, transposed, concatenated, act, write_pre,
                                                  gather):
    # Ragged, empty experts, a tail of <= 64 rows (one warpgroup), rows past the last expert; I = 768 (a multiple of
    # 128: the concatenated halves fuse), K not a multiple of the k-block.
    fused = check([0, 5, 300, 0, 17, 130], 1536, 328, dtype, transposed, act, concatenated, write_pre, gather,
                  num_rows=480)
    assert fused


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("n", [1024, 640], ids=["I512", "I320"])
def test_i_not_a_multiple_of_the_tile(gated_config, concatenated, n):
    # Concatenated halves are loaded half a 256-column tile at a time: I = 512 (a multiple of 128) fuses, I = 320
    # falls back to GEMM + activation; interleaved columns fuse either way.
    fused = check([200, 0, 77], n, 256, torch.bfloat16, False, "silu", concatenated, True)
    assert fused == (not concatenated or (n // 2) % 128 == 0)


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize(
    "sizes, fused", [([1], False), ([2, 0, 1], False), ([64], False), ([65, 63], False), ([300, 0, 500], True)],
    ids=str,
)
def test_heuristic_plans(sizes, fused, concatenated):
    # The heuristic's own plan: decode sizes (swapped tiles) and up to 128 rows per expert (128x128) run unfused;
    # 266 rows per expert plan 128x256 in clusters, whose gated tile is 128x256. Equal to the two launches either way.
    assert check(sizes, 512, 256, torch.bfloat16, False, "gelu", concatenated, False) == fused


def test_nothing_to_multiply_gives_zeros():
    problem = make_problem([3, 4], 256, 0, torch.bfloat16, "cuda", False, num_rows=9)
    activated, gate_up = torch.ops.moe_gemm.grouped_mm_gated(problem.x, None, problem.weight, problem.m_sizes, False,
                                                             "silu", True, True)
    assert (activated == 0).all() and (gate_up == 0).all()
