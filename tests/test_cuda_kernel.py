"""The sm90 CUDA kernel against the float64 reference, on fresh random data for every case."""

import json
from importlib import resources

import pytest
import torch

import moe_gemm
from helpers import assert_close_to_reference, make_problem, requires_cuda_op
from moe_gemm.testing import PlanOverride, plan_override, resolved_plan, tile_configs

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
LAYOUTS = [False, True]  # weight_transposed


def run_poisoned(problem):
    """Runs the op after filling the allocator's free memory with NaN, so unwritten outputs show up."""
    poison = torch.full((1 << 24,), float("nan"), device="cuda", dtype=problem.x.dtype)
    del poison  # the caching allocator hands the same, NaN-filled, block to the op's output
    return problem.run()


def check(problem):
    out = run_poisoned(problem)
    torch.cuda.synchronize()
    assert out.dtype == problem.x.dtype and out.is_cuda
    assert_close_to_reference(out, problem.reference())
    return out


def suite_shapes(scale=8):
    """The models of shapes.json with hidden and intermediate sizes divided by `scale` (kept multiples of 8)."""
    suite = json.loads(resources.files("moe_gemm").joinpath("shapes.json").read_text())
    for name, model in suite["models"].items():
        hidden = max(8, model["hidden"] // scale // 8 * 8)
        inter = max(8, model["moe_intermediate"] // scale // 8 * 8)
        yield name, model["experts"], model["top_k"], hidden, inter


def routed_sizes(tokens, experts, top_k, generator=None):
    scores = torch.rand(tokens, experts, generator=generator)
    ids = scores.topk(min(top_k, experts), dim=-1).indices.flatten()
    return torch.bincount(ids, minlength=experts).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS)
@pytest.mark.parametrize("name, experts, top_k, hidden, inter", list(suite_shapes()))
@pytest.mark.parametrize("tokens", [1, 33, 600])
def test_suite_shapes_scaled_down(name, experts, top_k, hidden, inter, tokens, dtype, transposed):
    sizes = routed_sizes(tokens, experts, top_k)
    check(make_problem(sizes, 2 * inter, hidden, dtype, "cuda", transposed))  # up (gate and up fused)
    check(make_problem(sizes, hidden, inter, dtype, "cuda", transposed))      # down


CONFIGS = [config for config in tile_configs() if config != "auto"]


@pytest.fixture(params=["auto", *CONFIGS, *(f"{config}-dynamic" for config in CONFIGS)])
def tile_config(request):
    """Every tile configuration of the kernel's table under both tile schedules, forced through
    moe_gemm.testing.plan_override; "auto" leaves both to the heuristics."""
    config, _, schedule = request.param.partition("-")
    override = PlanOverride() if config == "auto" else PlanOverride(config, dynamic_schedule=schedule == "dynamic")
    with plan_override(override):
        if config != "auto":  # the override reaches the plan the kernel runs, not only the Python side
            assert resolved_plan(600, 512, 512, 8)[::2] == (config, schedule == "dynamic")
        yield request.param


@pytest.mark.parametrize("transposed", LAYOUTS)
@pytest.mark.parametrize(
    "sizes",
    [
        [0, 5, 300, 0, 17],          # ragged, not multiples of any tile, empty experts
        [0, 0, 0, 1000],             # all rows in the last expert
        [1000, 0, 0, 0],             # all rows in the first expert
        [128, 256, 129, 127, 1],     # at and around the 128-row tile
        [64, 65, 192, 193, 63],      # tails at and around 64 rows: one warpgroup multiplies, or both
        [7],                         # E = 1
        [0, 0, 0],                   # no rows routed at all
    ],
)
def test_ragged_and_empty_experts(sizes, transposed, tile_config):
    check(make_problem(sizes, 264, 200, torch.bfloat16, "cuda", transposed))


def test_several_tiles_per_cta(tile_config):
    # Hundreds of tiles over the 132 SMs: every CTA runs several in a row, under both schedules, through partial
    # m- and n-blocks and the rows past the last expert.
    check(make_problem([0, 5, 300, 0, 17, 1000, 0, 260], 2880, 576, torch.bfloat16, "cuda", num_rows=1591))


@pytest.mark.parametrize("k", [128, 576])
def test_stores_under_the_next_tiles_mmas(k, tile_config):
    # A 16-bit tile waits in registers and is stored under the next tile's MMAs when its K loop has at least a
    # k-block per store chunk (576 does for every tile, 128 for 128 columns only), else right away: both kinds in
    # one launch, several tiles per CTA.
    check(make_problem([0, 5, 300, 0, 17, 1000, 0, 260], 2880, k, torch.bfloat16, "cuda", num_rows=1591))


def test_expert_tails_of_at_most_half_a_tile(tile_config):
    # An expert's last m-block of <= 64 rows loads only the token rows it multiplies (its second warpgroup is
    # idle; a 2x1 cluster's CTA past the expert loads none). Tails of 1, 2, 63, 64 and 65 rows after 0 to 7 whole
    # m-blocks, several tiles per CTA (shared memory holds older tiles' rows, which must not leak into a tail).
    sizes = [1, 0, 129, 191, 64, 65, 300, 2, 511, 1000, 0, 193, 384, 63]
    check(make_problem(sizes, 2880, 576, torch.bfloat16, "cuda", num_rows=sum(sizes) + 20))


@pytest.mark.parametrize("n, k", [(8, 8), (8, 4096), (4104, 8), (24, 72)])
def test_n_and_k_at_the_alignment_limit(n, k, tile_config):
    check(make_problem([3, 0, 130, 1], n, k, torch.bfloat16, "cuda"))


def test_many_experts(tile_config):
    sizes = routed_sizes(64, 512, 8)
    check(make_problem(sizes, 256, 128, torch.bfloat16, "cuda"))


@pytest.mark.parametrize("sizes_dtype", [torch.int32, torch.int64])
def test_sizes_int32_and_int64(sizes_dtype):
    check(make_problem([17, 0, 200, 45], 128, 256, torch.float16, "cuda", sizes_dtype=sizes_dtype))


def test_rows_past_the_last_group_are_zero(tile_config):
    problem = make_problem([10, 0, 150], 136, 64, torch.bfloat16, "cuda", num_rows=300)
    out = check(problem)
    assert (out[160:] == 0).all()


def test_sizes_summing_past_m_are_clamped(tile_config):
    # 400 rows routed into a 250-row buffer: the kernel must stop at row 250 (no out-of-bounds access)
    # and match the reference's clamping.
    problem = make_problem([100, 200, 100], 64, 64, torch.bfloat16, "cuda", num_rows=250)
    check(problem)


def test_negative_sizes_count_as_zero():
    problem = make_problem([50, -20, 30], 64, 64, torch.bfloat16, "cuda", num_rows=80)
    check(problem)


def test_zero_rows():
    problem = make_problem([0, 0], 64, 64, torch.bfloat16, "cuda", num_rows=0)
    out = problem.run()
    assert out.shape == (0, 64)


def test_input_views_with_row_stride(tile_config):
    # x as a column slice of a wider buffer: row stride 2K, read in place by TMA.
    base = torch.randn(300, 2 * 128, device="cuda", dtype=torch.bfloat16)
    problem = make_problem([100, 0, 200], 64, 128, torch.bfloat16, "cuda")
    problem.x = base[:, :128]
    check(problem)


def test_cuda_graph_replay_with_changed_sizes(tile_config):
    problem = make_problem([40, 0, 200, 16], 128, 256, torch.bfloat16, "cuda")
    static_sizes = problem.m_sizes
    problem.run()  # warm-up outside the graph: loads the kernel, sets its shared-memory attribute
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = problem.run()
    for sizes in ([0, 0, 256, 0], [1, 2, 3, 250], [100, 100, 0, 56]):
        static_sizes.copy_(torch.tensor(sizes))
        problem.x.copy_(torch.randn_like(problem.x))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(static_out, problem.reference())


def test_torch_compile_fullgraph():
    problem = make_problem([30, 0, 98], 128, 64, torch.bfloat16, "cuda")
    compiled = torch.compile(moe_gemm.grouped_forward, fullgraph=True)
    out = compiled(problem.x, problem.weight, problem.m_sizes)
    assert_close_to_reference(out, problem.reference())


@pytest.mark.parametrize("transposed", LAYOUTS)
def test_opcheck(transposed):
    problem = make_problem([30, 0, 98], 128, 64, torch.bfloat16, "cuda", transposed)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm.default,
                          (problem.x, problem.weight, problem.m_sizes, transposed))


@pytest.mark.parametrize("transposed", LAYOUTS)
def test_gradients_against_reference(transposed):
    problem = make_problem([30, 0, 98, 5], 128, 64, torch.bfloat16, "cuda", transposed, requires_grad=True)
    out = problem.run()
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x64 = problem.x.detach().double().requires_grad_()
    w64 = problem.weight.detach().double().requires_grad_()
    from moe_gemm.reference import grouped_mm_reference
    ref = grouped_mm_reference(x64, w64, problem.m_sizes, transposed, dtype=torch.float64)
    ref.backward(grad_out.double())
    assert_close_to_reference(problem.x.grad, x64.grad, torch.bfloat16)
    assert_close_to_reference(problem.weight.grad, w64.grad, torch.bfloat16)
    assert (problem.weight.grad[1] == 0).all()  # the empty expert


def test_beyond_2_pow_31_elements():
    # x has 2^31 + 2^20 elements: offsets into it overflow 32-bit arithmetic.
    k, n = 2048, 64
    rows = (1 << 31) // k + 512
    sizes = [rows - 1000, 1000]
    x = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16).normal_()
    weight = torch.randn(2, n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    out = moe_gemm.grouped_forward(x, weight, torch.tensor(sizes, device="cuda"))
    tail = slice(rows - 1000, rows)  # the second expert, past 2^31 elements of x
    ref = x[tail].float() @ weight[1].float().t()
    assert_close_to_reference(out[tail], ref, torch.bfloat16)
    head = slice(0, 300)
    assert_close_to_reference(out[head], x[head].float() @ weight[0].float().t(), torch.bfloat16)
