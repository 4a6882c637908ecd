"""The weight-gradient kernels that gather one operand's rows (grouped_mm_wgrad_gather) against grouped_mm_wgrad of
index_select, bitwise: the gather changes only where the rows are loaded from, not the tiles, the k-blocks or the order
of any sum, so the two must agree in every bit. Both operands (x, grad_y) in both layouts, which covers both gathering
kernels (L: 128 columns, R: 256) twice; bf16 and fp16; experts without rows, experts ending mid-k-block, duplicated
source rows, NaN source rows that only indices past the last expert point at, Inf rows that stale shared memory would
spread; and the float64 reference besides."""

import pytest
import torch
from helpers import assert_close_to_reference, requires_cuda_op

from moe_gemm.reference import grouped_mm_wgrad_reference

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
LAYOUTS = [False, True]  # weight_transposed
GATHERED = ["x", "grad_y"]  # the operand read through row indices


def rows_into(source_rows: int, num_rows: int) -> torch.Tensor:
    """``num_rows`` indices into ``source_rows`` rows that repeat and come in no order, as the MoE layer's
    token_of_row (each token top_k times, sorted by expert)."""
    return (torch.arange(num_rows, dtype=torch.int64) * 7919 % source_rows).cuda()


def make_case(gathered, sizes, n, k, dtype, source_rows, num_rows=None):
    """``(x, grad_y, rows, m_sizes)``: the gathered operand is a source of ``source_rows`` rows and ``rows`` its
    indices; the other operand has M = ``num_rows`` (default sum of the sizes) rows."""
    num_rows = sum(max(size, 0) for size in sizes) if num_rows is None else num_rows
    x = torch.randn(source_rows if gathered == "x" else num_rows, k).to("cuda", dtype)
    grad_y = torch.randn(source_rows if gathered == "grad_y" else num_rows, n).to("cuda", dtype)
    return x, grad_y, rows_into(source_rows, num_rows), torch.tensor(sizes, device="cuda")


def run_both(gathered, x, grad_y, rows, m_sizes, transposed):
    """``(grouped_mm_wgrad_gather, grouped_mm_wgrad of index_select)``; the gather's output is poisoned first."""
    row_args = (rows, None) if gathered == "x" else (None, rows)
    poison = torch.full((1 << 26,), float("nan"), device="cuda", dtype=x.dtype)
    del poison  # the caching allocator hands the same, NaN-filled, block to the op's output
    out = torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, m_sizes, transposed, *row_args)
    if gathered == "x":
        expected = torch.ops.moe_gemm.grouped_mm_wgrad(x.index_select(0, rows), grad_y, m_sizes, transposed)
    else:
        expected = torch.ops.moe_gemm.grouped_mm_wgrad(x, grad_y.index_select(0, rows), m_sizes, transposed)
    torch.cuda.synchronize()
    return out, expected


def check(gathered, sizes, n, k, dtype=torch.bfloat16, transposed=False, source_rows=97, num_rows=None, case=None):
    """Asserts bitwise equality with grouped_mm_wgrad of index_select, the float64 reference's tolerance and exact
    zeros for the experts without rows. Returns the output."""
    x, grad_y, rows, m_sizes = case or make_case(gathered, sizes, n, k, dtype, source_rows, num_rows)
    out, expected = run_both(gathered, x, grad_y, rows, m_sizes, transposed)
    assert out.dtype == x.dtype and out.shape == expected.shape
    assert torch.equal(out, expected), (
        f"{(out != expected).sum().item()} of {out.numel()} elements differ from grouped_mm_wgrad of index_select")
    covered = sum(max(size, 0) for size in sizes)
    x_used = x.index_select(0, rows) if gathered == "x" else x
    grad_y_used = grad_y.index_select(0, rows) if gathered == "grad_y" else grad_y
    reference = grouped_mm_wgrad_reference(x_used[:covered], grad_y_used[:covered], sizes, transposed)
    assert_close_to_reference(out, reference)
    for expert, size in enumerate(sizes):
        if size <= 0:
            assert torch.equal(out[expert], torch.zeros_like(out[expert])), f"expert {expert} must be exactly zero"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
@pytest.mark.parametrize(
    "sizes",
    [
        [0, 5, 300, 0, 17],        # ragged, ending mid-k-block, empty experts
        [0, 0, 0, 1000],           # all rows in the last expert
        [1000, 0, 0, 0],           # all rows in the first expert
        [64, 128, 65, 63, 1],      # at and around the 64-row k-block
        [7],                       # E = 1, one partial k-block
        [0, 0, 0],                 # no rows routed at all
    ],
)
def test_ragged_and_empty_experts(sizes, gathered, transposed, dtype):
    check(gathered, sizes, n=256, k=384, dtype=dtype, transposed=transposed)


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
@pytest.mark.parametrize(("n", "k"), [(8, 8), (136, 72), (264, 520)])
def test_n_and_k_off_the_tile(n, k, gathered, transposed):
    # Columns past N or K in a gathered one-row box: the box is part out of bounds (zero-filled), stores clip.
    check(gathered, [3, 70, 0, 129], n, k, transposed=transposed)


@pytest.mark.parametrize("gathered", GATHERED)
@pytest.mark.parametrize("source_rows", [1, 3, 250, 5000])
def test_duplicated_and_scattered_source_rows(source_rows, gathered):
    # One source row for all, a few, about top_k = 8 per source row (2000 rows), and more source rows than rows.
    check(gathered, [700, 0, 1300], 256, 576, source_rows=source_rows)


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_source_rows_past_the_last_expert_never_reach_the_sums(gathered, transposed):
    # M = 300 rows of which 160 are routed; the indices of rows 160.. point at the source's NaN rows 40.., as do the
    # other operand's own rows 160... The last expert ends mid-k-block.
    sizes, num_rows = [10, 0, 150], 300
    x, grad_y, _, m_sizes = make_case(gathered, sizes, 136, 200, torch.bfloat16, source_rows=60, num_rows=num_rows)
    rows = torch.cat([rows_into(40, 160), 40 + rows_into(20, num_rows - 160)])
    source, other = (x, grad_y) if gathered == "x" else (grad_y, x)
    source[40:] = float("nan")
    other[160:] = float("nan")
    out = check(gathered, sizes, 136, 200, transposed=transposed, case=(x, grad_y, rows, m_sizes))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_rows_past_an_experts_end_are_zeros_not_what_a_stage_held_before(gathered, transposed):
    # Source row 0 is Inf; every third expert takes only that row, so its gradient is Inf or NaN and its stages hold
    # Inf rows. Every expert ends mid-k-block: a gathered row past the end that kept an older stage's Inf instead of
    # being written as zeros would make some other expert's gradient NaN. Hundreds of tiles, so every CTA runs
    # several and the stage ring wraps many times.
    generator = torch.Generator().manual_seed(5)
    sizes = [int(s) * 64 + 1 + int(s) % 63 for s in torch.randint(0, 5, (96,), generator=generator)]
    x, grad_y, rows, m_sizes = make_case(gathered, sizes, 384, 512, torch.bfloat16, source_rows=300)
    rows = 1 + rows % 299
    starts = [sum(sizes[:e]) for e in range(len(sizes))]
    for expert in range(0, len(sizes), 3):
        rows[starts[expert] : starts[expert] + sizes[expert]] = 0
    (x if gathered == "x" else grad_y)[0] = float("inf")
    out, expected = run_both(gathered, x, grad_y, rows, m_sizes, transposed)
    poisoned = torch.zeros(len(sizes), dtype=torch.bool)
    poisoned[::3] = True
    assert torch.isfinite(out[~poisoned]).all(), "a stale Inf row reached an expert that never reads source row 0"
    assert torch.equal(out[~poisoned], expected[~poisoned])
    assert torch.equal(out[poisoned].isnan(), expected[poisoned].isnan())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_long_and_short_reductions_in_turn(gathered, transposed, dtype):
    # Long reductions (a 16-bit tile stored under the next tile's MMAs) and short ones, empty experts between; the
    # MoE layer's shapes in miniature (gate/up: N = 2 x 512, K = 2048).
    sizes = [700, 3, 0, 256, 255, 64, 1000, 0, 190, 513]
    check(gathered, sizes, 1024, 2048, dtype=dtype, transposed=transposed, source_rows=400)


def test_sizes_summing_past_m_are_clamped():
    # Expert 1 is cut at row 40, expert 2 starts past M and gets zero; a negative size counts as zero.
    check("x", [30, 25, 10, -4], 128, 128, source_rows=30, num_rows=40)


def test_a_source_with_a_row_stride():
    # x as a column slice of a wider buffer: row stride 2K, read in place by the one-row boxes.
    base = torch.randn(90, 2 * 128, device="cuda", dtype=torch.bfloat16)
    sizes = [100, 0, 200]
    grad_y = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    case = (base[:, :128], grad_y, rows_into(90, 300), torch.tensor(sizes, device="cuda"))
    check("x", sizes, 64, 128, case=case)


def test_an_index_outside_the_source_reads_zeros_and_nothing_outside_it():
    # The caller's bug, documented: TMA's bounds check zero-fills the row (no fault, no read outside x).
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    grad_y = torch.randn(6, 128, device="cuda", dtype=torch.bfloat16)
    rows = torch.tensor([0, 4, -1, 2**40, 3, 1 << 31], device="cuda")
    out = torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, torch.tensor([6], device="cuda"), x_rows=rows)
    zero_rows = torch.tensor([False, True, True, True, False, True], device="cuda")
    expected = torch.ops.moe_gemm.grouped_mm_wgrad(x[rows.clamp(0, 3)].masked_fill(zero_rows[:, None], 0), grad_y,
                                                   torch.tensor([6], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_both_operands_gathered_is_refused():
    x, grad_y, rows, m_sizes = make_case("x", [10], 64, 64, torch.bfloat16, source_rows=5)
    with pytest.raises(RuntimeError, match="gathers one of x and grad_y per call"):
        torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, x.new_zeros(5, 64), m_sizes, False, rows, rows)


@pytest.mark.parametrize(
    "make_rows, message",
    [(lambda: torch.zeros(4, dtype=torch.int32, device="cuda"), "x_rows must be int64"),
     (lambda: torch.zeros(4, 1, dtype=torch.int64, device="cuda"), "x_rows must be 1-D"),
     (lambda: torch.zeros(8, dtype=torch.int64, device="cuda")[::2], "x_rows must be contiguous"),
     (lambda: torch.zeros(4, dtype=torch.int64), "x_rows must be on the device of its operand"),
     (lambda: torch.zeros(5, dtype=torch.int64, device="cuda"), "must have the same rows")],
    ids=["int32", "2-D", "strided", "on the CPU", "more rows than grad_y"],
)
def test_the_cuda_kernel_checks_the_indices_tensor(make_rows, message):
    x, grad_y, _, m_sizes = make_case("x", [4], 64, 64, torch.bfloat16, source_rows=5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, m_sizes, x_rows=make_rows())


def test_a_source_without_rows_is_refused():
    grad_y = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="source rows"):
        torch.ops.moe_gemm.grouped_mm_wgrad_gather(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16), grad_y,
                                                   torch.tensor([3], device="cuda"),
                                                   x_rows=torch.zeros(3, dtype=torch.int64, device="cuda"))


def test_cuda_graph_replay_with_changed_rows_and_sizes():
    x, grad_y, rows, m_sizes = make_case("grad_y", [40, 0, 200, 16], 128, 256, torch.bfloat16, source_rows=64)

    def run():
        return torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, m_sizes, grad_y_rows=rows)

    run()  # warm-up outside the graph: loads the kernel, sets its shared-memory attribute
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for sizes in ([0, 0, 256, 0], [1, 2, 3, 250], [100, 100, 0, 56]):
        m_sizes.copy_(torch.tensor(sizes))
        rows.copy_(torch.randint(0, 64, (256,)))
        grad_y.copy_(torch.randn_like(grad_y))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(static_out, grouped_mm_wgrad_reference(x, grad_y[rows], sizes))


def test_torch_compile_fullgraph():
    x, grad_y, rows, m_sizes = make_case("x", [30, 0, 98], 128, 64, torch.bfloat16, source_rows=40)

    def gate_up_weight_grad(x, grad_y, m_sizes, rows):
        return torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, m_sizes, x_rows=rows)

    compiled = torch.compile(gate_up_weight_grad, fullgraph=True)
    assert torch.equal(compiled(x, grad_y, m_sizes, rows), gate_up_weight_grad(x, grad_y, m_sizes, rows))


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_opcheck(gathered, transposed):
    x, grad_y, rows, m_sizes = make_case(gathered, [30, 0, 98], 128, 64, torch.bfloat16, source_rows=40)
    row_args = (rows, None) if gathered == "x" else (None, rows)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_wgrad_gather.default,
                          (x, grad_y, m_sizes, transposed, *row_args))
