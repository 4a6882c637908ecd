"""Fixtures for every test (a fixed seed, an environment without ``MOE_GEMM_CHECK``) and the ``gpu`` marker.

A test marked ``gpu`` (a GPU test module carries ``pytestmark = [pytest.mark.gpu, requires_cuda_op]``) needs a CUDA
GPU on which the built kernels run. Where they cannot, the ``gpu`` tests are deselected at collection, with one line
in the summary saying how many and why, rather than a skip line each; an ``-m`` expression that names the marker
(``-m gpu``, ``-m "gpu and not slow"``) selects them all the same, and they then skip with the reason.
"""

import re

import pytest
import torch

from moe_gemm._ops import kernels_unavailable_reason

# tests/test_conftest.py runs this file's hooks in a pytest of its own.
pytest_plugins = ["pytester"]

_DESELECTED_GPU_TESTS = pytest.StashKey[tuple[int, str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernels_unavailable_reason()
    if reason is None or re.search(r"\bgpu\b", config.option.markexpr or ""):
        return
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_tests:
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
        config.hook.pytest_deselected(items=gpu_tests)
        config.stash[_DESELECTED_GPU_TESTS] = (len(gpu_tests), reason)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    deselected = config.stash.get(_DESELECTED_GPU_TESTS, None)
    if deselected is not None:
        count, reason = deselected
        terminalreporter.write_line(f"{count} gpu tests deselected: {reason}")


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    torch.manual_seed(0)
    # Tests that want the host-side size check set it themselves.
    monkeypatch.delenv("MOE_GEMM_CHECK", raising=False)
