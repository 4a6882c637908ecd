"""The gathering CUDA kernel (grouped_mm_gather) against grouped_mm of index_select, bitwise: the gather changes only
where the rows of A are loaded from, not the order of any sum, so under the same plan (configuration, split, schedule)
the two must agree in every bit. Every gathering configuration, both schedules, both layouts, bf16 and fp16, experts
without rows, tails of every kind, duplicated source rows, and the float64 reference besides."""

import pytest
import torch
from helpers import assert_close_to_reference, make_problem, requires_cuda_op

from moe_gemm.reference import grouped_mm_reference
from moe_gemm.testing import GATHER_TILE_CONFIGS, PlanOverride, plan_override, resolved_plan, tile_configs

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
LAYOUTS = [False, True]  # weight_transposed


def gather_rows_into(source_rows: int, num_rows: int) -> torch.Tensor:
    """``num_rows`` indices into ``source_rows`` rows that repeat and come in no order, as the MoE layer's
    token_of_row (each token top_k times, sorted by expert)."""
    return (torch.arange(num_rows, dtype=torch.int64) * 7919 % source_rows).cuda()


def run_both(source, gather_rows, problem):
    """``(grouped_mm_gather, grouped_mm of index_select)`` under one plan: the gathering call's (resolved under the
    override in effect), forced on the other call too. The gather's output is poisoned first."""
    weight, m_sizes, transposed = problem.weight, problem.m_sizes, problem.weight_transposed
    n = weight.shape[2] if transposed else weight.shape[1]
    k = source.shape[1]
    config, split_k, dynamic = resolved_plan(gather_rows.numel(), n, k, m_sizes.numel(), gather=True)
    poison = torch.full((1 << 24,), float("nan"), device="cuda", dtype=source.dtype)
    del poison  # the caching allocator hands the same, NaN-filled, block to the op's output
    gathered = torch.ops.moe_gemm.grouped_mm_gather(source, gather_rows, weight, m_sizes, transposed)
    if config == "auto":  # nothing to multiply
        expected = torch.ops.moe_gemm.grouped_mm(source.index_select(0, gather_rows), weight, m_sizes, transposed)
    else:
        with plan_override(tile_config=config, split_k=split_k, dynamic_schedule=dynamic):
            expected = torch.ops.moe_gemm.grouped_mm(source.index_select(0, gather_rows), weight, m_sizes, transposed)
    torch.cuda.synchronize()
    return gathered, expected


def check(sizes, n, k, source_rows, dtype=torch.bfloat16, transposed=False, num_rows=None, source=None):
    """Runs a gathering problem; asserts bitwise equality with grouped_mm of index_select, the float64 reference's
    tolerance and zeros past the last expert. Returns the output."""
    problem = make_problem(sizes, n, k, dtype, "cuda", transposed, num_rows=num_rows)
    num_rows = problem.x.shape[0]
    if source is None:
        source = torch.randn(source_rows, k, device="cuda").to(dtype)
    gather_rows = gather_rows_into(source.shape[0], num_rows)
    gathered, expected = run_both(source, gather_rows, problem)
    assert gathered.shape == (num_rows, n) and gathered.dtype == dtype
    assert torch.equal(gathered, expected), (
        f"{(gathered != expected).sum().item()} of {gathered.numel()} elements differ from grouped_mm of index_select")
    reference = grouped_mm_reference(source[gather_rows], problem.weight, problem.m_sizes, transposed)
    assert_close_to_reference(gathered, reference)
    covered = sum(max(size, 0) for size in sizes)
    assert (gathered[covered:] == 0).all()
    return gathered


@pytest.fixture(params=["auto", *GATHER_TILE_CONFIGS, *(f"{config}-dynamic" for config in GATHER_TILE_CONFIGS)])
def gather_config(request):
    """Every configuration with a gathering kernel under both tile schedules, forced through plan_override; "auto"
    leaves both to the heuristics."""
    config, _, schedule = request.param.partition("-")
    override = PlanOverride() if config == "auto" else PlanOverride(config, dynamic_schedule=schedule == "dynamic")
    with plan_override(override):
        if config != "auto":  # the override reaches the gathering call's plan
            assert resolved_plan(600, 512, 512, 8, gather=True)[::2] == (config, schedule == "dynamic")
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS)
@pytest.mark.parametrize(
    "sizes",
    [
        [0, 5, 300, 0, 17],          # ragged, empty experts, the last one ending mid-tile
        [0, 0, 0, 1000],             # all rows in the last expert (M not a multiple of 128)
        [128, 256, 129, 127, 1],     # at and around the 128-row tile
        [64, 65, 192, 193, 63],      # tails at and around 64 rows: one warpgroup multiplies, or both
        [7],                         # E = 1, one partial tile
        [0, 0, 0],                   # no rows routed at all
    ],
)
def test_ragged_and_empty_experts(sizes, transposed, dtype, gather_config):
    check(sizes, 264, 200, source_rows=97, dtype=dtype, transposed=transposed)


def test_rows_past_the_last_expert_are_zero(gather_config):
    # 160 routed rows of 300: the last expert ends mid-tile and rows 160.. (their indices valid) stay zero.
    check([10, 0, 150], 136, 64, source_rows=40, num_rows=300)


@pytest.mark.parametrize("source_rows", [1, 3, 250, 5000])
def test_duplicated_and_scattered_source_rows(source_rows, gather_config):
    # One source row for all, a few, about top_k = 8 per source row (2000 rows), and more source rows than rows.
    out = check([700, 0, 1300], 256, 576, source_rows=source_rows)
    if source_rows == 1:
        assert torch.equal(out[0], out[699]) and torch.equal(out[700], out[1999])


def test_several_tiles_per_cta(gather_config):
    # Hundreds of tiles over the SMs: every CTA runs several in a row under both schedules, through partial m- and
    # n-blocks and rows past the last expert; a tile's rows past its expert keep older tiles' rows in shared
    # memory, which must not reach the output.
    check([0, 5, 300, 0, 17, 1000, 0, 260], 2880, 576, source_rows=400, num_rows=1591)


def test_expert_tails_of_at_most_half_a_tile(gather_config):
    sizes = [1, 0, 129, 191, 64, 65, 300, 2, 511, 1000, 0, 193, 384, 63]
    check(sizes, 2880, 576, source_rows=777, num_rows=sum(sizes) + 20)


@pytest.mark.parametrize("n, k", [(8, 8), (8, 4096), (4104, 8), (24, 72), (264, 2504)])
def test_n_and_k_at_the_alignment_limit(n, k, gather_config):
    # K not a multiple of the 64-column k-block: the last one-row box is part out of bounds (zero-filled).
    check([3, 0, 130, 1], n, k, source_rows=50)


@pytest.mark.parametrize("split_k", [2, 7])
@pytest.mark.parametrize("transposed", LAYOUTS)
def test_split_k(split_k, transposed):
    with plan_override(tile_config="128x128", split_k=split_k):
        assert resolved_plan(443, 264, 2504, 4, gather=True)[:2] == ("128x128", split_k)
        check([300, 0, 129, 5], 264, 2504, source_rows=60, dtype=torch.float16, transposed=transposed,
              num_rows=443)


def test_a_source_with_a_row_stride():
    # x as a column slice of a wider buffer: row stride 2K, read in place by the one-row boxes.
    base = torch.randn(90, 2 * 128, device="cuda", dtype=torch.bfloat16)
    check([100, 0, 200], 64, 128, source_rows=90, source=base[:, :128])


def test_sizes_summing_past_m_are_clamped(gather_config):
    check([100, 200, 100], 64, 64, source_rows=30, num_rows=250)


def test_no_rows_to_gather():
    problem = make_problem([0, 0], 64, 64, torch.bfloat16, "cuda", num_rows=0)
    source = torch.randn(10, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.moe_gemm.grouped_mm_gather(source, torch.empty(0, dtype=torch.int64, device="cuda"),
                                               problem.weight, problem.m_sizes)
    assert out.shape == (0, 64)


def test_an_index_outside_the_source_reads_zeros_and_nothing_outside_it():
    # The caller's bug, documented: TMA's bounds check zero-fills the row (no fault, no read outside x).
    problem = make_problem([6], 64, 64, torch.bfloat16, "cuda")
    source = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    gather_rows = torch.tensor([0, 4, -1, 2**40, 3, 1 << 31], device="cuda")
    with plan_override(tile_config="128x128", split_k=1):
        out = torch.ops.moe_gemm.grouped_mm_gather(source, gather_rows, problem.weight, problem.m_sizes)
        expected = torch.ops.moe_gemm.grouped_mm(source[[0, 0, 0, 0, 3, 0]], problem.weight, problem.m_sizes)
    torch.cuda.synchronize()
    assert (out[[1, 2, 3, 5]] == 0).all()
    assert torch.equal(out[[0, 4]], expected[[0, 4]])


@pytest.mark.parametrize("config", [c for c in tile_configs() if c != "auto" and c not in GATHER_TILE_CONFIGS])
def test_a_configuration_without_a_gathering_kernel_is_refused(config):
    problem = make_problem([30, 0, 98], 128, 64, torch.bfloat16, "cuda")
    source = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    with plan_override(tile_config=config):
        with pytest.raises(RuntimeError, match="no kernel that gathers A's rows"):
            torch.ops.moe_gemm.grouped_mm_gather(source, gather_rows_into(16, 128), problem.weight, problem.m_sizes)


@pytest.mark.parametrize(
    "M, N, K, E",
    [(2, 4096, 14336, 8),        # decode: 16x128s for grouped_mm
     (640, 7168, 2048, 256),     # 20 rows per expert: 32x128s
     (16384, 4096, 7168, 32),    # 512 rows per expert: a cluster configuration (1x2)
     (65536, 5760, 2880, 128),   # 512 rows, 23 n-blocks: 2x1 clusters
     (32768, 14336, 4096, 8)],   # 4096 rows per expert: 128x256
)
def test_the_heuristics_pick_gathering_configurations(M, N, K, E):
    config, split_k, _ = resolved_plan(M, N, K, E, gather=True)
    assert config in GATHER_TILE_CONFIGS
    assert split_k == 1 or config == "128x128"


def test_x_without_rows_is_refused():
    problem = make_problem([3], 64, 64, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="source rows"):
        torch.ops.moe_gemm.grouped_mm_gather(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16),
                                             torch.zeros(3, dtype=torch.int64, device="cuda"), problem.weight,
                                             problem.m_sizes)


@pytest.mark.parametrize(
    "make_rows, message",
    [(lambda: torch.zeros(4, dtype=torch.int32, device="cuda"), "gather_rows must be int64"),
     (lambda: torch.zeros(4, 1, dtype=torch.int64, device="cuda"), "gather_rows must be 1-D"),
     (lambda: torch.zeros(8, dtype=torch.int64, device="cuda")[::2], "gather_rows must be contiguous"),
     (lambda: torch.zeros(4, dtype=torch.int64), "gather_rows must be on the device of x")],
    ids=["int32", "2-D", "strided", "on the CPU"],
)
def test_the_cuda_kernel_checks_the_indices_tensor(make_rows, message):
    problem = make_problem([4], 64, 64, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moe_gemm.grouped_mm_gather(problem.x, make_rows(), problem.weight, problem.m_sizes)


def test_cuda_graph_replay_with_changed_rows_and_sizes():
    problem = make_problem([40, 0, 200, 16], 128, 256, torch.bfloat16, "cuda")
    source = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    gather_rows = gather_rows_into(64, 256)

    def run():
        return torch.ops.moe_gemm.grouped_mm_gather(source, gather_rows, problem.weight, problem.m_sizes)

    run()  # warm-up outside the graph: loads the kernel, sets its shared-memory attribute
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for sizes in ([0, 0, 256, 0], [1, 2, 3, 250], [100, 100, 0, 56]):
        problem.m_sizes.copy_(torch.tensor(sizes))
        gather_rows.copy_(torch.randint(0, 64, (256,)))
        source.copy_(torch.randn_like(source))
        graph.replay()
        torch.cuda.synchronize()
        reference = grouped_mm_reference(source[gather_rows], problem.weight, problem.m_sizes)
        assert_close_to_reference(static_out, reference)


def test_torch_compile_fullgraph():
    problem = make_problem([30, 0, 98], 128, 64, torch.bfloat16, "cuda")
    source = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    gather_rows = gather_rows_into(40, 128)

    def gathered_up_projection(source, gather_rows, weight, m_sizes):
        return torch.ops.moe_gemm.grouped_mm_gather(source, gather_rows, weight, m_sizes)

    compiled = torch.compile(gathered_up_projection, fullgraph=True)
    out = compiled(source, gather_rows, problem.weight, problem.m_sizes)
    expected = torch.ops.moe_gemm.grouped_mm_gather(source, gather_rows, problem.weight, problem.m_sizes)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("transposed", LAYOUTS)
def test_opcheck(transposed):
    problem = make_problem([30, 0, 98], 128, 64, torch.bfloat16, "cuda", transposed)
    source = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_gather.default,
                          (source, gather_rows_into(40, 128), problem.weight, problem.m_sizes, transposed))
