"""Registration of the ``moe_gemm`` operators with ``torch.library``.

Two ops, both returning new tensors:

- ``moe_gemm::grouped_mm(x, weight, m_sizes, weight_transposed=False)``: ``y = x_e @ W[e].T`` per expert (``@ W[e]``
  when ``weight_transposed``), ``[M, N]``. Its CUDA kernel lives in ``moe_gemm._C`` (``csrc/``), which defines the
  schema with ``TORCH_LIBRARY``; when ``_C`` is absent, this module defines the same schema.
- ``moe_gemm::grouped_mm_wgrad(x, grad_y, m_sizes, weight_transposed=False)``: ``grad_W[e] = grad_y_e.T @ x_e``,
  shaped like the weight. Python only for now.

This module owns everything else: the pure-PyTorch kernels (CPU always, CUDA while ``_C`` is absent), the fake
(meta) kernels that let ``torch.compile`` trace the ops, and autograd. Row ranges follow ``reference.py``.
"""

import importlib
import warnings

import torch

from moe_gemm import _validation
from moe_gemm.reference import clamped_group_ends, grouped_mm_reference, grouped_mm_wgrad_reference

GROUPED_MM_SCHEMA = "(Tensor x, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor"
GROUPED_MM_WGRAD_SCHEMA = "(Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> Tensor"


def _load_extension():
    """Import ``moe_gemm._C`` (registers the CUDA op); return ``(module or None, why it is unavailable)``."""
    try:
        extension = importlib.import_module("moe_gemm._C")
    except ModuleNotFoundError as error:
        if error.name != "moe_gemm._C":
            raise
        if torch.version.cuda is None:
            return None, f"torch {torch.__version__} is a CPU build"
        return None, (
            "moe_gemm._C was not built; `pip install -v --no-build-isolation -e .` rebuilds it and prints why not "
            "(MOE_GEMM_SKIP_CUDA_BUILD=1, or no CUDA toolkit found)"
        )
    except ImportError as error:
        # Built but unloadable, e.g. against another torch or CUDA runtime: worth a warning, the fallback still works.
        warnings.warn(f"moe_gemm._C failed to load, using the pure-PyTorch path: {error}", RuntimeWarning)
        return None, f"moe_gemm._C failed to load: {error}"
    return extension, None


_C, KERNELS_UNAVAILABLE_REASON = _load_extension()


def cuda_available() -> bool:
    """True when the CUDA kernel of ``moe_gemm::grouped_mm`` is built and loaded."""
    return _C is not None


if _C is None:
    torch.library.define("moe_gemm::grouped_mm", GROUPED_MM_SCHEMA)
torch.library.define("moe_gemm::grouped_mm_wgrad", GROUPED_MM_WGRAD_SCHEMA)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_mm_eager(x, weight, m_sizes, weight_transposed=False):
    """Pure-PyTorch forward: the per-expert loop in float32 (float64 for float64), cast back. Syncs on CUDA."""
    out = grouped_mm_reference(x, weight, m_sizes, weight_transposed, dtype=_compute_dtype(x.dtype))
    return out.to(x.dtype)


def _grouped_mm_wgrad_eager(x, grad_y, m_sizes, weight_transposed=False):
    """Pure-PyTorch weight gradient, as ``_grouped_mm_eager``. Needs the sizes on the host, so it syncs on CUDA."""
    grad_w = grouped_mm_wgrad_reference(x, grad_y, m_sizes, weight_transposed, dtype=_compute_dtype(x.dtype))
    return grad_w.to(x.dtype)


def _wgrad_torch_grouped_mm(x, grad_y, m_sizes, weight_transposed=False):
    """Weight gradient with ``torch._grouped_mm`` grouped along the rows (one launch, no host sync). bfloat16 only."""
    ends = clamped_group_ends(m_sizes, x.shape[0])
    offs = ends.to(torch.int32)
    if weight_transposed:
        grad_w = torch._grouped_mm(x.t(), grad_y, offs=offs)  # [E, K, N]
    else:
        grad_w = torch._grouped_mm(grad_y.t(), x, offs=offs)  # [E, N, K]
    # A group with no rows is a sum over nothing; torch._grouped_mm does not promise to write it, so zero it here.
    empty = torch.diff(ends, prepend=ends.new_zeros(1)) == 0
    return grad_w.masked_fill_(empty[:, None, None], 0)


def _grouped_mm_wgrad_cuda(x, grad_y, m_sizes, weight_transposed=False):
    """CUDA weight gradient until ``csrc/`` has one: ``torch._grouped_mm`` where it applies, else the syncing loop."""
    readable = all(_validation.kernel_layout_problem(t) is None for t in (x, grad_y))
    if x.dtype == torch.bfloat16 and x.shape[0] > 0 and readable:
        return _wgrad_torch_grouped_mm(x, grad_y, m_sizes, weight_transposed)
    return _grouped_mm_wgrad_eager(x, grad_y, m_sizes, weight_transposed)


# With _C loaded its kernel serves CUDA tensors; without it the pure-PyTorch forward does (syncing on the sizes).
torch.library.register_kernel(
    "moe_gemm::grouped_mm", ("cpu",) if cuda_available() else ("cpu", "cuda"), _grouped_mm_eager
)
torch.library.register_kernel("moe_gemm::grouped_mm_wgrad", "cpu", _grouped_mm_wgrad_eager)
torch.library.register_kernel("moe_gemm::grouped_mm_wgrad", "cuda", _grouped_mm_wgrad_cuda)


@torch.library.register_fake("moe_gemm::grouped_mm")
def _grouped_mm_fake(x, weight, m_sizes, weight_transposed=False):
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    return x.new_empty(x.shape[0], n)


@torch.library.register_fake("moe_gemm::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(x, grad_y, m_sizes, weight_transposed=False):
    num_experts, n, k = m_sizes.shape[0], grad_y.shape[1], x.shape[1]
    return x.new_empty((num_experts, k, n) if weight_transposed else (num_experts, n, k))


def _setup_context(ctx, inputs, output):
    x, weight, m_sizes, weight_transposed = inputs
    needs_grad_x, needs_grad_w = ctx.needs_input_grad[:2]
    # grad_x reads the weight, grad_W reads x: keep only what the requested gradients need.
    ctx.save_for_backward(x if needs_grad_w else None, weight if needs_grad_x else None, m_sizes)
    ctx.weight_transposed = weight_transposed


def _backward(ctx, grad_y):
    x, weight, m_sizes = ctx.saved_tensors
    # The kernels read rows with unit inner stride; autograd may hand over an expanded or strided gradient.
    grad_y = grad_y.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        # y = x @ W[e].T  =>  grad_x = grad_y @ W[e]: the same op reading the weight in the other layout.
        grad_x = torch.ops.moe_gemm.grouped_mm(grad_y, weight, m_sizes, not ctx.weight_transposed)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.moe_gemm.grouped_mm_wgrad(x, grad_y, m_sizes, ctx.weight_transposed)
    return grad_x, grad_w, None, None


torch.library.register_autograd("moe_gemm::grouped_mm", _backward, setup_context=_setup_context)
