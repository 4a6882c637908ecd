"""The demo (``python -m moe_gemm.demo``) and the package's command-line entry points."""

import subprocess
import sys

import pytest

import moe_gemm
from moe_gemm import demo


def demo_rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.split()}


def test_demo_checks_the_layer_against_float64(capsys):
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    rows = demo_rows(out)
    for step in ("MoE", "route", "experts_forward"):
        assert rows[step].endswith("ok"), out
    assert "Columns:" in out and "rel. error" in out


def test_demo_fails_when_the_layer_is_wrong(capsys, monkeypatch):
    # The check must catch a wrong layer: scale the experts' output by 1.1 (the modules call moe_gemm.layer's).
    original = moe_gemm.layer.experts_forward

    def wrong_experts_forward(*args, **kwargs):
        return original(*args, **kwargs) * 1.1

    monkeypatch.setattr(moe_gemm.layer, "experts_forward", wrong_experts_forward)
    monkeypatch.setattr(moe_gemm, "experts_forward", wrong_experts_forward)
    assert demo.main([]) == 1
    rows = demo_rows(capsys.readouterr().out)
    assert rows["MoE"].endswith("FAIL") and rows["experts_forward"].endswith("FAIL") and rows["route"].endswith("ok")


def test_demo_does_not_import_the_benchmark():
    code = "import sys, moe_gemm.demo; print(sorted(m for m in sys.modules if m.startswith('moe_gemm.bench')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_build_info():
    info = moe_gemm.build_info()
    assert info.startswith(f"moe_gemm {moe_gemm.__version__}, torch ") and "CUDA kernels: " in info


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("moe_gemm", "CUDA kernels:"),
        ("moe_gemm.demo", "usage: python -m moe_gemm.demo"),
        ("moe_gemm.bench", "usage: python -m moe_gemm.bench"),
    ],
)
def test_command_line(module, expected):
    args = [sys.executable, "-m", module] + (["--help"] if module != "moe_gemm" else [])
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    assert expected in result.stdout
