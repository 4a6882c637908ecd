"""The op ``grouped_mm_wgrad_gather`` without a GPU: its PyTorch path against the float64 reference of the gathered
rows, rows past ``sum(m_sizes)`` (NaN in the source) left out, experts without rows exactly zero, its fake kernel, its
schema through ``torch.library.opcheck``, and the checks of its row indices. The CUDA kernel against
``grouped_mm_wgrad`` of ``index_select``: tests/test_cuda_wgrad_gather.py."""

import pytest
import torch
from helpers import assert_close_to_reference
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_gemm import _ops
from moe_gemm.reference import grouped_mm_wgrad_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
GATHERED = ["x", "grad_y", "both"]


def wgrad_gather(x, grad_y, m_sizes, transposed, x_rows=None, grad_y_rows=None):
    return torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, m_sizes, transposed, x_rows, grad_y_rows)


def rows_into(source_rows: int, num_rows: int, step: int = 7919) -> torch.Tensor:
    """``num_rows`` indices into ``source_rows`` rows that repeat and come in no order, as the MoE layer's
    ``token_of_row``."""
    return torch.arange(num_rows, dtype=torch.int64) * step % source_rows


def make_case(gathered, num_rows, n, k, dtype, source_rows=11):
    """``(x, grad_y, x_rows, grad_y_rows)``: the gathered operands come from sources of ``source_rows`` rows, the
    others have ``num_rows`` rows."""
    x_rows = rows_into(source_rows, num_rows) if gathered in ("x", "both") else None
    grad_y_rows = rows_into(source_rows, num_rows, 104729) if gathered in ("grad_y", "both") else None
    x = torch.randn(source_rows if x_rows is not None else num_rows, k).to(dtype)
    grad_y = torch.randn(source_rows if grad_y_rows is not None else num_rows, n).to(dtype)
    return x, grad_y, x_rows, grad_y_rows


def selected(tensor, rows):
    return tensor if rows is None else tensor.index_select(0, rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_it_is_the_weight_gradient_of_the_gathered_rows(gathered, transposed, dtype):
    # Expert 1 is empty, expert 3 has a negative size, rows 25.. belong to no expert.
    sizes, num_rows = [7, 0, 12, -3, 6], 30
    x, grad_y, x_rows, grad_y_rows = make_case(gathered, num_rows, 24, 40, dtype)
    m_sizes = torch.tensor(sizes)
    grad_w = wgrad_gather(x, grad_y, m_sizes, transposed, x_rows, grad_y_rows)
    assert grad_w.shape == ((5, 40, 24) if transposed else (5, 24, 40)) and grad_w.dtype == dtype
    reference = grouped_mm_wgrad_reference(selected(x, x_rows), selected(grad_y, grad_y_rows), sizes, transposed)
    assert_close_to_reference(grad_w, reference)
    for expert in (1, 3):
        assert torch.equal(grad_w[expert], torch.zeros_like(grad_w[expert])), f"expert {expert} has no rows"


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_it_is_grouped_mm_wgrad_of_index_select(gathered, transposed):
    x, grad_y, x_rows, grad_y_rows = make_case(gathered, 20, 16, 32, torch.bfloat16, source_rows=7)
    m_sizes = torch.tensor([5, 0, 9])
    expected = torch.ops.moe_gemm.grouped_mm_wgrad(selected(x, x_rows), selected(grad_y, grad_y_rows), m_sizes,
                                                   transposed)
    assert torch.equal(wgrad_gather(x, grad_y, m_sizes, transposed, x_rows, grad_y_rows), expected)


@pytest.mark.parametrize("gathered", GATHERED)
def test_rows_past_the_last_expert_are_never_read(gathered):
    # The source's rows 8.. are NaN, and only indices past sum(m_sizes) = 14 point at them.
    x, grad_y, x_rows, grad_y_rows = make_case(gathered, 20, 16, 32, torch.float32, source_rows=12)
    for rows, source in ((x_rows, x), (grad_y_rows, grad_y)):
        if rows is not None:
            source[8:] = float("nan")
            rows[:14] %= 8
            rows[14:] = torch.arange(8, 14) % 12
    m_sizes = torch.tensor([5, 0, 9])
    grad_w = wgrad_gather(x, grad_y, m_sizes, False, x_rows, grad_y_rows)
    assert torch.isfinite(grad_w).all()
    routed = [selected(t, None if rows is None else rows[:14])[:14] for t, rows in ((x, x_rows), (grad_y, grad_y_rows))]
    assert_close_to_reference(grad_w, grouped_mm_wgrad_reference(*routed, m_sizes))


def test_duplicated_rows_count_once_each():
    # Small integers: every product and sum is exact. Expert 0 takes source row 2 three times and row 0 once.
    x = torch.randint(-2, 3, (3, 8)).float()
    grad_y = torch.randint(-2, 3, (4, 16)).float()
    grad_w = wgrad_gather(x, grad_y, torch.tensor([4]), False, x_rows=torch.tensor([2, 0, 2, 2]))
    expected = sum(grad_y[i, :, None] * x[row, None, :] for i, row in enumerate([2, 0, 2, 2]))
    assert torch.equal(grad_w[0], expected)


def test_no_rows_gives_zeros():
    x = torch.randn(4, 32).to(torch.bfloat16)
    grad_w = wgrad_gather(x, torch.empty(0, 16, dtype=torch.bfloat16), torch.tensor([0, 0]), False,
                          x_rows=torch.empty(0, dtype=torch.int64))
    assert grad_w.shape == (2, 16, 32) and (grad_w == 0).all()


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_the_fake_kernel_gives_the_shape_and_dtype_without_reading_values(transposed):
    with FakeTensorMode():
        x = torch.empty(9, 32, dtype=torch.bfloat16)
        grad_y = torch.empty(40, 24, dtype=torch.bfloat16)
        grad_w = torch.ops.moe_gemm.grouped_mm_wgrad_gather(x, grad_y, torch.empty(3, dtype=torch.int64), transposed,
                                                            torch.empty(40, dtype=torch.int64))
    assert grad_w.shape == ((3, 32, 24) if transposed else (3, 24, 32)) and grad_w.dtype == torch.bfloat16


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("gathered", GATHERED)
def test_opcheck(gathered, transposed):
    x, grad_y, x_rows, grad_y_rows = make_case(gathered, 20, 16, 32, torch.bfloat16, source_rows=7)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_wgrad_gather.default,
                          (x, grad_y, torch.tensor([5, 0, 9]), transposed, x_rows, grad_y_rows))


ROW_INDEX_CASES = {
    "int32 x_rows": ({"x_rows": torch.tensor([0, 1], dtype=torch.int32)}, TypeError, r"x_rows: expected torch.int64"),
    "2-D grad_y_rows": ({"grad_y_rows": torch.tensor([[0], [1]])}, ValueError,
                        r"grad_y_rows: expected a 1-D tensor \[M\]"),
    "a list": ({"x_rows": [0, 1]}, TypeError, r"x_rows: expected a torch.Tensor"),
    "an index past the source": ({"x_rows": torch.tensor([0, 4])}, IndexError, r"index"),
    "more indices than grad_y rows": ({"x_rows": torch.tensor([0, 1, 2])}, ValueError, r"same rows"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROW_INDEX_CASES))
def test_the_pytorch_path_checks_the_row_indices(case):
    rows, error, message = ROW_INDEX_CASES[case]
    x, grad_y = torch.randn(4, 32).to(torch.bfloat16), torch.randn(2, 16).to(torch.bfloat16)
    with pytest.raises(error, match=message):
        _ops.grouped_mm_wgrad_gather_torch(x, grad_y, torch.tensor([2]), False, **rows)


def test_gemm_op_finds_the_pytorch_path_by_name():
    op = _ops.gemm_op("grouped_mm_wgrad_gather", torch.device("cpu"))
    assert op is torch.ops.moe_gemm.grouped_mm_wgrad_gather.default
    assert _ops.grouped_mm_wgrad_gather_torch is getattr(_ops, "grouped_mm_wgrad_gather".rstrip("_") + "_torch")
