"""Helpers shared by the CPU tests and the GPU tests (``tests/test_cuda_*.py``).

pytest puts ``tests/`` on ``sys.path`` (the directory has no ``__init__.py``), so test modules import these with
``from helpers import make_problem, assert_close_to_reference, requires_cuda_op``. A GPU test module starts with
``pytestmark = [pytest.mark.gpu, requires_cuda_op]``: where the kernels cannot run, ``conftest.py`` deselects the
``gpu`` tests, and ``requires_cuda_op`` skips them with the reason when they are selected all the same.
"""

from dataclasses import dataclass

import pytest
import torch

import moe_gemm
from moe_gemm._ops import kernels_unavailable_reason
from moe_gemm.reference import grouped_mm_reference

KERNELS_UNAVAILABLE = kernels_unavailable_reason()
requires_cuda_op = pytest.mark.skipif(
    KERNELS_UNAVAILABLE is not None, reason=f"CUDA kernels unavailable: {KERNELS_UNAVAILABLE}"
)

# Relative Frobenius error allowed against the float64 reference. 16-bit outputs carry a rounding error of about
# 2**-9 relative per element; the pure-PyTorch path accumulates float32 in float32 and float64 in float64.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass
class Problem:
    """Inputs of one grouped GEMM."""

    x: torch.Tensor
    weight: torch.Tensor
    m_sizes: torch.Tensor
    weight_transposed: bool

    def run(self) -> torch.Tensor:
        return moe_gemm.grouped_forward(self.x, self.weight, self.m_sizes, weight_transposed=self.weight_transposed)

    def reference(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return grouped_mm_reference(self.x, self.weight, self.m_sizes, self.weight_transposed, dtype=dtype)


def make_problem(
    m_sizes: list[int],
    n: int,
    k: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    transposed: bool = False,
    *,
    num_rows: int | None = None,
    sizes_dtype: torch.dtype = torch.int64,
    requires_grad: bool = False,
) -> Problem:
    """Fresh random inputs: ``x [M, K]``, weight ``[E, N, K]`` (``[E, K, N]`` when ``transposed``), ``m_sizes``.

    ``M`` is ``num_rows``, by default the sum of the non-negative sizes. Values are drawn in float32 on the CPU from the
    global generator (so a seed gives the same problem on every device), scaled so outputs are about unit size.
    """
    num_rows = sum(max(size, 0) for size in m_sizes) if num_rows is None else num_rows
    weight_shape = (len(m_sizes), k, n) if transposed else (len(m_sizes), n, k)
    x = torch.randn(num_rows, k)
    weight = torch.randn(weight_shape) / k**0.5
    x, weight = (t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, weight))
    return Problem(x, weight, torch.tensor(m_sizes, dtype=sizes_dtype, device=device), transposed)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref||_F / ||ref||_F`` in float64 (inf when ``ref`` is zero and ``out`` is not)."""
    error = torch.linalg.vector_norm(out.double() - ref.double()).item()
    ref_norm = torch.linalg.vector_norm(ref.double()).item()
    return error / ref_norm if ref_norm > 0 else (0.0 if error == 0 else float("inf"))


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Assert equal shapes, no NaN/Inf in ``out``, and a relative Frobenius error within ``TOLERANCE[dtype]``.

    ``dtype`` (default ``out.dtype``) picks the tolerance. A zero reference demands an exactly zero output.
    """
    tolerance = TOLERANCE[dtype or out.dtype]
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output holds NaN or Inf"
    error = relative_error(out, ref)
    assert error <= tolerance, f"relative Frobenius error {error:.3e} > {tolerance:g}"
