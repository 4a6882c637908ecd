"""The Makefile's KERNELS_BUILDABLE snippet, which decides whether ``make setup`` installs the packages that only
compiling the CUDA kernels needs (nvidia-cutlass, ninja, pybind11): read from the Makefile text and run as make runs
it, ``python -c '<snippet>'``; exit status 0 means "buildable"."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"


def make_variable(name: str) -> str:
    """The value of ``name := ...`` in the Makefile as make expands it: backslash-newline continuations (and the next
    line's indentation) become one space, ``$$`` becomes ``$``."""
    match = re.search(rf"^{name} :=[ \t]*((?:.*\\\n)*.*)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match is not None, f"{name} not found in {MAKEFILE}"
    return re.sub(r"[ \t]*\\\n[ \t]*", " ", match.group(1)).replace("$$", "$")


def run_snippet(name: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "MOE_GEMM_SKIP_CUDA_BUILD"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", make_variable(name)], env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_kernels_buildable_is_false_under_a_cpu_torch():
    result = run_snippet("KERNELS_BUILDABLE")
    assert result.returncode != 0, result.stderr
    assert "Error" not in result.stderr, result.stderr


def test_kernels_buildable_is_false_with_the_skip_switch():
    result = run_snippet("KERNELS_BUILDABLE", MOE_GEMM_SKIP_CUDA_BUILD="1")
    assert result.returncode != 0, result.stderr
    assert "Error" not in result.stderr, result.stderr
