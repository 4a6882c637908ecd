"""third_party/cutlass_locator.py: the include directories that setup.py and CMake compile against."""

import importlib.util
import os
import subprocess
import sys

import pytest

LOCATOR_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party", "cutlass_locator.py"
)
spec = importlib.util.spec_from_file_location("cutlass_locator", LOCATOR_PATH)
cutlass_locator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cutlass_locator)

needs_cutlass = pytest.mark.skipif(
    importlib.util.find_spec("cutlass_library") is None, reason="nvidia-cutlass is not installed"
)


@needs_cutlass
def test_include_dirs_from_the_pypi_package(monkeypatch):
    monkeypatch.delenv("CUTLASS_DIR", raising=False)
    include, util_include = cutlass_locator.cutlass_include_dirs()
    assert os.path.isfile(os.path.join(include, "cutlass", "cutlass.h"))
    assert os.path.isdir(os.path.join(util_include, "cutlass", "util"))


@needs_cutlass
def test_cutlass_dir_overrides(monkeypatch):
    monkeypatch.delenv("CUTLASS_DIR", raising=False)
    root = os.path.dirname(cutlass_locator.cutlass_include_dirs()[0])
    monkeypatch.setenv("CUTLASS_DIR", root)
    assert cutlass_locator.cutlass_include_dirs() == [
        os.path.join(root, "include"),
        os.path.join(root, "tools", "util", "include"),
    ]


def test_cutlass_dir_without_headers_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_DIR", str(tmp_path))
    with pytest.raises(cutlass_locator.CutlassNotFoundError, match="CUTLASS_DIR=.*include/cutlass/cutlass.h"):
        cutlass_locator.cutlass_include_dirs()


@needs_cutlass
def test_command_line_prints_a_cmake_list():
    env = {key: value for key, value in os.environ.items() if key != "CUTLASS_DIR"}
    result = subprocess.run([sys.executable, LOCATOR_PATH], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip().split(";") == cutlass_locator.cutlass_include_dirs()
