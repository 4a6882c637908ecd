"""The op ``grouped_mm_gather`` without a GPU: its PyTorch path against the float64 reference of the gathered rows,
its fake kernel, its schema through ``torch.library.opcheck``, and the checks of its row indices. The CUDA kernel
against ``grouped_mm`` of ``index_select``: tests/test_cuda_gather.py."""

import pytest
import torch
from helpers import assert_close_to_reference, make_problem
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_gemm import _ops
from moe_gemm.reference import grouped_mm_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def gather(x, gather_rows, problem):
    return torch.ops.moe_gemm.grouped_mm_gather(x, gather_rows, problem.weight, problem.m_sizes,
                                                problem.weight_transposed)


def source_and_rows(num_rows: int, source_rows: int, k: int, dtype: torch.dtype):
    """A source ``[source_rows, K]`` and ``num_rows`` indices into it that repeat and come in no order, as the MoE
    layer's ``token_of_row`` (each token appears top_k times, sorted by expert)."""
    source = torch.randn(source_rows, k).to(dtype)
    gather_rows = torch.arange(num_rows, dtype=torch.int64) * 7919 % source_rows
    return source, gather_rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_row_r_is_source_row_gather_rows_r_times_its_experts_weight(dtype, transposed):
    # Expert 1 is empty, expert 3 has a negative size, rows 25.. belong to no expert.
    sizes, num_rows = [7, 0, 12, -3, 6], 30
    problem = make_problem(sizes, n=24, k=40, dtype=dtype, transposed=transposed, num_rows=num_rows)
    source, gather_rows = source_and_rows(num_rows, 11, 40, dtype)
    y = gather(source, gather_rows, problem)
    assert y.shape == (num_rows, 24) and y.dtype == dtype
    reference = grouped_mm_reference(source[gather_rows], problem.weight, problem.m_sizes, transposed)
    assert_close_to_reference(y, reference)
    assert torch.equal(y[25:], torch.zeros_like(y[25:]))


def test_it_is_grouped_mm_of_index_select():
    problem = make_problem([5, 0, 9], n=16, k=32, num_rows=20)
    source, gather_rows = source_and_rows(20, 7, 32, torch.bfloat16)
    expected = torch.ops.moe_gemm.grouped_mm(source.index_select(0, gather_rows), problem.weight, problem.m_sizes)
    assert torch.equal(gather(source, gather_rows, problem), expected)


def test_duplicated_rows_give_equal_outputs_within_an_expert():
    # Small integers: every product and sum is exact, whatever order the CPU's matrix product adds them in.
    problem = make_problem([6], n=16, k=32, dtype=torch.float32)
    problem.weight = torch.randint(-2, 3, problem.weight.shape).float()
    source = torch.randint(-2, 3, (3, 32)).float()
    y = gather(source, torch.tensor([2, 0, 2, 1, 0, 2]), problem)
    assert torch.equal(y[0], y[2]) and torch.equal(y[0], y[5]) and torch.equal(y[1], y[4])
    assert torch.equal(y[0], source[2] @ problem.weight[0].t())


def test_no_rows_gives_an_empty_output():
    problem = make_problem([0, 0], n=16, k=32, num_rows=0)
    y = gather(torch.randn(4, 32).to(torch.bfloat16), torch.empty(0, dtype=torch.int64), problem)
    assert y.shape == (0, 16) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_the_fake_kernel_gives_the_shape_and_dtype_without_reading_values(transposed):
    with FakeTensorMode():
        x = torch.empty(9, 32, dtype=torch.bfloat16)
        weight = torch.empty((3, 32, 24) if transposed else (3, 24, 32), dtype=torch.bfloat16)
        y = torch.ops.moe_gemm.grouped_mm_gather(x, torch.empty(40, dtype=torch.int64), weight,
                                                 torch.empty(3, dtype=torch.int64), transposed)
    assert y.shape == (40, 24) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_opcheck(transposed):
    problem = make_problem([5, 0, 9], n=16, k=32, transposed=transposed, num_rows=20)
    source, gather_rows = source_and_rows(20, 7, 32, torch.bfloat16)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_gather.default,
                          (source, gather_rows, problem.weight, problem.m_sizes, transposed))


GATHER_ROWS_CASES = {
    "int32 indices": (torch.tensor([0, 1], dtype=torch.int32), TypeError, r"gather_rows: expected torch.int64"),
    "2-D indices": (torch.tensor([[0], [1]]), ValueError, r"gather_rows: expected a 1-D tensor \[M\]"),
    "a list": ([0, 1], TypeError, r"gather_rows: expected a torch.Tensor"),
    "an index past the source": (torch.tensor([0, 4]), IndexError, r"index"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GATHER_ROWS_CASES))
def test_the_pytorch_path_checks_the_row_indices(case):
    gather_rows, error, message = GATHER_ROWS_CASES[case]
    problem = make_problem([2], n=16, k=32)
    with pytest.raises(error, match=message):
        _ops.grouped_mm_gather_torch(torch.randn(4, 32).to(torch.bfloat16), gather_rows, problem.weight,
                                     problem.m_sizes)


def test_gemm_op_finds_the_pytorch_path_by_name():
    assert _ops.gemm_op("grouped_mm_gather", torch.device("cpu")) is torch.ops.moe_gemm.grouped_mm_gather.default
    assert _ops.grouped_mm_gather_torch is getattr(_ops, "grouped_mm_gather".rstrip("_") + "_torch")
