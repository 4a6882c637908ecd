"""The demo's CPU path and the package's command-line entry points."""

import subprocess
import sys

import pytest

import moe_gemm
from moe_gemm import _ops, demo


@pytest.mark.skipif(_ops.kernels_unavailable_reason() is None, reason="with the kernels the demo says so")
def test_demo_runs_the_cpu_path(capsys):
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for step in ("up", "down", "layer"):
        assert lines[step].endswith("ok"), out
    assert "CUDA path not available: " in out


def test_build_info():
    info = moe_gemm.build_info()
    assert info.startswith(f"moe_gemm {moe_gemm.__version__}, torch ")
    assert ("CUDA kernels: built" in info) == moe_gemm.cuda_available()


@pytest.mark.parametrize(
    ("module", "expected"), [("moe_gemm", "CUDA kernels:"), ("moe_gemm.bench", "usage: python -m moe_gemm.bench")]
)
def test_command_line(module, expected):
    args = [sys.executable, "-m", module] + (["--help"] if module.endswith("bench") else [])
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    assert expected in result.stdout
