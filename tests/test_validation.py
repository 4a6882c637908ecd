"""Bad inputs: every case raises TypeError or ValueError whose message starts with the argument's name and says
what was expected and what was given. The CUDA-kernel rules are checked through ``_validation.validate`` with
``cuda_kernel=True`` on CPU tensors, so they run here without a GPU."""

import pytest
import torch
from helpers import make_problem

import moe_gemm
from moe_gemm import _validation


def good(**overrides):
    """Arguments of a valid bfloat16 problem (E=3, M=12, N=16, K=32), with some replaced."""
    problem = make_problem([5, 0, 7], n=16, k=32, dtype=torch.bfloat16)
    arguments = {"x": problem.x, "weight": problem.weight, "m_sizes": problem.m_sizes, "weight_transposed": False}
    return {**arguments, **overrides}


def column_major(rows, cols, dtype=torch.bfloat16):
    return torch.randn(cols, rows).to(dtype).t()


def misaligned(rows, cols, dtype=torch.bfloat16):
    """A row-major [rows, cols] view starting one element into its storage."""
    return torch.randn(rows * cols + 1).to(dtype)[1:].view(rows, cols)


def padded_rows(rows, cols, pad, dtype=torch.bfloat16):
    return torch.randn(rows, cols + pad).to(dtype)[:, :cols]


GENERAL_CASES = {
    "x_not_a_tensor": (good(x=[[1.0]]), TypeError, "x", "torch.Tensor"),
    "weight_not_a_tensor": (good(weight=None), TypeError, "weight", "torch.Tensor"),
    "x_integer_dtype": (good(x=torch.ones(12, 32, dtype=torch.int32)), TypeError, "x", "torch.int32"),
    "mixed_dtypes": (good(weight=torch.randn(3, 16, 32, dtype=torch.float16)), TypeError, "weight", "torch.float16"),
    "float_sizes": (good(m_sizes=torch.tensor([5.0, 0.0, 7.0])), TypeError, "m_sizes", "torch.float32"),
    "bool_sizes": (good(m_sizes=torch.tensor([True, False, True])), TypeError, "m_sizes", "torch.bool"),
    "int16_sizes": (good(m_sizes=torch.tensor([5, 0, 7], dtype=torch.int16)), TypeError, "m_sizes", "int16"),
    "x_3d": (good(x=torch.randn(2, 6, 32).bfloat16()), ValueError, "x", "(2, 6, 32)"),
    "weight_2d": (good(weight=torch.randn(16, 32).bfloat16()), ValueError, "weight", "(16, 32)"),
    "sizes_2d": (good(m_sizes=torch.tensor([[5, 0, 7]])), ValueError, "m_sizes", "(1, 3)"),
    "k_mismatch": (good(x=torch.randn(12, 24).bfloat16()), ValueError, "x", "K = 32"),
    "k_mismatch_transposed": (good(weight_transposed=True), ValueError, "x", "K = 16"),
    "too_few_sizes": (good(m_sizes=torch.tensor([5, 7])), ValueError, "m_sizes", "E = 3"),
    "too_many_sizes": (good(m_sizes=torch.tensor([5, 0, 7, 0])), ValueError, "m_sizes", "got 4"),
    "weight_on_other_device": (
        good(weight=torch.empty(3, 16, 32, dtype=torch.bfloat16, device="meta")),
        ValueError,
        "weight",
        "meta",
    ),
    "sizes_on_other_device": (
        good(m_sizes=torch.empty(3, dtype=torch.int64, device="meta")),
        ValueError,
        "m_sizes",
        "meta",
    ),
}

KERNEL_CASES = {
    "float32": (good(x=torch.randn(12, 32), weight=torch.randn(3, 16, 32)), TypeError, "x", ".to(torch.bfloat16)"),
    "float64": (
        good(x=torch.randn(12, 32).double(), weight=torch.randn(3, 16, 32).double()),
        TypeError,
        "x",
        "bfloat16 and torch.float16",
    ),
    "k_not_multiple_of_8": (
        good(x=torch.randn(12, 12).bfloat16(), weight=torch.randn(3, 16, 12).bfloat16()),
        ValueError,
        "x",
        "multiple of 8",
    ),
    "n_not_multiple_of_8": (good(weight=torch.randn(3, 12, 32).bfloat16()), ValueError, "weight", "N = 12"),
    "n_not_multiple_of_8_transposed": (
        good(weight=torch.randn(3, 32, 20).bfloat16(), weight_transposed=True),
        ValueError,
        "weight",
        "N = 20",
    ),
    "x_column_major": (good(x=column_major(12, 32)), ValueError, "x", "stride 1"),
    "x_row_stride_unaligned": (good(x=padded_rows(12, 32, pad=4)), ValueError, "x", "stride(0)"),
    "x_pointer_unaligned": (good(x=misaligned(12, 32)), ValueError, "x", "16-byte aligned"),
    "weight_expert_stride_unaligned": (
        good(weight=torch.randn(3 * (16 * 32 + 4)).bfloat16().as_strided((3, 16, 32), (16 * 32 + 4, 32, 1))),
        ValueError,
        "weight",
        "stride(0)",
    ),
    "weight_no_unit_stride": (
        good(weight=torch.randn(3, 16, 64).bfloat16()[:, :, ::2]),
        ValueError,
        "weight",
        "stride 1",
    ),
}


def assert_names_argument(error: Exception, argument: str, detail: str) -> None:
    message = str(error)
    assert message.startswith(f"{argument}: "), message
    assert detail in message, message


@pytest.mark.parametrize("case", GENERAL_CASES)
def test_grouped_forward_rejects(case):
    arguments, error_type, argument, detail = GENERAL_CASES[case]
    with pytest.raises(error_type) as error:
        moe_gemm.grouped_forward(
            arguments["x"], arguments["weight"], arguments["m_sizes"], weight_transposed=arguments["weight_transposed"]
        )
    assert_names_argument(error.value, argument, detail)


@pytest.mark.parametrize("case", {**GENERAL_CASES, **KERNEL_CASES})
def test_cuda_kernel_validation_rejects(case):
    arguments, error_type, argument, detail = {**GENERAL_CASES, **KERNEL_CASES}[case]
    with pytest.raises(error_type) as error:
        _validation.validate(**arguments, cuda_kernel=True)
    assert_names_argument(error.value, argument, detail)


@pytest.mark.parametrize("transposed", [False, True])
def test_cuda_kernel_validation_accepts(transposed):
    problem = make_problem([5, 0, 7], n=16, k=32, dtype=torch.float16, transposed=transposed)
    weight, flag = _validation.validate(problem.x, problem.weight, problem.m_sizes, transposed, cuda_kernel=True)
    assert weight is problem.weight and flag is transposed


def test_cuda_kernel_validation_accepts_other_layout_and_empty_x():
    # The transposed view of a contiguous weight is normalised before the stride checks, and M = 0 reads nothing.
    weight = torch.randn(3, 32, 16).bfloat16().transpose(-1, -2)
    x = torch.empty(0, 32, dtype=torch.bfloat16)
    normalized, flag = _validation.validate(x, weight, torch.zeros(3, dtype=torch.int32), False, cuda_kernel=True)
    assert flag is True and normalized.shape == (3, 32, 16) and normalized.stride(-1) == 1


def test_kernel_layout_problem_names_nothing_for_a_contiguous_matrix():
    assert _validation.kernel_layout_problem(torch.empty(4, 16, dtype=torch.bfloat16)) is None


def test_cuda_kernel_validation_rejects_dimensions_past_32_bit_coordinates():
    # An expanded view: 2**31 rows of x without the memory.
    x = torch.zeros(1, 8, dtype=torch.bfloat16).expand(2**31, 8)
    weight = torch.zeros(1, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as error:
        _validation.check_kernel_layout(x, weight, False)
    assert_names_argument(error.value, "x", "below 2**31")


@pytest.mark.parametrize("case", {**GENERAL_CASES, **KERNEL_CASES})
def test_validation_names_the_callers_arguments(case):
    # The MoE layer passes its own names: every message names those instead of x and weight.
    arguments, error_type, argument, detail = {**GENERAL_CASES, **KERNEL_CASES}[case]
    names = {"x": "hidden", "weight": "gate_up_proj"}
    with pytest.raises(error_type) as error:
        _validation.validate(**arguments, cuda_kernel=True, x_name="hidden", weight_name="gate_up_proj")
    assert_names_argument(error.value, names.get(argument, argument), detail)
    assert not str(error.value).startswith(("x:", "weight:"))
