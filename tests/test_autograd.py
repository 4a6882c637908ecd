"""Gradients: gradcheck in float64, exact zeros where no expert owns a row, grouped_weight_grad with and without a
float32 main-grad buffer, torch.library.opcheck of the ops, and torch.compile(fullgraph=True)."""

import shutil

import pytest
import torch
from helpers import assert_close_to_reference, make_problem

import moe_gemm
from moe_gemm.reference import grouped_mm_wgrad_reference


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize(
    ("sizes", "num_rows"), [([3, 0, 4], 9), ([2, -1, 5], 6), ([4], 4)], ids=["rows_past_end", "clamped", "one_expert"]
)
def test_gradcheck(sizes, num_rows, transposed):
    problem = make_problem(sizes, n=5, k=6, dtype=torch.float64, transposed=transposed, num_rows=num_rows)
    problem.x.requires_grad_()
    problem.weight.requires_grad_()

    def forward(x, weight):
        return moe_gemm.grouped_forward(x, weight, problem.m_sizes, weight_transposed=transposed)

    assert torch.autograd.gradcheck(forward, (problem.x, problem.weight))


def test_gradcheck_through_the_other_layout_view():
    # The layout normalisation transposes a view; gradients must flow back to the tensor the user passed.
    problem = make_problem([3, 0, 4], n=5, k=6, dtype=torch.float64, num_rows=8)
    weight_kn = problem.weight.transpose(-1, -2).contiguous().requires_grad_()
    x = problem.x.requires_grad_()

    def forward(x, weight_kn):
        return moe_gemm.grouped_forward(x, weight_kn.transpose(-1, -2), problem.m_sizes)

    assert torch.autograd.gradcheck(forward, (x, weight_kn))


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_gradients_vanish_where_no_expert_owns_rows(transposed):
    # Expert 1 has no rows, expert 3 a negative size, and expert 5 starts at M = 12 (sum(m_sizes) > M).
    sizes, num_rows = [4, 0, 5, -2, 3, 6], 12
    problem = make_problem(sizes, n=8, k=16, dtype=torch.float32, transposed=transposed, num_rows=num_rows)
    problem.weight.requires_grad_()
    grad_y = torch.randn(num_rows, 8)
    problem.run().backward(grad_y)

    for expert in (1, 3, 5):
        assert torch.equal(problem.weight.grad[expert], torch.zeros_like(problem.weight.grad[expert]))
    expected = grouped_mm_wgrad_reference(problem.x, grad_y, sizes, transposed)
    assert_close_to_reference(problem.weight.grad, expected)


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_rows_past_last_group_get_zero_grad_x(transposed):
    problem = make_problem([3, 0, 2], n=8, k=16, dtype=torch.float32, transposed=transposed, num_rows=9)
    problem.x.requires_grad_()
    problem.run().backward(torch.randn(9, 8))
    assert torch.equal(problem.x.grad[5:], torch.zeros(4, 16))
    assert problem.x.grad[:5].abs().sum() > 0


def test_only_requested_gradients_are_computed():
    problem = make_problem([3, 2], n=8, k=16, dtype=torch.float32)
    problem.weight.requires_grad_()
    problem.run().sum().backward()
    assert problem.x.grad is None and problem.weight.grad is not None


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize(("sizes", "num_rows"), [([7, 0, 12, 3], 22), ([9, 20, 5], 24), ([-3, 0, 0], 4), ([0, 0], 0)])
def test_grouped_weight_grad_and_accumulation(sizes, num_rows, transposed):
    x, grad_y = torch.randn(num_rows, 16), torch.randn(num_rows, 24)
    m_sizes = torch.tensor(sizes, dtype=torch.int32)
    expected = grouped_mm_wgrad_reference(x, grad_y, sizes, transposed)
    assert_close_to_reference(moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, weight_transposed=transposed), expected)

    main_grad = torch.randn(expected.shape)
    before = main_grad.clone()
    returned = moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, weight_transposed=transposed, main_grad=main_grad)
    assert returned is main_grad
    assert_close_to_reference(main_grad, before.double() + expected)


def test_grouped_weight_grad_rejects_bad_buffers():
    x, grad_y, m_sizes = torch.randn(6, 16), torch.randn(6, 24), torch.tensor([6])
    with pytest.raises(TypeError, match="main_grad"):
        moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, main_grad=torch.zeros(1, 24, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="main_grad"):
        moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, main_grad=torch.zeros(1, 16, 24))
    with pytest.raises(ValueError, match="same rows"):
        moe_gemm.grouped_weight_grad(x, grad_y[:5], m_sizes)


OPCHECK_CASES = {
    "ragged_nk_fp32": ([5, 0, 7, 2], 16, False, torch.float32),
    "ragged_kn_bf16": ([5, 0, 7, 2], 16, True, torch.bfloat16),
    "clamped_nk_fp64": ([6, -1, 9], 12, False, torch.float64),
    "no_rows_kn_fp32": ([0, 0], 0, True, torch.float32),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_grouped_mm(case):
    sizes, num_rows, transposed, dtype = OPCHECK_CASES[case]
    problem = make_problem(sizes, n=8, k=16, dtype=dtype, transposed=transposed, num_rows=num_rows, requires_grad=True)
    arguments = (problem.x, problem.weight, problem.m_sizes, transposed)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm.default, arguments)


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_grouped_mm_wgrad(case):
    sizes, num_rows, transposed, dtype = OPCHECK_CASES[case]
    x, grad_y = torch.randn(num_rows, 16).to(dtype), torch.randn(num_rows, 8).to(dtype)
    arguments = (x, grad_y, torch.tensor(sizes), transposed)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_wgrad.default, arguments)


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_grouped_mm_wgrad_accumulate(case):
    sizes, num_rows, transposed, dtype = OPCHECK_CASES[case]
    x, grad_y = torch.randn(num_rows, 16).to(dtype), torch.randn(num_rows, 8).to(dtype)
    main_grad = torch.randn((len(sizes), 16, 8) if transposed else (len(sizes), 8, 16))
    arguments = (main_grad, x, grad_y, torch.tensor(sizes), transposed)
    torch.library.opcheck(torch.ops.moe_gemm.grouped_mm_wgrad_accumulate_.default, arguments)


def _has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor", marks=pytest.mark.skipif(not _has_cxx_compiler(), reason="inductor needs a C++ compiler")
        ),
    ],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_torch_compile_fullgraph(backend, transposed, monkeypatch):
    # MOE_GEMM_CHECK must not break the trace: the host-side check is skipped while compiling.
    monkeypatch.setenv("MOE_GEMM_CHECK", "1")
    torch._dynamo.reset()
    problem = make_problem([5, 0, 7, 2], n=8, k=16, dtype=torch.float32, transposed=transposed, num_rows=16)
    x, weight = (t.detach().clone().requires_grad_() for t in (problem.x, problem.weight))
    compiled = torch.compile(moe_gemm.grouped_forward, fullgraph=True, backend=backend)
    out = compiled(x, weight, problem.m_sizes, weight_transposed=transposed)
    grad_y = torch.randn_like(out)
    out.backward(grad_y)

    problem.x.requires_grad_()
    problem.weight.requires_grad_()
    eager = problem.run()
    eager.backward(grad_y)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, problem.x.grad)
    torch.testing.assert_close(weight.grad, problem.weight.grad)


def test_grouped_weight_grad_names_bad_arguments():
    x, grad_y = torch.randn(6, 16), torch.randn(6, 24)
    with pytest.raises(TypeError, match="m_sizes"):
        moe_gemm.grouped_weight_grad(x, grad_y, torch.tensor([6.0]))
    with pytest.raises(TypeError, match="grad_y"):
        moe_gemm.grouped_weight_grad(x, grad_y.double(), torch.tensor([6]))
    with pytest.raises(ValueError, match=r"main_grad: expected shape \(1, 16, 24\)"):
        moe_gemm.grouped_weight_grad(x, grad_y, torch.tensor([6]), weight_transposed=True, main_grad=torch.zeros(1, 24, 16))
