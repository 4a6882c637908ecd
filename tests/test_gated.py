"""The op ``grouped_mm_gated`` without a GPU: its PyTorch path (grouped_mm, or grouped_mm_gather, then the gated
activation) against a float64 reference, its fake kernel, its schema through ``torch.library.opcheck``, and its
argument checks. The CUDA kernel (the activation in the GEMM's epilogue) against grouped_mm + the separate activation
kernel, bitwise: tests/test_cuda_gated.py."""

import pytest
import torch
from helpers import assert_close_to_reference, make_problem
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_gemm import activation, layer
from moe_gemm.reference import grouped_mm_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
ACTS = ["silu", "gelu", "gelu_tanh"]
REFERENCE_ACTS = {
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
}


def gated(x, gather_rows, problem, act, concatenated, write_pre_activation=True):
    return torch.ops.moe_gemm.grouped_mm_gated(x, gather_rows, problem.weight, problem.m_sizes,
                                               problem.weight_transposed, act, concatenated, write_pre_activation)


def reference(rows, problem, act, concatenated):
    """(activated, gate_up) in float64, from the formulas rather than torch.nn.functional."""
    gate_up = grouped_mm_reference(rows, problem.weight, problem.m_sizes, problem.weight_transposed)
    gate, up = gate_up.chunk(2, dim=1) if concatenated else (gate_up[:, 0::2], gate_up[:, 1::2])
    return REFERENCE_ACTS[act](gate) * up, gate_up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ACTS)
def test_activated_is_act_of_gate_times_up_of_the_grouped_gemm(dtype, transposed, concatenated, act):
    # Expert 1 is empty, expert 3 has a negative size, rows 25.. belong to no expert.
    sizes, num_rows = [7, 0, 12, -3, 6], 30
    problem = make_problem(sizes, n=32, k=40, dtype=dtype, transposed=transposed, num_rows=num_rows)
    activated, gate_up = gated(problem.x, None, problem, act, concatenated)
    assert activated.shape == (num_rows, 16) and gate_up.shape == (num_rows, 32)
    assert activated.dtype == gate_up.dtype == dtype
    expected_activated, expected_gate_up = reference(problem.x, problem, act, concatenated)
    assert_close_to_reference(gate_up, expected_gate_up)
    assert_close_to_reference(activated, expected_activated)
    assert torch.equal(activated[25:], torch.zeros_like(activated[25:]))


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
def test_it_is_the_layers_gated_activation_of_grouped_mm(concatenated):
    problem = make_problem([9, 4, 0, 11], n=48, k=24, dtype=torch.bfloat16)
    activated, gate_up = gated(problem.x, None, problem, "gelu_tanh", concatenated)
    expected = torch.ops.moe_gemm.grouped_mm(problem.x, problem.weight, problem.m_sizes, False)
    assert torch.equal(gate_up, expected)
    assert torch.equal(activated, layer.gated_activation(expected, "gelu_tanh", concatenated))


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_gather_rows_read_the_rows_of_x_in_place(transposed):
    problem = make_problem([5, 0, 8], n=16, k=24, dtype=torch.float32, transposed=transposed, num_rows=15)
    source = torch.randn(6, 24)
    gather_rows = torch.arange(15, dtype=torch.int64) * 7919 % 6
    activated, gate_up = gated(source, gather_rows, problem, "silu", False)
    expected_activated, expected_gate_up = gated(source[gather_rows], None, problem, "silu", False)
    assert torch.equal(activated, expected_activated) and torch.equal(gate_up, expected_gate_up)


def test_without_the_pre_activation_only_the_activation_is_returned():
    problem = make_problem([3, 4], n=16, k=8, dtype=torch.bfloat16)
    activated, gate_up = gated(problem.x, None, problem, "silu", True, write_pre_activation=False)
    assert gate_up is None
    assert torch.equal(activated, gated(problem.x, None, problem, "silu", True)[0])


def test_no_rows_gives_empty_outputs():
    problem = make_problem([0, 0], n=16, k=8, dtype=torch.bfloat16, num_rows=0)
    activated, gate_up = gated(problem.x, None, problem, "gelu", True)
    assert activated.shape == (0, 8) and gate_up.shape == (0, 16)


@pytest.mark.parametrize("write_pre_activation", [True, False])
@pytest.mark.parametrize("gather", [False, True])
def test_the_fake_kernel_gives_the_shapes_and_dtype_without_reading_values(write_pre_activation, gather):
    with FakeTensorMode():
        x = torch.empty(7, 24, dtype=torch.bfloat16)
        weight = torch.empty(3, 64, 24, dtype=torch.bfloat16)
        rows = torch.empty(11, dtype=torch.int64) if gather else None
        activated, gate_up = torch.ops.moe_gemm.grouped_mm_gated(
            x, rows, weight, torch.empty(3, dtype=torch.int64), False, "silu", True, write_pre_activation)
    num_rows = 11 if gather else 7
    assert activated.shape == (num_rows, 32) and activated.dtype == torch.bfloat16
    assert (gate_up is None) != write_pre_activation
    if write_pre_activation:
        assert gate_up.shape == (num_rows, 64)


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("write_pre_activation", [True, False])
def test_opcheck(transposed, write_pre_activation):
    problem = make_problem([4, 0, 6], n=32, k=16, dtype=torch.bfloat16, transposed=transposed, num_rows=12)
    gather_rows = torch.arange(12, dtype=torch.int64) % 5
    source = torch.randn(5, 16).bfloat16()
    for x, rows in ((problem.x, None), (source, gather_rows)):
        torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_gated.default,
                              (x, rows, problem.weight, problem.m_sizes, transposed, "gelu", False,
                               write_pre_activation))


def test_an_unknown_activation_is_refused():
    problem = make_problem([2], n=16, k=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="act must be one of"):
        gated(problem.x, None, problem, "relu", True)


def test_an_odd_number_of_gate_and_up_rows_is_refused():
    problem = make_problem([2], n=15, k=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="2I"):
        gated(problem.x, None, problem, "silu", False)


def test_the_layer_and_the_op_share_one_activation_formula():
    assert layer.ACTIVATIONS is activation.ACTIVATIONS and layer.gated_activation is activation.gated_activation
