"""The C++ ops' own argument checks raise RuntimeError with their message, whatever toolchain built the extension.

These call the registered ops directly, past the Python checks of the public functions, so the TORCH_CHECKs in
csrc/ are what answers. An extension that carried an exported static libstdc++ crashed here (SIGSEGV while
formatting an integer into the message), so each case runs in a child process: a crash fails one test with the
child's output instead of ending the whole run."""

import subprocess
import sys
import textwrap

import pytest

from helpers import requires_cuda_op

pytestmark = [pytest.mark.gpu, requires_cuda_op]

SETUP = """
import torch, moe_gemm
x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
m_sizes = torch.tensor([4, 4], dtype=torch.int32, device="cuda")
"""

CASES = {
    # message formats tensor sizes (integers)
    "wgrad rows differ": (
        "torch.ops.moe_gemm.grouped_mm_wgrad(x, torch.randn(9, 64, device='cuda', dtype=torch.bfloat16), m_sizes)",
        "must have the same rows",
    ),
    # message formats a string argument
    "route scoring": (
        "torch.ops.moe_gemm.route(torch.randn(4, 16, device='cuda'), 2, 'relu', False, None, None, None, 1.0)",
        "scoring must be one of softmax, softmax_topk, sigmoid; got relu",
    ),
    # message formats plain integers
    "route groups cannot supply top_k": (
        "torch.ops.moe_gemm.route(torch.randn(4, 16, device='cuda'), 9, 'sigmoid', False, 4, 2, None, 1.0)",
        "top_k = 9 experts cannot come from topk_group = 2 groups of 4 experts",
    ),
    "gated_activation act": (
        "torch.ops.moe_gemm.gated_activation(torch.randn(4, 32, device='cuda'), 'relu', True)",
        "act must be one of silu, gelu, gelu_tanh; got relu",
    ),
    # message formats dtypes
    "grouped_mm dtypes differ": (
        "torch.ops.moe_gemm.grouped_mm(x, torch.randn(2, 64, 64, device='cuda'), m_sizes)",
        "differs from x dtype",
    ),
    "grouped_mm K differs": (
        "torch.ops.moe_gemm.grouped_mm(x, torch.randn(2, 32, 48, device='cuda', dtype=torch.bfloat16), m_sizes)",
        "x has K = 64 but weight has K = 48",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_check_raises_runtime_error(case):
    call, message = CASES[case]
    script = SETUP + textwrap.dedent(f"""
        try:
            {call}
        except RuntimeError as error:
            print("RAISED:", error)
        else:
            print("NO ERROR")
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    output = child.stdout + child.stderr
    assert child.returncode == 0, f"the child process died (exit {child.returncode}):\n{output[-3000:]}"
    assert "RAISED:" in child.stdout and message in child.stdout, output[-3000:]
