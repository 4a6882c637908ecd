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
    "__main__": {"backward", "decode", "forward", "layer", "suite"},
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
