"""Values: the reference against an independent formulation, and grouped_forward (the CPU path) against the
reference, over dtypes, layouts, ragged and edge-case sizes, and the clamping rule for bad sizes."""

import pytest
import torch
from helpers import assert_close_to_reference, make_problem

import moe_gemm
from moe_gemm._validation import normalize_weight_layout
from moe_gemm.reference import (
    clamped_group_ends,
    clamped_row_ranges,
    grouped_mm_reference,
    grouped_mm_wgrad_reference,
)

SIZES = {
    "ragged": [5, 0, 17, 3, 9],
    "empty_experts": [0, 12, 0, 0, 7, 0],
    "one_expert": [24],
    "all_rows_in_one_expert": [0, 0, 30, 0],
    "no_rows": [0, 0, 0],
}
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def expert_of_each_row(sizes: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


@pytest.mark.parametrize("transposed", [False, True])
def test_reference_matches_dense_gather(transposed):
    # Each row multiplied by its own expert's weight, gathered row by row: no grouping logic involved.
    sizes = [4, 0, 7, 1, 5]
    problem = make_problem(sizes, n=6, k=10, dtype=torch.float64, transposed=transposed)
    weight_per_row = problem.weight[expert_of_each_row(sizes)]
    equation = "mk,mkn->mn" if transposed else "mk,mnk->mn"
    expected = torch.einsum(equation, problem.x, weight_per_row)
    torch.testing.assert_close(problem.reference(), expected)


@pytest.mark.parametrize("transposed", [False, True])
def test_wgrad_reference_matches_sum_of_outer_products(transposed):
    sizes = [3, 0, 6, 2]
    x, grad_y = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, 7, dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(expert_of_each_row(sizes), len(sizes)).double()
    equation = "me,mk,mn->ekn" if transposed else "me,mk,mn->enk"
    expected = torch.einsum(equation, one_hot, x, grad_y)
    torch.testing.assert_close(grouped_mm_wgrad_reference(x, grad_y, sizes, transposed), expected)


@pytest.mark.parametrize(
    ("sizes", "num_rows", "expected"),
    [
        ([3, 4, 5], 12, [(0, 3), (3, 7), (7, 12)]),
        ([3, 4, 5], 6, [(0, 3), (3, 6), (6, 6)]),  # sum > M: expert 1 cut short, expert 2 dropped
        ([2, -3, 4], 6, [(0, 2), (2, 2), (2, 6)]),  # negative counts as 0
        ([2, 3], 9, [(0, 2), (2, 5)]),  # rows 5..8 belong to no expert
        ([0, 0], 0, [(0, 0), (0, 0)]),
    ],
)
def test_clamped_row_ranges(sizes, num_rows, expected):
    assert clamped_row_ranges(sizes, num_rows) == expected
    ends = [end for _, end in expected]
    for sizes_dtype in (torch.int32, torch.int64):
        assert clamped_group_ends(torch.tensor(sizes, dtype=sizes_dtype), num_rows).tolist() == ends


def test_clamped_group_ends_does_not_wrap_int32():
    sizes = torch.tensor([2**31 - 1, 2**31 - 1, 5], dtype=torch.int32)
    assert clamped_group_ends(sizes, 10).tolist() == [10, 10, 10]


@pytest.mark.parametrize("case", SIZES)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_forward_matches_reference(case, transposed, dtype):
    problem = make_problem(SIZES[case], n=24, k=40, dtype=dtype, transposed=transposed)
    out = problem.run()
    assert out.dtype == dtype
    assert_close_to_reference(out, problem.reference())


@pytest.mark.parametrize("transposed", [False, True])
def test_rows_past_last_group_are_zero(transposed):
    problem = make_problem([4, 0, 6], n=16, k=8, dtype=torch.float32, transposed=transposed, num_rows=16)
    out = problem.run()
    assert torch.equal(out[10:], torch.zeros(6, 16))
    assert_close_to_reference(out, problem.reference())


def test_int32_and_int64_sizes_agree():
    problem = make_problem([7, 0, 3, 5], n=16, k=24, dtype=torch.bfloat16)
    out_int64 = problem.run()
    out_int32 = moe_gemm.grouped_forward(problem.x, problem.weight, problem.m_sizes.to(torch.int32))
    assert torch.equal(out_int32, out_int64)


def test_odd_shapes_run_on_the_cpu_path():
    # The alignment rules bind the CUDA kernel only.
    problem = make_problem([2, 3], n=5, k=3, dtype=torch.float32)
    assert_close_to_reference(problem.run(), problem.reference())


@pytest.mark.parametrize("transposed", [False, True])
def test_weight_in_the_other_layout_is_read_through_a_view(transposed):
    problem = make_problem([3, 5, 0, 4], n=16, k=24, dtype=torch.float32, transposed=transposed)
    # Same matrices, memory in the other layout: the transposed view of a contiguous tensor of the other shape.
    other_layout = problem.weight.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert other_layout.stride(-2) == 1
    out = moe_gemm.grouped_forward(problem.x, other_layout, problem.m_sizes, weight_transposed=transposed)
    assert_close_to_reference(out, problem.reference())

    normalized, flag = normalize_weight_layout(other_layout, transposed)
    assert flag is not transposed
    assert normalized.stride(-1) == 1
    assert normalized.data_ptr() == other_layout.data_ptr()  # a view, not a copy


def test_normalize_weight_layout_keeps_row_major_weight():
    weight = torch.randn(2, 8, 16)
    normalized, flag = normalize_weight_layout(weight, False)
    assert normalized is weight and flag is False


@pytest.mark.parametrize(
    ("sizes", "num_rows", "ranges"),
    [
        ([3, 4, 5], 6, [(0, 0, 3), (1, 3, 6)]),  # sum(m_sizes) > M
        ([2, -3, 4], 6, [(0, 0, 2), (2, 2, 6)]),  # a negative size
    ],
)
def test_bad_sizes_are_clamped(sizes, num_rows, ranges):
    problem = make_problem(sizes, n=8, k=16, dtype=torch.float64, num_rows=num_rows)
    expected = torch.zeros(num_rows, 8, dtype=torch.float64)
    for expert, start, end in ranges:
        expected[start:end] = problem.x[start:end] @ problem.weight[expert].t()
    torch.testing.assert_close(problem.run(), expected)
    torch.testing.assert_close(problem.reference(), expected)


@pytest.mark.parametrize(
    ("sizes", "num_rows", "message"),
    [([3, -1, 2], 6, "negative sizes for experts \\[1\\]"), ([3, 4, 5], 6, "sum\\(m_sizes\\) <= M = 6")],
)
def test_moe_gemm_check_rejects_bad_sizes(monkeypatch, sizes, num_rows, message):
    problem = make_problem(sizes, n=8, k=16, dtype=torch.float32, num_rows=num_rows)
    monkeypatch.setenv("MOE_GEMM_CHECK", "1")
    with pytest.raises(ValueError, match=f"^m_sizes: .*{message}"):
        problem.run()
    monkeypatch.setenv("MOE_GEMM_CHECK", "0")
    assert_close_to_reference(problem.run(), problem.reference())


def test_moe_gemm_check_accepts_good_sizes(monkeypatch):
    monkeypatch.setenv("MOE_GEMM_CHECK", "1")
    problem = make_problem([3, 0, 5], n=8, k=16, dtype=torch.float32, num_rows=10)
    assert_close_to_reference(problem.run(), problem.reference())


def test_reference_accepts_host_sizes():
    problem = make_problem([2, 5], n=8, k=8, dtype=torch.float64)
    torch.testing.assert_close(grouped_mm_reference(problem.x, problem.weight, [2, 5]), problem.reference())
