"""tests/conftest.py's deselection of the ``gpu`` tests where the kernels cannot run, in a pytest run of its own
(pytester): one summary line saying how many and why, no skip line per test; an ``-m`` expression naming ``gpu``
selects them, any other expression leaves the deselection on."""

from pathlib import Path

import pytest

from moe_gemm._ops import kernels_unavailable_reason

REASON = kernels_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is None, reason="the kernels run here: conftest.py deselects nothing")

TESTS = """
import pytest

def test_cpu():
    pass

@pytest.mark.gpu
def test_gpu_one():
    pass

@pytest.mark.gpu
def test_gpu_two():
    pass

@pytest.mark.slow
def test_slow():
    pass
"""


@pytest.fixture
def run(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini('[pytest]\naddopts = -rs\nmarkers =\n    gpu: needs the kernels\n    slow: slow\n')
    pytester.makepyfile(test_sample=TESTS)
    return pytester.runpytest_inprocess


def deselection_lines(result) -> list[str]:
    return [line for line in result.outlines if "gpu tests deselected" in line]


def test_gpu_tests_are_deselected_with_one_summary_line(run):
    result = run()
    result.assert_outcomes(passed=2, deselected=2)
    assert deselection_lines(result) == [f"2 gpu tests deselected: {REASON}"]
    assert not any("SKIPPED" in line for line in result.outlines)


@pytest.mark.parametrize("expression", ["gpu", "gpu or not gpu", "not slow and gpu"])
def test_a_mark_expression_naming_gpu_selects_them(run, expression):
    result = run("-m", expression)
    assert deselection_lines(result) == []
    assert result.parseoutcomes()["passed"] >= 2


@pytest.mark.parametrize("expression", ["not slow", "slow or not slow", "gpus"])
def test_another_mark_expression_leaves_the_deselection_on(run, expression):
    result = run("-m", expression)
    assert deselection_lines(result) == [f"2 gpu tests deselected: {REASON}"]
    assert not any("test_gpu" in line and "PASSED" in line for line in result.outlines)
