"""The registry of the ``moe_gemm`` operators: every schema, declared once here, and all that is Python about them.

The ops (``torch.ops.moe_gemm.<name>``):

- ``grouped_mm(x, weight, m_sizes, weight_transposed=False)``: ``y = x_e @ W[e].T`` per expert (``@ W[e]`` when
  ``weight_transposed``), ``[M, N]``, rows past the last expert zero.
- ``grouped_mm_gather(x, gather_rows, weight, m_sizes, weight_transposed=False)``: ``grouped_mm`` of
  ``x.index_select(0, gather_rows)`` without the copy (``y[r] = x[gather_rows[r]] @ W[e].T`` for the rows ``r`` of
  expert ``e``), ``[gather_rows.numel(), N]``; the MoE layer's up-projection of ``hidden[token_of_row]``. No autograd:
  the layer calls it below its own. The CUDA kernel does not check the indices (a pass over them, or a sync, would
  cost what the gather saves): one outside ``[0, x.shape[0])`` is the caller's bug, as with ``index_select``'s device
  assert; the kernel then reads a row of zeros, never memory outside ``x``. The PyTorch path raises (IndexError).
- ``grouped_mm_gated(x, gather_rows, weight, m_sizes, weight_transposed, act, concatenated, write_pre_activation)``:
  the MoE layer's up-projection with its gated activation, ``(activated [M, I], gate_up [M, 2I] or None)``:
  ``gate_up = grouped_mm(x, ...)`` (``grouped_mm_gather`` when ``gather_rows`` is given) and ``activated =
  act(gate) * up`` (``activation.gated_activation``, gate and up concatenated halves or interleaved columns of
  gate_up and of the weight's ``2I`` rows), ``gate_up`` returned only with ``write_pre_activation`` (the backward
  keeps it). The CUDA kernel computes the activation in the GEMM's epilogue from the 16-bit gate_up, rounding as the
  separate ``gated_activation`` kernel does (bitwise the same); where no gated tile applies (the plan is not a
  128x256 tile, e.g. at 128 rows per expert or fewer; concatenated halves with I not a multiple of 128) it runs the
  GEMM, then that kernel. No autograd.
- ``grouped_mm_wgrad(x, grad_y, m_sizes, weight_transposed=False)``: ``grad_W[e] = grad_y_e.T @ x_e``
  (``x_e.T @ grad_y_e`` when ``weight_transposed``), shaped like the weight, in the dtype of ``x``.
- ``grouped_mm_wgrad_gather(x, grad_y, m_sizes, weight_transposed=False, x_rows=None, grad_y_rows=None)``:
  ``grouped_mm_wgrad`` of ``x.index_select(0, x_rows)`` (where given) and ``grad_y.index_select(0, grad_y_rows)``
  (where given) without the copies; the MoE layer's weight gradients of ``hidden[token_of_row]`` (gate/up) and
  ``grad_out[token_of_row]`` (down). ``M`` is then the number of indices, rows past ``sum(m_sizes)`` contribute
  nothing and their indices are never read. No autograd, as ``grouped_mm_gather``; the indices are not checked by the
  CUDA kernel either (one outside the source reads a row of zeros). The CUDA kernel gathers one of the two operands
  per call (both given: RuntimeError) and writes the gradient in the input dtype only (accumulating into a float32
  main-grad does not gather).
- ``grouped_mm_wgrad_accumulate_(main_grad, x, grad_y, m_sizes, weight_transposed=False)``: the same gradient added
  into a float32 buffer in place (a trainer's main-grad), nothing returned.
- ``grouped_mm_fp8(x, x_scale, weight, weight_scale, m_sizes, weight_transposed=False, out_dtype=None)``:
  ``grouped_mm`` of float8_e4m3fn ``x`` and ``weight`` times their float32 scales (the layouts are
  ``moe_gemm.grouped_forward_fp8``'s), ``[M, N]`` in ``out_dtype`` (None: bfloat16), rows past the last expert zero.
- ``quantize_fp8(x, group=128)``: ``(x_fp8, x_scale)``, ``x`` in float8_e4m3fn with one float32 scale per row and 128
  columns (``group`` None: per row). On a GPU whose kernels run, both have CUDA kernels (``_grouped_mm_fp8_kernel``
  where its layouts apply, ``_quantize_fp8_kernel``), else PyTorch ops; no backward: one raises.
- ``_quantize_fp8_weight_kernel(weight)``: ``moe_gemm.quantize_fp8_weight``'s ``(values, scale)`` (128 x 128 blocks)
  of a weight stored as it is or read through its transpose's view, CUDA only, called where
  ``quantize_fp8_weight_kernel_applies`` says so (its PyTorch ops compute the same elsewhere); no backward.
- ``route(router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias,
  routed_scaling_factor)``: ``moe_gemm.route``'s ``(weights float32 [T, k], ids int64 [T, k])``.
- ``dispatch_pairs``, ``gated_activation``, ``gated_activation_backward`` and ``combine_rows``: the MoE layer's small
  kernels, CUDA only, called through ``dispatch_kernel``, ``gated_activation_kernel``,
  ``gated_activation_backward_kernel`` and ``combine_kernel`` where their ``*_applies`` say so (the layer's PyTorch
  ops compute the same elsewhere).

``moe_gemm._C`` (``csrc/*_torch.cpp``) only implements: its ``TORCH_LIBRARY_IMPL(moe_gemm, CUDA, m)`` blocks register
the CUDA kernels of these ops, and no C++ defines a schema. The extension is imported *before* the schemas are
defined, on purpose. The dispatcher accepts a kernel for an op that has no schema yet and checks the kernel's C++
signature against the schema when the schema arrives; in this order a mismatch raises a RuntimeError from
``Library.define`` below. In the other order the check runs in the extension's static initialisers while it is being
loaded, and a mismatch aborts the process (``terminate called after throwing an instance of 'c10::Error'``).

This module owns the rest: the PyTorch kernels (CPU always; CUDA too while ``_C`` is absent), the fake kernels that
let ``torch.compile`` trace the ops, autograd, and ``kernels_available(device)``, the one test of whether the CUDA
kernels can run on a device. Row ranges follow ``reference.py``.
"""

import importlib
import os
import sys
import warnings

import torch

from moe_gemm import _validation
from moe_gemm.activation import check_activation_name, gated_activation
from moe_gemm.reference import clamped_group_ends, expert_row_ranges, grouped_mm_wgrad_reference


def _load_extension():
    """Import ``moe_gemm._C`` (registers the CUDA kernels); return ``(module or None, why it is unavailable)``."""
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


_C, _EXTENSION_UNAVAILABLE_REASON = _load_extension()

SCHEMAS = {
    "grouped_mm": "(Tensor x, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor",
    "grouped_mm_gather": (
        "(Tensor x, Tensor gather_rows, Tensor weight, Tensor m_sizes, bool weight_transposed=False) -> Tensor"
    ),
    "grouped_mm_gated": (
        "(Tensor x, Tensor? gather_rows, Tensor weight, Tensor m_sizes, bool weight_transposed, str act, "
        "bool concatenated, bool write_pre_activation) -> (Tensor activated, Tensor? gate_up)"
    ),
    "grouped_mm_wgrad": "(Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> Tensor",
    "grouped_mm_wgrad_gather": (
        "(Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False, Tensor? x_rows=None, "
        "Tensor? grad_y_rows=None) -> Tensor"
    ),
    "grouped_mm_wgrad_accumulate_": (
        "(Tensor(a!) main_grad, Tensor x, Tensor grad_y, Tensor m_sizes, bool weight_transposed=False) -> ()"
    ),
    "grouped_mm_fp8": (
        "(Tensor x, Tensor x_scale, Tensor weight, Tensor weight_scale, Tensor m_sizes, bool weight_transposed=False, "
        "ScalarType? out_dtype=None) -> Tensor"
    ),
    "quantize_fp8": "(Tensor x, int? group=128) -> (Tensor x_fp8, Tensor x_scale)",
    # quantize_fp8's CUDA kernel (csrc/moe_layer_kernels.h, QuantizeFp8Params), called by its router only.
    "_quantize_fp8_kernel": "(Tensor x, int? group=128) -> (Tensor x_fp8, Tensor x_scale)",
    # moe_gemm.layer_fp8.quantize_fp8_weight's CUDA kernel (csrc/moe_layer_kernels.h, QuantizeFp8WeightParams), called
    # where quantize_fp8_weight_kernel_applies.
    "_quantize_fp8_weight_kernel": "(Tensor weight) -> (Tensor values, Tensor scale)",
    # The CUDA kernel of grouped_mm_fp8's rowwise and blockwise cases, called by its router only (grouped_mm_fp8_cuda).
    "_grouped_mm_fp8_kernel": "(Tensor x, Tensor x_scale, Tensor weight, Tensor w_scale, Tensor m_sizes) -> Tensor",
    "route": (
        "(Tensor router_logits, int top_k, str scoring, bool renormalize, int? n_group, int? topk_group, "
        "Tensor? e_score_correction_bias, float routed_scaling_factor) -> (Tensor weights, Tensor ids)"
    ),
    "dispatch_pairs": (
        "(Tensor ids, int num_experts) -> (Tensor m_sizes, Tensor expert_of_row, Tensor pair_of_row, "
        "Tensor token_of_row, Tensor row_of_pair)"
    ),
    "gated_activation": "(Tensor gate_up, str act, bool concatenated) -> Tensor",
    "gated_activation_backward": (
        "(Tensor grad_activated, Tensor gate_up, Tensor row_weights, str act, bool concatenated) -> "
        "(Tensor grad_gate_up, Tensor weighted_activated, Tensor grad_row_weights)"
    ),
    "combine_rows": "(Tensor y_sorted, Tensor row_of_pair, Tensor weights, Tensor ids, int num_experts) -> Tensor",
    # Expert parallelism's pull over symmetric memory (csrc/moe_layer_kernels.h, PullRowsParams); CUDA only.
    "pull_rows_": (
        "(Tensor(a!) out, int peer_ptrs, int region_offset, Tensor src_start, Tensor dst_start, Tensor counts, "
        "int max_rows) -> ()"
    ),
}

# Registrations live as long as this object.
_LIBRARY = torch.library.Library("moe_gemm", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)


# ----------------------------------------------------------------------------------------------------------------------
# Whether the CUDA kernels can run on a device.

# The kernels are compiled for sm_90a only (TMA, WGMMA): another architecture cannot run them.
KERNEL_CAPABILITY = (9, 0)
# Device index -> why the kernels cannot run there (None: they can). Filled on first use of each device, never at
# import: touching torch.cuda at import would initialise CUDA in the parent of a fork.
_DEVICE_PROBLEMS: dict[int, str | None] = {}
_fallback_warned = False


def _device_capability(index: int) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (a function of its own so that tests can replace it)."""
    return torch.cuda.get_device_capability(index)


def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_problem(index: int) -> str | None:
    try:
        return _DEVICE_PROBLEMS[index]
    except KeyError:
        pass
    capability = tuple(_device_capability(index))
    problem = None
    if capability != KERNEL_CAPABILITY:
        problem = (
            f"cuda:{index} is {_device_name(index)}, compute capability {capability[0]}.{capability[1]}, and the "
            f"kernels are built for sm_90a (compute capability 9.0: H100, H200, GH200) only"
        )
    _DEVICE_PROBLEMS[index] = problem
    return problem


def kernels_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the CUDA kernels of ``moe_gemm._C`` cannot run on ``device``, or None when they can.

    They can where the extension is loaded and the device is a CUDA device of compute capability 9.0 (checked once
    per device). ``device`` None: the current CUDA device, or why there is none.
    """
    if device is None:
        if not torch.cuda.is_available():
            unbuilt = "" if _C is not None else f"; the CUDA kernels are not built ({_EXTENSION_UNAVAILABLE_REASON})"
            return "no CUDA GPU is visible" + unbuilt
        index = torch.cuda.current_device()
    else:
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if device.type != "cuda":
            return f"the kernels run on CUDA devices, got {device.type}"
        index = device.index if device.index is not None else torch.cuda.current_device()
    if _C is None:
        return f"the CUDA kernels are not built ({_EXTENSION_UNAVAILABLE_REASON})"
    return _device_problem(index)


def kernels_available(device: torch.device | str | None = None) -> bool:
    """True when the CUDA kernels are loaded and can run on ``device`` (None: the current CUDA device)."""
    return kernels_unavailable_reason(device) is None


def use_kernels(device: torch.device) -> bool:
    """``kernels_available(device)`` for a tensor's device, as the entry points that fall back to PyTorch ops ask it.

    Where the extension is built but the GPU is not sm_90, the first such call in the process warns, naming the GPU
    and its compute capability: the calls still work, on the PyTorch path, but much slower.
    """
    if device.type != "cuda":
        return False
    problem = kernels_unavailable_reason(device)
    if problem is None:
        return True
    global _fallback_warned
    if _C is not None and not _fallback_warned:
        _fallback_warned = True
        message = f"moe_gemm: {problem}; using PyTorch ops instead"
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())
    return False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn`` called from this module's caller that names the first frame outside the
    ``moe_gemm`` package (and outside torch, whose dispatcher and autograd sit between the package's own frames): the
    user's line, however deep inside the package the warning was raised (route called from the MoE layer, the
    experts' GEMMs called from experts_forward)."""
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith((_PACKAGE_DIR, torch_dir)):
            return level
        frame, level = frame.f_back, level + 1
    return 1


# ----------------------------------------------------------------------------------------------------------------------
# The grouped GEMMs on the PyTorch path.


def _torch_grouped_mm_applies(a: torch.Tensor, b: torch.Tensor, out_columns: int) -> bool:
    """Whether ``torch._grouped_mm`` takes the row-major ``a [M, *]`` and ``b`` (or their transposes) on a CUDA device:
    bfloat16 only, unit inner strides, 16-byte aligned rows and pointers (the rules of this package's kernels too),
    and an output whose rows are 16 bytes apart (otherwise torch pads them)."""
    return (
        a.is_cuda
        # A private function, new in torch 2.8; setup.py allows older torch.
        and hasattr(torch, "_grouped_mm")
        and a.dtype == torch.bfloat16
        and 0 < a.shape[0] < 2**31
        and out_columns % 8 == 0
        and all(_validation.kernel_layout_problem(t) is None for t in (a, b))
    )


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` in place; through a recorded copy while autograd records (``out=`` is not differentiable)."""
    if a.dtype == torch.float16 and a.device.type == "cpu":
        # CPUs without float16 matrix instructions (most of them) multiply float16 matrices more slowly than float32
        # ones, the weight gradient's transposed operand most of all; the float32 products round the same or better.
        out.copy_(a.float() @ b.float())
    elif torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        out.copy_(a @ b)
    else:
        torch.mm(a, b, out=out)


def grouped_mm_torch(x, weight, m_sizes, weight_transposed=False):
    """``moe_gemm::grouped_mm`` in PyTorch ops: the op's CPU kernel, and its CUDA kernel where ``_C`` cannot run.

    Each expert's rows are one ``torch.mm`` in the dtype of ``x``, which accumulates 16-bit inputs in float32 (float16
    on CPU multiplies in float32). On CUDA, ``torch._grouped_mm`` does it in one launch where it applies, with no host
    sync; otherwise the loop reads the sizes on the host.
    """
    weight, weight_transposed = _validation.validate(x, weight, m_sizes, weight_transposed, cuda_kernel=False)
    num_rows, n = x.shape[0], weight.shape[2] if weight_transposed else weight.shape[1]
    # Weight as the [E, K, N] right-hand side of x_e @ B.
    rhs = weight if weight_transposed else weight.transpose(-1, -2)
    if weight.shape[0] > 0 and _torch_grouped_mm_applies(x, weight, n):
        ends = clamped_group_ends(m_sizes, num_rows)
        out = torch._grouped_mm(x, rhs, offs=ends.to(torch.int32))
        # torch._grouped_mm leaves the rows past the last group unwritten; the ends never decrease, so the last is
        # the largest.
        past_the_end = torch.arange(num_rows, device=x.device) >= ends.max()
        return out.masked_fill_(past_the_end.unsqueeze(1), 0)
    out = x.new_empty(num_rows, n)
    end = 0
    for expert, start, end in expert_row_ranges(m_sizes, num_rows):
        _mm_into(out[start:end], x[start:end], rhs[expert])
    out[end:].zero_()
    return out


def grouped_mm_gather_torch(x, gather_rows, weight, m_sizes, weight_transposed=False):
    """``moe_gemm::grouped_mm_gather`` in PyTorch ops: ``grouped_mm_torch`` of ``x.index_select(0, gather_rows)``
    (which raises for an index outside ``[0, x.shape[0])``)."""
    _validation.check_gather_rows(x, gather_rows)
    return grouped_mm_torch(x.index_select(0, gather_rows), weight, m_sizes, weight_transposed)


def grouped_mm_gated_torch(
    x, gather_rows, weight, m_sizes, weight_transposed, act, concatenated, write_pre_activation
):
    """``moe_gemm::grouped_mm_gated`` in PyTorch ops: ``grouped_mm_torch`` (of the gathered rows with
    ``gather_rows``), then ``activation.gated_activation``."""
    check_activation_name(act)
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    if weight.dim() == 3 and n % 2 != 0:
        raise ValueError(f"the weight's gate and up rows must be 2I, an even number, got {n}")
    if gather_rows is None:
        gate_up = grouped_mm_torch(x, weight, m_sizes, weight_transposed)
    else:
        gate_up = grouped_mm_gather_torch(x, gather_rows, weight, m_sizes, weight_transposed)
    activated = gated_activation(gate_up, act, concatenated)
    return activated, (gate_up if write_pre_activation else None)


def _empty_groups(m_sizes: torch.Tensor, ends: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[E]`` bool: the experts that own no row (``ends`` from ``clamped_group_ends(m_sizes, num_rows)``), on the
    device, without a sync."""
    sizes = m_sizes.to(torch.int64).clamp_min(0)
    starts = (sizes.cumsum(0) - sizes).clamp_max(num_rows)
    return ends == starts


def grouped_mm_wgrad_torch(x, grad_y, m_sizes, weight_transposed=False):
    """``moe_gemm::grouped_mm_wgrad`` in PyTorch ops, as ``grouped_mm_torch``: one ``torch.mm`` per expert in the
    dtype of ``x`` (float32 accumulation inside), or ``torch._grouped_mm`` on CUDA where it applies."""
    _validation.check_wgrad_inputs(x, grad_y, m_sizes, weight_transposed, None, cuda_kernel=False)
    # grad_W[e] = a_e @ b_e over the expert's rows: [N, rows] @ [rows, K], or [K, rows] @ [rows, N] when transposed.
    a, b = (x, grad_y) if weight_transposed else (grad_y, x)
    num_experts = m_sizes.shape[0]
    if num_experts > 0 and _torch_grouped_mm_applies(a, b, b.shape[1]):
        ends = clamped_group_ends(m_sizes, x.shape[0])
        grad_w = torch._grouped_mm(a.t(), b, offs=ends.to(torch.int32))
        # Experts without rows must get exact zeros, whatever torch._grouped_mm writes for an empty group.
        return grad_w.masked_fill_(_empty_groups(m_sizes, ends, x.shape[0]).view(num_experts, 1, 1), 0)
    grad_w = x.new_zeros(num_experts, a.shape[1], b.shape[1])
    for expert, start, end in expert_row_ranges(m_sizes, x.shape[0]):
        _mm_into(grad_w[expert], a[start:end].t(), b[start:end])
    return grad_w


def grouped_mm_wgrad_gather_torch(x, grad_y, m_sizes, weight_transposed=False, x_rows=None, grad_y_rows=None):
    """``moe_gemm::grouped_mm_wgrad_gather`` in PyTorch ops: ``grouped_mm_wgrad_torch`` of ``x.index_select(0, x_rows)``
    and ``grad_y.index_select(0, grad_y_rows)``, each where given (``index_select`` raises for an index outside the
    source). Both may be given here, unlike on the CUDA kernel."""
    if x_rows is not None:
        _validation.check_gather_rows(x, x_rows, "x_rows", "x")
        x = x.index_select(0, x_rows)
    if grad_y_rows is not None:
        _validation.check_gather_rows(grad_y, grad_y_rows, "grad_y_rows", "grad_y")
        grad_y = grad_y.index_select(0, grad_y_rows)
    return grouped_mm_wgrad_torch(x, grad_y, m_sizes, weight_transposed)


# Device -> whether torch._grouped_mm writes float32 products of bfloat16 inputs (out_dtype=torch.float32) there.
_GROUPED_MM_FLOAT32_OUTPUT: dict[torch.device, bool] = {}


def _grouped_mm_float32_output(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm(a, b, offs=..., out_dtype=torch.float32)`` takes bfloat16 ``a`` and ``b`` on
    ``device``; asked once per device with an 8 x 8 call. Torch 2.13 refuses on every device ("Grouped gemm output
    dtype must match `mat_a` dtype", a host-side check: the call neither launches nor syncs); a later torch may not."""
    try:
        return _GROUPED_MM_FLOAT32_OUTPUT[device]
    except KeyError:
        pass
    if torch._guards.detect_fake_mode() is not None:
        # Fake tensors (the tests' fake CUDA device) have no kernel to refuse the dtype: no answer to keep.
        return False
    a = torch.zeros(8, 8, device=device, dtype=torch.bfloat16)
    try:
        torch._grouped_mm(a.t(), a, offs=torch.full((1,), 8, device=device, dtype=torch.int32), out_dtype=torch.float32)
        supported = True
    except RuntimeError:
        supported = False
    _GROUPED_MM_FLOAT32_OUTPUT[device] = supported
    return supported


def grouped_mm_wgrad_accumulate_torch(main_grad, x, grad_y, m_sizes, weight_transposed=False):
    """``main_grad += grad_W`` in PyTorch ops, with float32 products: one ``torch._grouped_mm`` writing float32 on
    CUDA where it applies and the installed torch supports that output dtype (no host sync), otherwise each expert's
    rows upcast to float32 (reads the sizes on the host)."""
    _validation.check_wgrad_inputs(x, grad_y, m_sizes, weight_transposed, main_grad, cuda_kernel=False)
    a, b = (x, grad_y) if weight_transposed else (grad_y, x)
    num_experts = m_sizes.shape[0]
    if (
        num_experts > 0
        and _torch_grouped_mm_applies(a, b, b.shape[1])
        and _grouped_mm_float32_output(a.device)
    ):
        ends = clamped_group_ends(m_sizes, x.shape[0])
        grad_w = torch._grouped_mm(a.t(), b, offs=ends.to(torch.int32), out_dtype=torch.float32)
        # Experts without rows add exactly nothing, whatever torch._grouped_mm writes for an empty group.
        main_grad += grad_w.masked_fill_(_empty_groups(m_sizes, ends, x.shape[0]).view(num_experts, 1, 1), 0)
        return
    main_grad += grouped_mm_wgrad_reference(x, grad_y, m_sizes, weight_transposed, dtype=torch.float32)



# With _C loaded, its kernels serve CUDA tensors; without it the PyTorch ones do.
_TORCH_PATH_DEVICES = ("cpu",) if _C is not None else ("cpu", "cuda")
torch.library.register_kernel("moe_gemm::grouped_mm", _TORCH_PATH_DEVICES, grouped_mm_torch)
torch.library.register_kernel("moe_gemm::grouped_mm_gather", _TORCH_PATH_DEVICES, grouped_mm_gather_torch)
torch.library.register_kernel("moe_gemm::grouped_mm_gated", _TORCH_PATH_DEVICES, grouped_mm_gated_torch)
torch.library.register_kernel("moe_gemm::grouped_mm_wgrad", _TORCH_PATH_DEVICES, grouped_mm_wgrad_torch)
torch.library.register_kernel("moe_gemm::grouped_mm_wgrad_gather", _TORCH_PATH_DEVICES, grouped_mm_wgrad_gather_torch)
torch.library.register_kernel(
    "moe_gemm::grouped_mm_wgrad_accumulate_", _TORCH_PATH_DEVICES, grouped_mm_wgrad_accumulate_torch
)


@torch.library.register_fake("moe_gemm::grouped_mm")
def _grouped_mm_fake(x, weight, m_sizes, weight_transposed=False):
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    return x.new_empty(x.shape[0], n)


@torch.library.register_fake("moe_gemm::grouped_mm_gather")
def _grouped_mm_gather_fake(x, gather_rows, weight, m_sizes, weight_transposed=False):
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    return x.new_empty(gather_rows.shape[0], n)


@torch.library.register_fake("moe_gemm::grouped_mm_gated")
def _grouped_mm_gated_fake(x, gather_rows, weight, m_sizes, weight_transposed, act, concatenated, write_pre_activation):
    rows = x.shape[0] if gather_rows is None else gather_rows.shape[0]
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    return x.new_empty(rows, n // 2), (x.new_empty(rows, n) if write_pre_activation else None)


@torch.library.register_fake("moe_gemm::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(x, grad_y, m_sizes, weight_transposed=False):
    num_experts, n, k = m_sizes.shape[0], grad_y.shape[1], x.shape[1]
    return x.new_empty((num_experts, k, n) if weight_transposed else (num_experts, n, k))


@torch.library.register_fake("moe_gemm::grouped_mm_wgrad_gather")
def _grouped_mm_wgrad_gather_fake(x, grad_y, m_sizes, weight_transposed=False, x_rows=None, grad_y_rows=None):
    return _grouped_mm_wgrad_fake(x, grad_y, m_sizes, weight_transposed)


@torch.library.register_fake("moe_gemm::grouped_mm_wgrad_accumulate_")
def _grouped_mm_wgrad_accumulate_fake(main_grad, x, grad_y, m_sizes, weight_transposed=False):
    return None


# As choose_tile_config (csrc/moe_gemm.cpp): from 32 rows per expert on, the plan runs 128-row tiles, which have
# gathering kernels; below, the swapped decode tiles, which do not, and the copy of so few rows costs little.
# Where the layer's up-projection reads hidden[token_of_row] in place (grouped_mm_gather) rather than from a copy.
# The gathering kernel copies each token tile once per n-block, the copy once in all, so the gather loses at many
# n-blocks: on the H200, 2048 rows per expert, it ran 1.54x copy + grouped_mm at N = 512, 1.24x at N = 1024, 1.14x
# at N = 1536 and 1.01x at N = 4096 (16 n-blocks, the widest measured); 0.81-0.91x at 128 rows per expert
# (BENCHMARKS.md, "Gathered rows").
GATHER_MIN_ROWS_PER_EXPERT = 1024
GATHER_MAX_COLUMNS = 4096


def gather_in_gemm(num_rows: int, num_experts: int, num_columns: int) -> bool:
    """Whether the layer's up-projection (``num_columns`` outputs per row) reads its token rows through
    ``grouped_mm_gather`` rather than from a copy: e.g. 32768 tokens of top-8 over 128 experts (2048 rows each) into
    1024 or 4096 columns gather; into 5760 columns, or 2048 tokens (128 rows each), they copy."""
    rows_per_expert = num_rows // max(1, min(num_experts, num_rows))
    return rows_per_expert >= GATHER_MIN_ROWS_PER_EXPERT and num_columns <= GATHER_MAX_COLUMNS


# Where the layer's weight gradients read hidden[token_of_row] or grad_out[token_of_row] in place
# (grouped_mm_wgrad_gather) rather than from a copy. The kernel copies the gathered rows once per output tile that
# reads them: the other operand's width over its tile's (128 when the gathered rows are R, 256 when they are L), where
# the copy is written once. On the H200 (2048 rows per expert) it ran 1.52x index_select + grouped_mm_wgrad at 2
# such reads as L, 1.49x at 4 as R, 1.23x / 1.20x at 4 as L / 8 as R, 1.07-1.13x at 6-16 and 1.00x at 32, the most
# measured (BENCHMARKS.md, "The backward's gathered rows").
WGRAD_GATHER_MIN_ROWS_PER_EXPERT = 1024
WGRAD_GATHER_MAX_READS = 32


def gather_in_wgrad(num_rows: int, num_experts: int, other_columns: int, gathered_is_l: bool) -> bool:
    """Whether the layer's backward computes a weight gradient from gathered rows read in place
    (``grouped_mm_wgrad_gather``) rather than from a copy; ``other_columns`` is the other operand's width. E.g. 32768
    tokens of top-16 over 256 experts (2048 rows each) against 512 columns (2 tiles of 256 as L, 4 of 128 as R), or
    of top-4 over 64 experts against 4096 columns (32 tiles as R): gather; against 8192 columns as R, or at 128 rows
    per expert: copy."""
    rows_per_expert = num_rows // max(1, min(num_experts, num_rows))
    reads = -(-other_columns // (256 if gathered_is_l else 128))
    return rows_per_expert >= WGRAD_GATHER_MIN_ROWS_PER_EXPERT and reads <= WGRAD_GATHER_MAX_READS


def call_below_autograd(op, *args):
    """``op(*args)`` straight to its CPU or CUDA kernel, skipping its Autograd kernel: for eager calls whose
    gradient is handled by the caller's own autograd.Function. The Autograd kernel that torch.library.register_autograd
    installs is Python (a generated Function and a redispatch) and costs more host time than the CUDA launch."""
    if torch.compiler.is_compiling():
        # Traced inside an autograd.Function (grad mode off): the plain call records nothing either, and the guard
        # is not traceable.
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def gemm_op(name: str, device: torch.device):
    """What computes ``moe_gemm::<name>`` (``grouped_mm``, ``grouped_mm_gather``, ``grouped_mm_wgrad``,
    ``grouped_mm_wgrad_gather``, ``grouped_mm_wgrad_accumulate_``, ``grouped_mm_fp8`` or ``quantize_fp8``) for tensors
    on ``device``: the op, or its PyTorch path on a CUDA device where the extension is loaded but cannot run (the op's
    CUDA kernel there would refuse it).
    ``grouped_mm_wgrad_gather`` is called with its row indices as keywords or positions after ``weight_transposed``:
    ``gemm_op("grouped_mm_wgrad_gather", device)(x, grad_y, m_sizes, weight_transposed, x_rows, grad_y_rows)``."""
    if device.type == "cuda" and _C is not None and not kernels_available(device):
        # Looked up by name at each call (grouped_mm -> grouped_mm_torch, ...), as the module's attribute.
        return globals()[name.rstrip("_") + "_torch"]
    return getattr(torch.ops.moe_gemm, name).default


def grouped_mm_backward(grad_y, x, weight, m_sizes, weight_transposed, needs_grad_x, needs_grad_w):
    """``(grad_x, grad_W)`` of ``y = grouped_mm(x, weight, m_sizes, weight_transposed)``, None where not needed."""
    # The kernels read rows with unit inner stride; autograd may hand over an expanded or strided gradient.
    grad_y = grad_y.contiguous()
    # With create_graph the ops' own autograd must record the backward; otherwise skip it.
    run = (lambda op, *args: op(*args)) if torch.is_grad_enabled() else call_below_autograd
    grad_x = grad_w = None
    if needs_grad_x:
        # y = x @ W[e].T  =>  grad_x = grad_y @ W[e]: the same op reading the weight in the other layout.
        grad_x = run(gemm_op("grouped_mm", grad_y.device), grad_y, weight, m_sizes, not weight_transposed)
    if needs_grad_w:
        grad_w = run(gemm_op("grouped_mm_wgrad", grad_y.device), x, grad_y, m_sizes, weight_transposed)
    return grad_x, grad_w


def grouped_mm_setup_context(ctx, inputs, output):
    x, weight, m_sizes, weight_transposed = inputs
    needs_grad_x, needs_grad_w = ctx.needs_input_grad[:2]
    # grad_x reads the weight, grad_W reads x: keep only what the requested gradients need.
    ctx.save_for_backward(x if needs_grad_w else None, weight if needs_grad_x else None, m_sizes)
    ctx.weight_transposed = weight_transposed


def grouped_mm_autograd_backward(ctx, grad_y):
    x, weight, m_sizes = ctx.saved_tensors
    grad_x, grad_w = grouped_mm_backward(grad_y, x, weight, m_sizes, ctx.weight_transposed, *ctx.needs_input_grad[:2])
    return grad_x, grad_w, None, None


torch.library.register_autograd(
    "moe_gemm::grouped_mm", grouped_mm_autograd_backward, setup_context=grouped_mm_setup_context
)


# ----------------------------------------------------------------------------------------------------------------------
# FP8: the grouped GEMM of float8_e4m3fn operands with float32 scales, and the quantization that makes them. PyTorch
# kernels only, until _C has CUDA ones (issue 25); no backward.

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# quantize_fp8's floor on the scales: the smallest normal float32, 1.2e-38. A group whose amax is below 448 times that
# (an all-zero group) gets it, so that x / scale is never 0 / 0 and its values come back as they were, within the
# format's subnormal step.
FP8_MIN_SCALE = torch.finfo(torch.float32).tiny


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    """``values * scale`` in float32 of the ``[R, C]`` matrix ``values``: ``scale`` ``[R]`` (one per row), or
    ``[ceil(R / block_rows), ceil(C / 128)]`` (one per block of ``block_rows`` x 128, the last ones partial)."""
    out = values.float()
    if scale.dim() == 1:
        return out.mul_(scale.unsqueeze(1))
    rows = torch.arange(values.shape[0], device=values.device) // block_rows
    columns = torch.arange(values.shape[1], device=values.device) // _validation.FP8_GROUP
    return out.mul_(scale[rows.unsqueeze(1), columns])


def grouped_mm_fp8_torch(x, x_scale, weight, weight_scale, m_sizes, weight_transposed=False, out_dtype=None):
    """``moe_gemm::grouped_mm_fp8`` in PyTorch ops: each expert's rows of ``x`` and its weight dequantized to float32
    and multiplied in float32, then rounded to ``out_dtype``. Reads the sizes on the host, as ``grouped_mm_torch``'s
    loop; dequantizes one expert's weight at a time, and only those of the experts that own rows."""
    weight, weight_scale, weight_transposed = _validation.validate_fp8(
        x, x_scale, weight, weight_scale, m_sizes, weight_transposed, out_dtype
    )
    if weight_transposed:
        # [E, N, K] views. Block scales follow the weight's dims; per-channel ones are [E, N] in both layouts.
        weight = weight.transpose(-1, -2)
        weight_scale = weight_scale.transpose(-1, -2) if weight_scale.dim() == 3 else weight_scale
    num_rows = x.shape[0]
    out = x.new_empty(num_rows, weight.shape[1], dtype=torch.bfloat16 if out_dtype is None else out_dtype)
    end = 0
    for expert, start, end in expert_row_ranges(m_sizes, num_rows):
        x_e = dequantize_fp8(x[start:end], x_scale[start:end], 1)
        w_e = dequantize_fp8(weight[expert], weight_scale[expert], _validation.FP8_GROUP)
        out[start:end] = x_e @ w_e.t()
    out[end:].zero_()
    return out


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` floored at ``FP8_MIN_SCALE``, written as a product with the reciprocal: torch on CUDA divides by
    a Python number that way and on CPU it does not, so the two devices' scales would differ in the last bit (amax 3.0
    gives 0x3bdb6db7 by division, 0x3bdb6db8 by the product); the product is what both, and ``_quantize_fp8_kernel``,
    compute."""
    return (amax * (1.0 / FP8_MAX)).clamp_min(FP8_MIN_SCALE)


def quantize_fp8_torch(x, group=128):
    """``moe_gemm::quantize_fp8`` in PyTorch ops, in float32: over each group of ``group`` columns of a row (the whole
    row when None), ``scale = amax / 448`` floored at ``FP8_MIN_SCALE`` (``fp8_scale``), ``x_fp8 = x / scale``
    rounded to nearest.
    The quotient is clamped to +-448: rounding can carry the group's amax a hair past it, and whether a cast past the
    format's range saturates or gives NaN is up to the torch version. No sync, no check of the values: a NaN or +-inf
    makes its group's scale NaN or inf, and the whole group dequantizes to NaN."""
    _validation.check_quantize_fp8(x, group)
    values = x.float()
    num_rows, k = values.shape
    if group is None:
        # The zero column lets a row of K = 0 reduce.
        amax = torch.nn.functional.pad(values.abs(), (0, 1)).amax(dim=1)
    else:
        groups = _validation.fp8_groups(k)
        padded = torch.nn.functional.pad(values.abs(), (0, groups * group - k))
        amax = padded.reshape(num_rows, groups, group).amax(dim=2)
    scale = fp8_scale(amax)
    per_column = scale.unsqueeze(1) if group is None else scale[:, torch.arange(k, device=x.device) // group]
    x_fp8 = (values / per_column).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x_fp8.contiguous(), scale


def _cuda_kernel_in_extension(name: str) -> bool:
    """Whether ``_C`` registered a CUDA kernel for ``moe_gemm::<name>``; asked before this module registers its own."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_gemm::{name}", "CUDA")


# Whether _C has the FP8 GEMM's CUDA kernel (grouped_mm_fp8_cuda routes to it what it can take).
FP8_KERNEL_BUILT = _cuda_kernel_in_extension("_grouped_mm_fp8_kernel")
# Whether _C has grouped_mm_gated's CUDA kernel (the gated activation in the up-projection's epilogue).
GATED_KERNEL_BUILT = _cuda_kernel_in_extension("grouped_mm_gated")


def _fp8_kernel_applies(x, x_scale, weight, weight_scale, weight_transposed, out_dtype) -> bool:
    """Whether ``_grouped_mm_fp8_kernel`` computes this ``grouped_mm_fp8`` call: rowwise scales (x_scale [M],
    weight_scale [E, N]) or blockwise weight scales ([E, ceil(N/128), ceil(K/128)], with x_scale [M, ceil(K/128)] or
    [M]), [E, N, K] weights, bf16 output, 16-byte rows and starts, on a device whose kernels run. Blockwise x with
    per-channel weights runs PyTorch ops."""
    scales = (x_scale.dim() == 1 and weight_scale.dim() == 2) or weight_scale.dim() == 3
    return (
        FP8_KERNEL_BUILT and x.is_cuda and kernels_available(x.device) and scales and not weight_transposed
        and out_dtype in (None, torch.bfloat16)
        and x.shape[1] % 16 == 0 and weight.shape[1] % 16 == 0 and (x.shape[0] == 0 or x.stride(1) == 1)
        and x.stride(0) % 16 == 0 and weight.stride(2) == 1 and weight.stride(1) % 16 == 0
        and weight.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    )  # fmt: skip


def grouped_mm_fp8_cuda(x, x_scale, weight, weight_scale, m_sizes, weight_transposed=False, out_dtype=None):
    """``moe_gemm::grouped_mm_fp8`` on CUDA: the kernel where it applies, else the PyTorch ops."""
    if _fp8_kernel_applies(x, x_scale, weight, weight_scale, weight_transposed, out_dtype):
        return torch.ops.moe_gemm._grouped_mm_fp8_kernel.default(
            x, x_scale.contiguous(), weight, weight_scale.contiguous(), m_sizes.contiguous()
        )
    return grouped_mm_fp8_torch(x, x_scale, weight, weight_scale, m_sizes, weight_transposed, out_dtype)


def _no_fp8_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"moe_gemm::{name} has no backward (FP8 experts train through experts_forward_fp8): detach its inputs"
        )

    return backward


torch.library.register_kernel("moe_gemm::grouped_mm_fp8", "cpu", grouped_mm_fp8_torch)
torch.library.register_kernel("moe_gemm::grouped_mm_fp8", "cuda", grouped_mm_fp8_cuda)
QUANTIZE_FP8_KERNEL_BUILT = _cuda_kernel_in_extension("_quantize_fp8_kernel")


def quantize_fp8_cuda(x, group=128):
    """``moe_gemm::quantize_fp8`` on CUDA: one kernel (``_quantize_fp8_kernel``, bit for bit ``quantize_fp8_torch``)
    for bfloat16, float16 and float32 on a device whose kernels run, else the PyTorch ops."""
    _validation.check_quantize_fp8(x, group)
    if QUANTIZE_FP8_KERNEL_BUILT and kernels_available(x.device) and x.dtype in ROUTE_AND_LAYER_KERNEL_DTYPES:
        return torch.ops.moe_gemm._quantize_fp8_kernel.default(x if x.stride(-1) == 1 else x.contiguous(), group)
    return quantize_fp8_torch(x, group)


torch.library.register_kernel("moe_gemm::quantize_fp8", "cpu", quantize_fp8_torch)
torch.library.register_kernel("moe_gemm::quantize_fp8", "cuda", quantize_fp8_cuda)
QUANTIZE_FP8_WEIGHT_KERNEL_BUILT = _cuda_kernel_in_extension("_quantize_fp8_weight_kernel")


def quantize_fp8_weight_kernel_applies(weight: torch.Tensor) -> bool:
    """Whether ``_quantize_fp8_weight_kernel`` quantizes this (checked) ``[E, R, C]`` weight: on a GPU whose kernels
    run, bfloat16, float16 or float32, 16-byte aligned, stored as it is (inner stride 1) or as its transpose (stride 1
    along R, a view read in place), R and C and the strides multiples of 8 (the kernel reads 16 bytes and writes 8
    values at a time)."""
    _, rows, cols = weight.shape
    inner = 2 if weight.stride(2) == 1 else 1  # the dimension stored contiguously
    other = 3 - inner
    return (
        QUANTIZE_FP8_WEIGHT_KERNEL_BUILT
        and use_kernels(weight.device)
        and weight.dtype in ROUTE_AND_LAYER_KERNEL_DTYPES
        and weight.stride(inner) == 1
        and rows % 8 == 0
        and cols % 8 == 0
        and weight.stride(0) % 8 == 0
        and weight.stride(other) % 8 == 0
        and _validation._is_aligned(weight)
    )


for _name in ("grouped_mm_fp8", "quantize_fp8", "_grouped_mm_fp8_kernel", "_quantize_fp8_kernel",
              "_quantize_fp8_weight_kernel"):  # fmt: skip
    # Without it, torch would backpropagate zeros through the op, with a warning.
    torch.library.register_autograd(f"moe_gemm::{_name}", _no_fp8_backward(_name))


@torch.library.register_fake("moe_gemm::_grouped_mm_fp8_kernel")
def _grouped_mm_fp8_kernel_fake(x, x_scale, weight, w_scale, m_sizes):
    return x.new_empty(x.shape[0], weight.shape[1], dtype=torch.bfloat16)


@torch.library.register_fake("moe_gemm::grouped_mm_fp8")
def _grouped_mm_fp8_fake(x, x_scale, weight, weight_scale, m_sizes, weight_transposed=False, out_dtype=None):
    n = weight.shape[2] if weight_transposed else weight.shape[1]
    return x.new_empty(x.shape[0], n, dtype=torch.bfloat16 if out_dtype is None else out_dtype)


@torch.library.register_fake("moe_gemm::quantize_fp8")
@torch.library.register_fake("moe_gemm::_quantize_fp8_kernel")
def _quantize_fp8_fake(x, group=128):
    num_rows, k = x.shape
    scale_shape = (num_rows,) if group is None else (num_rows, _validation.fp8_groups(k))
    return x.new_empty(num_rows, k, dtype=torch.float8_e4m3fn), x.new_empty(scale_shape, dtype=torch.float32)


@torch.library.register_fake("moe_gemm::_quantize_fp8_weight_kernel")
def _quantize_fp8_weight_fake(weight):
    num_experts, rows, cols = weight.shape
    scale_shape = (num_experts, _validation.fp8_groups(rows), _validation.fp8_groups(cols))
    return weight.new_empty(weight.shape, dtype=torch.float8_e4m3fn), weight.new_empty(scale_shape, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Routing: the fused kernel's limits (csrc/moe_routing.h), the tensor-op kernel, the fake and autograd.

ROUTE_KERNEL_MAX_EXPERTS = 1024
ROUTE_KERNEL_MAX_TOP_K = 32
ROUTE_KERNEL_MAX_GROUPS = 32
# The dtypes of router logits and of the layer kernels' inputs (the GEMMs take bfloat16 and float16 only:
# _validation.GEMM_DTYPES).
ROUTE_AND_LAYER_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def route_kernel_applies(router_logits: torch.Tensor, top_k: int, n_group: int | None) -> bool:
    """Whether ``route`` runs the fused CUDA kernel for these (already checked) arguments."""
    return (
        router_logits.is_cuda
        and router_logits.dtype in ROUTE_AND_LAYER_KERNEL_DTYPES
        and router_logits.shape[1] <= ROUTE_KERNEL_MAX_EXPERTS
        and top_k <= ROUTE_KERNEL_MAX_TOP_K
        and (n_group is None or n_group <= ROUTE_KERNEL_MAX_GROUPS)
        and use_kernels(router_logits.device)
    )


def topk_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` largest entries along the last dim; ties go to the lower index."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def _mask_groups(biased: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``biased`` with the experts outside the ``topk_group`` best groups set to -inf (``[T, E]``)."""
    num_tokens, num_experts = biased.shape
    grouped = biased.view(num_tokens, n_group, num_experts // n_group)
    # A group's score is the sum of its two best biased scores (its only score when a group has one expert).
    best_two, _ = topk_lowest_index_first(grouped, min(2, grouped.shape[-1]))
    _, kept_groups = topk_lowest_index_first(best_two.sum(dim=-1), topk_group)
    kept = torch.zeros(num_tokens, n_group, dtype=torch.bool, device=biased.device).scatter_(1, kept_groups, True)
    return grouped.masked_fill(~kept[..., None], float("-inf")).view(num_tokens, num_experts)


def route_torch(
    router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
):
    """``moe_gemm.route`` in PyTorch tensor ops on any device, arguments not checked: the path off the fused kernel
    and the reference it is tested against. Differentiable in the logits."""
    logits = torch.nan_to_num(router_logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if scoring == "softmax":
        _, ids = topk_lowest_index_first(logits, top_k)
        weights = torch.softmax(logits, dim=-1).gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif scoring == "softmax_topk":
        top_logits, ids = topk_lowest_index_first(logits, top_k)
        weights = torch.softmax(top_logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        biased = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
        if n_group is not None:
            biased = _mask_groups(biased, n_group, topk_group)
        _, ids = topk_lowest_index_first(biased, top_k)
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def _route_kernel_torch(
    router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
):
    """The op's kernel on the PyTorch path: checks its arguments as the CUDA kernel does, then ``route_torch``."""
    _validation.check_route_arguments(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias)
    weights, ids = route_torch(
        router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
    )
    # Contiguous, like the CUDA kernel's outputs and the fake ones (the sorted ids are a slice).
    return weights.contiguous(), ids.contiguous()


torch.library.register_kernel("moe_gemm::route", _TORCH_PATH_DEVICES, _route_kernel_torch)


@torch.library.register_fake("moe_gemm::route")
def _route_fake(
    router_logits, top_k, scoring, renormalize, n_group, topk_group, e_score_correction_bias, routed_scaling_factor
):
    shape = (router_logits.shape[0], top_k)
    return router_logits.new_empty(shape, dtype=torch.float32), router_logits.new_empty(shape, dtype=torch.int64)


def _normalize_backward(grad_normalized: torch.Tensor, values: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Gradient in ``values`` of ``values / (values.sum(-1) + epsilon)``, given that of the result."""
    denominator = values.sum(dim=-1, keepdim=True) + epsilon
    normalized = values / denominator
    return (grad_normalized - (grad_normalized * normalized).sum(dim=-1, keepdim=True)) / denominator


def route_backward(grad_weights, router_logits, ids, scoring, renormalize, routed_scaling_factor):
    """Gradient in ``router_logits`` of the weights of ``route`` (the ids fixed), given that of the weights: the
    tensor ops of ``route_torch``'s own backward written out, so that the fused kernel's op and the tensor ops give the
    same gradients."""
    logits = torch.nan_to_num(router_logits.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    grad = grad_weights.float() * routed_scaling_factor
    if scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        chosen = probs.gather(1, ids)
        if renormalize:
            grad = _normalize_backward(grad, chosen, 0.0)
        # Softmax backward: p * (g - <g, p>), g being zero outside the chosen experts.
        grad_full = torch.zeros_like(probs).scatter(1, ids, grad)
        grad_logits = probs * (grad_full - (grad * chosen).sum(dim=-1, keepdim=True))
    else:
        chosen_logits = logits.gather(1, ids)
        if scoring == "softmax_topk":
            weights = torch.softmax(chosen_logits, dim=-1)
            grad_chosen = weights * (grad - (grad * weights).sum(dim=-1, keepdim=True))
        else:
            scores = torch.sigmoid(chosen_logits)
            if renormalize:
                grad = _normalize_backward(grad, scores, 1e-20)
            grad_chosen = grad * scores * (1 - scores)
        grad_logits = torch.zeros_like(logits).scatter(1, ids, grad_chosen)
    # nan_to_num passes gradients of finite logits only.
    grad_logits = torch.where(torch.isfinite(router_logits), grad_logits, 0)
    return grad_logits.to(router_logits.dtype)


def _route_setup_context(ctx, inputs, output):
    router_logits, _, scoring, renormalize, _, _, _, routed_scaling_factor = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.scoring, ctx.renormalize, ctx.routed_scaling_factor = scoring, renormalize, routed_scaling_factor


def _route_autograd_backward(ctx, grad_weights, _grad_ids):
    router_logits, ids = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = route_backward(
            grad_weights, router_logits, ids, ctx.scoring, ctx.renormalize, ctx.routed_scaling_factor
        )
    return grad_logits, None, None, None, None, None, None, None


torch.library.register_autograd("moe_gemm::route", _route_autograd_backward, setup_context=_route_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# The MoE layer's small kernels (csrc/moe_layer_kernels.cu): CUDA only, no autograd (the layer's own Function calls
# them below autograd). Each *_applies says whether its kernel takes the arguments; the PyTorch ops run otherwise.

# As csrc/moe_layer_kernels.h: (warps + 1) * (E + 1) int32 counters in 46 KB of shared memory.
DISPATCH_MAX_EXPERTS = 46 * 1024 // 4 // 2 - 1
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_INT32_MAX = 2**31 - 1


def dispatch_kernel_applies(ids: torch.Tensor, num_experts: int) -> bool:
    return (
        ids.is_cuda
        and not torch.compiler.is_compiling()
        and 0 <= num_experts <= DISPATCH_MAX_EXPERTS
        and ids.numel() <= _INT32_MAX
        and (ids.shape[1] >= 1 or ids.shape[0] == 0)
        and use_kernels(ids.device)
    )


def dispatch_kernel(ids: torch.Tensor, num_experts: int):
    """``(m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair)`` of ``ids [T, k]``, all int64, as
    ``dispatch.sort_pairs`` computes them (plus ``token_of_row = pair_of_row // k``); where
    ``dispatch_kernel_applies``."""
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    return torch.ops.moe_gemm.dispatch_pairs(ids, num_experts)


def gated_activation_kernel_applies(gate_up: torch.Tensor, act: str) -> bool:
    return (
        gate_up.is_cuda
        and gate_up.dim() == 2
        and gate_up.dtype in ROUTE_AND_LAYER_KERNEL_DTYPES
        and gate_up.shape[1] % 16 == 0
        and gate_up.is_contiguous()
        and act in ACTIVATIONS
        and use_kernels(gate_up.device)
    )


def gated_activation_kernel(gate_up: torch.Tensor, act: str, concatenated: bool) -> torch.Tensor:
    """``act(gate) * up`` of ``[rows, 2I]``, ``[rows, I]``; where ``gated_activation_kernel_applies``."""
    return torch.ops.moe_gemm.gated_activation(gate_up, act, concatenated)


def gated_activation_backward_kernel(
    grad_activated: torch.Tensor, gate_up: torch.Tensor, row_weights: torch.Tensor, act: str, concatenated: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_gate_up, weighted_activated, grad_row_weights)``, what ``layer.gated_activation_backward`` computes;
    where ``gated_activation_kernel_applies`` (the forward's conditions)."""
    return torch.ops.moe_gemm.gated_activation_backward(
        grad_activated.contiguous(), gate_up, row_weights.float().contiguous(), act, concatenated
    )


def combine_kernel_applies(y_sorted: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> bool:
    return (
        y_sorted.is_cuda
        and y_sorted.dim() == 2
        and y_sorted.dtype in ROUTE_AND_LAYER_KERNEL_DTYPES
        and weights.dtype in ROUTE_AND_LAYER_KERNEL_DTYPES
        and y_sorted.shape[1] % 8 == 0
        and y_sorted.is_contiguous()
        and weights.device == y_sorted.device
        and ids.device == y_sorted.device
        and ids.shape[0] <= _INT32_MAX
        and use_kernels(y_sorted.device)
    )


def combine_kernel(
    y_sorted: torch.Tensor, row_of_pair: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """``out[t] = sum_j [0 <= ids[t, j] < E] * weights[t, j] * y_sorted[row_of_pair[t * k + j]]`` in float32, ``[T, H]``
    in the dtype of ``y_sorted``; where ``combine_kernel_applies``."""
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    return torch.ops.moe_gemm.combine_rows(y_sorted, row_of_pair, weights.contiguous(), ids, num_experts)


@torch.library.register_fake("moe_gemm::dispatch_pairs")
def _dispatch_pairs_fake(ids, num_experts):
    pairs = ids.numel()
    return (ids.new_empty(num_experts, dtype=torch.int64), *(ids.new_empty(pairs, dtype=torch.int64) for _ in range(4)))


@torch.library.register_fake("moe_gemm::gated_activation")
def _gated_activation_fake(gate_up, act, concatenated):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.register_fake("moe_gemm::gated_activation_backward")
def _gated_activation_backward_fake(grad_activated, gate_up, row_weights, act, concatenated):
    return torch.empty_like(gate_up), torch.empty_like(grad_activated), row_weights.new_empty(gate_up.shape[0])


@torch.library.register_fake("moe_gemm::combine_rows")
def _combine_rows_fake(y_sorted, row_of_pair, weights, ids, num_experts):
    return y_sorted.new_empty(ids.shape[0], y_sorted.shape[1])
