"""The shape of ``moe_gemm/bench/``: nothing outside it imports it, its modules import one way (timing, suite, report,
the modes, ``__main__``), and its command line picks one table."""

import ast
import pathlib
import subprocess
import sys

import pytest

import moe_gemm
from moe_gemm.bench import __main__ as cli
from moe_gemm.bench import backward, decode, forward, layer

PACKAGE = pathlib.Path(moe_gemm.__file__).parent
# Each module of the benchmark and the modules of the benchmark it may import.
LAYERS = {
    "timing": set(),
    "suite": {"timing"},
    "report": {"suite", "timing"},
    "forward": {"report", "suite", "timing"},
    "backward": {"report", "suite", "timing"},
    "decode": {"forward", "report", "suite", "timing"},
    "layer": {"report", "suite", "timing"},
    "ep": {"layer", "report", "suite", "timing"},
    "fp8": {"report", "suite", "timing"},
    "__main__": {"backward", "decode", "ep", "forward", "fp8", "layer", "suite"},
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """The absolute module names that a file imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_outside_the_benchmark_imports_it():
    for path in PACKAGE.rglob("*.py"):
        if "bench" not in path.relative_to(PACKAGE).parts:
            imported = imported_modules(path)
            assert not any(name.startswith("moe_gemm.bench") for name in imported), path


@pytest.mark.parametrize("module", ["moe_gemm", "moe_gemm.demo"])
def test_importing_the_package_or_the_demo_loads_no_benchmark(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('moe_gemm.bench')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_benchmark_modules_import_one_way():
    files = {path.stem: path for path in (PACKAGE / "bench").glob("*.py") if path.stem != "__init__"}
    assert set(files) == set(LAYERS)
    for name, path in files.items():
        used = {
            part
            for imported in imported_modules(path)
            if imported.startswith("moe_gemm.bench.")
            for part in [imported.split(".")[2]]
            if part in LAYERS
        }
        assert used <= LAYERS[name], f"{name} imports {sorted(used - LAYERS[name])}"


def test_mode_flags_pick_one_table():
    assert cli.mode_of(cli.parse_args([])) is forward
    assert cli.mode_of(cli.parse_args(["--backward"])) is backward
    assert cli.mode_of(cli.parse_args(["--decode", "--quick"])) is decode
    assert cli.mode_of(cli.parse_args(["--layer"])) is layer
    with pytest.raises(SystemExit):
        cli.parse_args(["--backward", "--decode"])


@pytest.fixture
def cpu_stand_ins(monkeypatch):
    """The GPU-only pieces of a run replaced: weights on CPU, fixed ceilings, a timer that runs each function once."""
    from moe_gemm.bench import report, suite, timing

    random_weight = suite.random_weight

    def cpu_weight(model, gemm, dtype, device="cuda"):
        return random_weight(model, gemm, dtype, device="cpu")

    def run_once(fns, *args, **kwargs):
        for fn in fns:
            fn()
        return [0.5 * (i + 1) for i in range(len(fns))]

    monkeypatch.setattr(suite, "random_weight", cpu_weight)
    monkeypatch.setattr(report, "measure_ceilings", lambda: (791.0, 3.02))
    monkeypatch.setattr(report.torch.cuda, "get_device_name", lambda *args: "cpu stand-in")
    monkeypatch.setattr(timing, "bench_interleaved_ms", run_once)


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_a_whole_run_on_cpu_writes_its_table_and_json(mode, cpu_stand_ins, tmp_path, capsys):
    import json

    # A tiny suite: every path of a run (cases, table, summary, JSON) without a GPU.
    suite = {"models": {"tiny": {"experts": 4, "hidden": 32, "moe_intermediate": 16, "top_k": 2}}, "tokens": [3, 8]}
    argv = ["--models", "tiny", "--tokens", "3", "8", "--json", str(tmp_path / "out.json")]
    args = cli.parse_args(argv + ([f"--{mode}"] if mode != "forward" else []), suite)
    assert cli.mode_of(args).run(args, suite) == 0
    out = capsys.readouterr().out
    assert "# ceilings: dense bf16 8192^3 matmul 791 TFLOP/s" in out and "geometric" in out
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["mode"] == mode and result["peak_tflops"] == 791.0 and result["device"] == "cpu stand-in"
    assert [(r["tokens"], r["gemm"]) for r in result["rows"]] == [(3, "up"), (3, "down"), (8, "up"), (8, "down")]
    assert all(r["check"] == "ok" for r in result["rows"])
    assert sum(line.startswith("tiny ") for line in out.splitlines()) == 4


@pytest.mark.skipif(moe_gemm._ops.kernels_unavailable_reason() is None, reason="a GPU with the kernels is present")
def test_the_fp8_table_on_cpu_checks_moe_gemm_and_reports_torch_refusing(cpu_stand_ins, tmp_path, capsys, monkeypatch):
    import json

    from moe_gemm.bench import fp8

    monkeypatch.setattr(fp8, "measure_fp8_ceiling", lambda: 1500.0)
    suite = {"models": {"tiny": {"experts": 4, "hidden": 160, "moe_intermediate": 48, "top_k": 2}}, "tokens": [5, 40]}
    argv = ["--fp8", "--models", "tiny", "--tokens", "5", "40", "--json", str(tmp_path / "out.json")]
    args = cli.parse_args(argv, suite)
    assert cli.mode_of(args) is fp8 and fp8.run(args, suite) == 0
    out = capsys.readouterr().out
    assert "dense FP8 8192^3 _scaled_mm 1500 TFLOP/s" in out and "PyTorch ops (the FP8 CUDA kernel is not built" in out
    result = json.loads((tmp_path / "out.json").read_text())
    rows = result["rows"]
    assert result["mode"] == "fp8" and [(r["tokens"], r["gemm"]) for r in rows] == [
        (5, "up"), (5, "down"), (40, "up"), (40, "down")
    ]
    for row in rows:  # moe_gemm's FP8 result checked and timed; torch's baseline has no CPU kernel: said, no failure
        # The bf16 output rounded: 1.7e-3 seen.
        assert row["check"] == "ok" and row["rel_error"] < 4e-3 and row["fp8_ms"] > 0 and row["x_bf16"] > 0
        assert "scaled_gmm_ms" not in row and "scaled_gmm_default_ms" not in row
        assert "torch._scaled_grouped_mm (use_fast_accum=True) refused" in row["problem"]
