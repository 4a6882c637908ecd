"""The op ``grouped_mm_gated_backward`` without a GPU: its PyTorch path (grouped_mm, or grouped_mm_gather, then
``activation.gated_activation_backward``, rows past the last expert zeroed) against a float64 reference of the
formulas, its fake kernel, its schema through ``torch.library.opcheck``, and its argument checks. The CUDA kernel (the
activation's backward in the GEMM's epilogue) against grouped_mm + the separate kernel, bitwise:
tests/test_cuda_gated_backward.py."""

import pytest
import torch
from helpers import assert_close_to_reference, make_problem
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_gemm import activation, layer
from moe_gemm.reference import grouped_mm_reference

ACTS = ["silu", "gelu", "gelu_tanh"]
# act and its derivative, from the formulas (not torch.nn.functional).
REFERENCE = {
    "silu": (lambda x: x * torch.sigmoid(x),
             lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
    "gelu": (lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
             lambda x: 0.5 * (1 + torch.erf(x / 2**0.5)) + x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5),
    "gelu_tanh": (
        lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
        lambda x: torch.func.grad(lambda y: (0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 *
                                                                        (y + 0.044715 * y**3)))).sum())(x),
    ),
}


def run(grad_y, gather_rows, problem, gate_up, row_weights, act, concatenated):
    return torch.ops.moe_gemm.grouped_mm_gated_backward(grad_y, gather_rows, problem.weight, problem.m_sizes,
                                                        problem.weight_transposed, gate_up, row_weights, act,
                                                        concatenated)


def reference(grad_rows, problem, gate_up, row_weights, act, concatenated):
    """(grad_gate_up, weighted_activated, grad_row_weights) in float64."""
    grad_activated = grouped_mm_reference(grad_rows, problem.weight, problem.m_sizes, problem.weight_transposed)
    gate, up = gate_up.double().chunk(2, dim=1) if concatenated else (gate_up[:, 0::2].double(),
                                                                       gate_up[:, 1::2].double())
    act_fn, derivative = REFERENCE[act]
    activated = act_fn(gate) * up
    w = row_weights.double()[:, None]
    grad_gate, grad_up = w * grad_activated * up * derivative(gate), w * grad_activated * act_fn(gate)
    grad_gate_up = torch.cat([grad_gate, grad_up], 1) if concatenated else torch.stack([grad_gate, grad_up], 2).flatten(1)
    return grad_gate_up, w * activated, (activated * grad_activated).sum(1)


def inputs(sizes, n, k, dtype, transposed, num_rows):
    problem = make_problem(sizes, n=n, k=k, dtype=dtype, transposed=transposed, num_rows=num_rows)
    covered = min(num_rows, sum(max(size, 0) for size in sizes))
    gate_up = torch.randn(num_rows, 2 * n).to(dtype)
    row_weights = torch.rand(num_rows)
    gate_up[covered:] = 0
    row_weights[covered:] = 0
    return problem, gate_up, row_weights, covered


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ACTS)
def test_outputs_match_the_formulas(dtype, transposed, concatenated, act):
    # Expert 1 is empty, expert 3 has a negative size, rows 25.. belong to no expert. The op's N is I (the down
    # projection's input gradient): the weight is [E, I, K] (or [E, K, I]) as grouped_mm reads it, grad_y [M, K].
    problem, gate_up, row_weights, covered = inputs([7, 0, 12, -3, 6], 16, 40, dtype, transposed, 30)
    got = run(problem.x, None, problem, gate_up, row_weights, act, concatenated)
    assert [t.shape for t in got] == [(30, 32), (30, 16), (30,)]
    assert got[0].dtype == got[1].dtype == dtype
    expected = reference(problem.x, problem, gate_up, row_weights, act, concatenated)
    for out, ref in zip(got[:2], expected[:2]):
        assert_close_to_reference(out, ref)
    # The routing weights' gradient is float32 whatever the dtype (the CUDA kernel's): a float32 tolerance at float64.
    assert_close_to_reference(got[2], expected[2], dtype=torch.float32 if dtype == torch.float64 else dtype)
    assert all((out[covered:] == 0).all() for out in got)


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
def test_it_is_the_grouped_mm_then_the_layers_activation_backward(concatenated):
    problem, gate_up, row_weights, _ = inputs([9, 4, 0, 11], 24, 16, torch.bfloat16, False, 24)
    got = run(problem.x, None, problem, gate_up, row_weights, "gelu_tanh", concatenated)
    grad_activated = torch.ops.moe_gemm.grouped_mm(problem.x, problem.weight, problem.m_sizes, False)
    expected = activation.gated_activation_backward(grad_activated, gate_up, row_weights, "gelu_tanh", concatenated)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert layer.gated_activation_backward is activation.gated_activation_backward


def test_tail_rows_are_zero_whatever_they_hold():
    # The op's contract: rows past the last expert are zeros, even where gate_up and the weights there are not.
    problem, gate_up, row_weights, covered = inputs([3, 5], 16, 8, torch.float32, False, 12)
    gate_up[covered:] = 1.0
    row_weights[covered:] = 2.0
    got = run(problem.x, None, problem, gate_up, row_weights, "silu", True)
    assert all((out[covered:] == 0).all() for out in got) and (got[1][:covered] != 0).any()


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_gather_rows_read_the_rows_of_grad_y_in_place(transposed):
    problem, gate_up, row_weights, _ = inputs([5, 0, 8], 8, 24, torch.float32, transposed, 15)
    source = torch.randn(6, 24)
    gather_rows = torch.arange(15, dtype=torch.int64) * 7919 % 6
    got = run(source, gather_rows, problem, gate_up, row_weights, "silu", False)
    expected = run(source[gather_rows], None, problem, gate_up, row_weights, "silu", False)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_no_rows_gives_empty_outputs():
    problem, gate_up, row_weights, _ = inputs([0, 0], 8, 8, torch.bfloat16, False, 0)
    got = run(problem.x, None, problem, gate_up, row_weights, "gelu", True)
    assert [t.shape for t in got] == [(0, 16), (0, 8), (0,)]


@pytest.mark.parametrize("gather", [False, True])
def test_the_fake_kernel_gives_the_shapes_and_dtypes_without_reading_values(gather):
    with FakeTensorMode():
        grad_y = torch.empty(7, 24, dtype=torch.bfloat16)
        weight = torch.empty(3, 24, 32, dtype=torch.bfloat16)  # [E, K, I], read transposed
        rows = torch.empty(11, dtype=torch.int64) if gather else None
        num_rows = 11 if gather else 7
        got = torch.ops.moe_gemm.grouped_mm_gated_backward(
            grad_y, rows, weight, torch.empty(3, dtype=torch.int64), True,
            torch.empty(num_rows, 64, dtype=torch.bfloat16), torch.empty(num_rows), "silu", True)
    assert [t.shape for t in got] == [(num_rows, 64), (num_rows, 32), (num_rows,)]
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_opcheck(transposed):
    problem, gate_up, row_weights, _ = inputs([4, 0, 6], 16, 16, torch.bfloat16, transposed, 12)
    gather_rows = torch.arange(12, dtype=torch.int64) % 5
    source = torch.randn(5, 16).bfloat16()
    for grad_y, rows in ((problem.x, None), (source, gather_rows)):
        torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_gated_backward.default,
                              (grad_y, rows, problem.weight, problem.m_sizes, transposed, gate_up, row_weights,
                               "gelu", False))


def test_bad_inputs_are_refused():
    problem, gate_up, row_weights, _ = inputs([2, 2], 8, 8, torch.float32, False, 4)
    with pytest.raises(ValueError, match="act must be one of"):
        run(problem.x, None, problem, gate_up, row_weights, "relu", True)
    with pytest.raises(ValueError, match=r"gate_up must be \[M, 2I\]"):
        run(problem.x, None, problem, gate_up[:, :8], row_weights, "silu", True)
    with pytest.raises(ValueError, match="row_weights must be float32"):
        run(problem.x, None, problem, gate_up, row_weights.double(), "silu", True)
