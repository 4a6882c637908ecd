"""Registration of the ``moe_gemm`` operators with ``torch.library``.

Two ops, both returning new tensors:

- ``moe_gemm::grouped_mm(x, weight, m_sizes, weight_transposed=False)``: ``y = x_e @ W[e].T`` per expert (``@ W[e]``
  when ``weight_transposed``), ``[M, N]``.
- ``moe_gemm::grouped_mm_wgrad(x, grad_y, m_sizes, weight_transposed=False)``: ``grad_W[e] = grad_y_e.T @ x_e``
  (``x_e.T @ grad_y_e`` when ``weight_transposed``), shaped like the weight, in the dtype of ``x``.
- ``moe_gemm::grouped_mm_wgrad_accumulate_(main_grad, x, grad_y, m_sizes, weight_transposed=False)``: the same
  gradient added into a float32 buffer in place (a trainer's main-grad), nothing returned.

``moe_gemm._C`` (``csrc/``) defines the schemas with ``TORCH_LIBRARY`` and registers the CUDA kernels; when it is
absent, this module defines the same schemas. This module owns everything else: the pure-PyTorch kernels (CPU
always, CUDA while ``_C`` is absent), the fake (meta) kernels that let ``torch.compile`` trace the ops, and autograd.
Row ranges follow ``reference.py``.
"""

import importlib
import warnings

import torch

from moe_gemm.reference import grouped_mm_reference, grouped_mm_wgrad_reference

GROUPED_MM_SCHEMA = "(Tensor x, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor"
GROUPED_MM_WGRAD_SCHEMA = "(Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> Tensor"
GROUPED_MM_WGRAD_ACCUMULATE_SCHEMA = (
    "(Tensor(a!) main_grad, Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> ()"
)


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
    torch.library.define("moe_gemm::grouped_mm_wgrad_accumulate_", GROUPED_MM_WGRAD_ACCUMULATE_SCHEMA)


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


def _grouped_mm_wgrad_accumulate_eager(main_grad, x, grad_y, m_sizes, weight_transposed=False):
    """Pure-PyTorch ``main_grad += grad_W`` (float32 sums). Syncs on CUDA."""
    if main_grad.dtype != torch.float32:
        raise TypeError(f"main_grad: expected a torch.float32 buffer, got {main_grad.dtype}")
    expected = _grouped_mm_wgrad_fake(x, grad_y, m_sizes, weight_transposed).shape
    if main_grad.shape != expected:
        raise ValueError(f"main_grad: expected shape {tuple(expected)}, got {tuple(main_grad.shape)}")
    main_grad += grouped_mm_wgrad_reference(x, grad_y, m_sizes, weight_transposed, dtype=torch.float32)


# With _C loaded its kernels serve CUDA tensors; without it the pure-PyTorch ones do (syncing on the sizes).
_EAGER_DEVICES = ("cpu",) if cuda_available() else ("cpu", "cuda")
torch.library.register_kernel("moe_gemm::grouped_mm", _EAGER_DEVICES, _grouped_mm_eager)
torch.library.register_kernel("moe_gemm::grouped_mm_wgrad", _EAGER_DEVICES, _grouped_mm_wgrad_eager)
torch.library.register_kernel(
    "moe_gemm::grouped_mm_wgrad_accumulate_", _EAGER_DEVICES, _grouped_mm_wgrad_accumulate_eager
)


@torch.library.register_fake("moe_gemm::grouped_mm")
def _grouped_mm_fake(x, weight, m_sizes, weight_transposed=False):
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    return x.new_empty(x.shape[0], n)


@torch.library.register_fake("moe_gemm::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(x, grad_y, m_sizes, weight_transposed=False):
    num_experts, n, k = m_sizes.shape[0], grad_y.shape[1], x.shape[1]
    return x.new_empty((num_experts, k, n) if weight_transposed else (num_experts, n, k))


@torch.library.register_fake("moe_gemm::grouped_mm_wgrad_accumulate_")
def _grouped_mm_wgrad_accumulate_fake(main_grad, x, grad_y, m_sizes, weight_transposed=False):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, m_sizes, weight_transposed = inputs
    needs_grad_x, needs_grad_w = ctx.needs_input_grad[:2]
    # grad_x reads the weight, grad_W reads x: keep only what the requested gradients need.
    ctx.save_for_backward(x if needs_grad_w else None, weight if needs_grad_x else None, m_sizes)
    ctx.weight_transposed = weight_transposed


def call_below_autograd(op, *args):
    """``op(*args)`` straight to its CPU or CUDA kernel, skipping its Autograd kernel: for eager calls whose
    gradient is handled by the caller's own autograd.Function. The Autograd kernel that torch.library.register_autograd
    installs is Python (a generated Function and a redispatch) and costs more host time than the CUDA launch."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def grouped_mm_backward(grad_y, x, weight, m_sizes, weight_transposed, needs_grad_x, needs_grad_w):
    """``(grad_x, grad_W)`` of ``y = grouped_mm(x, weight, m_sizes, weight_transposed)``, None where not needed."""
    # The kernels read rows with unit inner stride; autograd may hand over an expanded or strided gradient.
    grad_y = grad_y.contiguous()
    # With create_graph the ops' own autograd must record the backward; otherwise skip it.
    run = (lambda op, *args: op(*args)) if torch.is_grad_enabled() else call_below_autograd
    grad_x = grad_w = None
    if needs_grad_x:
        # y = x @ W[e].T  =>  grad_x = grad_y @ W[e]: the same op reading the weight in the other layout.
        grad_x = run(torch.ops.moe_gemm.grouped_mm.default, grad_y, weight, m_sizes, not weight_transposed)
    if needs_grad_w:
        grad_w = run(torch.ops.moe_gemm.grouped_mm_wgrad.default, x, grad_y, m_sizes, weight_transposed)
    return grad_x, grad_w


def _backward(ctx, grad_y):
    x, weight, m_sizes = ctx.saved_tensors
    grad_x, grad_w = grouped_mm_backward(grad_y, x, weight, m_sizes, ctx.weight_transposed, *ctx.needs_input_grad[:2])
    return grad_x, grad_w, None, None


torch.library.register_autograd("moe_gemm::grouped_mm", _backward, setup_context=_setup_context)


# --- TEMPORARY SHIM (lead drops this at merge) ---
# The names of the one registry (owner B), mapped to today's logic so that the bench and the tests can use them.
def kernels_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the CUDA kernels cannot run here (no GPU, kernels not built), or None when they can."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible")
    if not cuda_available():
        reasons.append(f"the CUDA kernels are not built ({KERNELS_UNAVAILABLE_REASON})")
    return "; ".join(reasons) or None


def kernels_available(device: torch.device | None = None) -> bool:
    return kernels_unavailable_reason(device) is None


# --- END SHIM ---
