"""The experts layer with frozen FP8 expert weights: ``experts_forward_fp8``, the module ``MoEExpertsFP8`` and
``quantize_fp8_weight``, which makes its weights. For inference, and for training what lies around the experts.

The weights are float8_e4m3fn with float32 scales, one per 128 x 128 block (as DeepSeek-V3's checkpoints and
transformers' fine-grained FP8 store them) or one per output channel; the activations are quantized on the fly, one
scale per row and 128 columns, as transformers' "dynamic" activation scheme does. One forward:

1. ``hidden [T, H]`` is quantized once (``quantize_fp8``): T rows, not T * k, since a token's rows are all copies;
2. the pairs are sorted by expert, and each row's fp8 values and scales gathered from its token's;
3. the gate/up GEMM (``grouped_forward_fp8``) writes the hidden dtype, and the gated activation follows;
4. the activation is quantized per row and 128 columns for the down GEMM;
5. each token's rows are summed with their routing weights in float32, in slot order (``combine_pairs``).

E.g. DeepSeek-V3 (H = 7168, I = 2048, top-8): the up GEMM reads 7168 / 128 = 56 scales per row and 32 x 56 per
expert's gate/up block grid.

Differentiable in ``hidden`` and ``top_k_weights`` (fp8 weights are frozen: fine-tuning around fp8 experts, or a
router trained through them). Weights given in high precision instead (bfloat16, float16 or float32, their scales
None) are trained: each call quantizes them in 128 x 128 blocks, the forward and the input gradient run in FP8 on
those, and their gradients are computed in the dtype of ``hidden`` from its rows and from the backward's rows before
they are quantized (``_weight_gradient``), as DeepSeek-V3's FP8 training keeps its master weights and, here, its
weight gradients in higher precision. The input gradient runs in FP8 too, with the same scaling: each token's output
gradient is quantized once per row and 128 columns, the down GEMM's transpose reads the fp8 weight transposed in
memory with its block scales (a 128 x 128 block is one in either orientation; ``_transposed_gemm``), the activation's backward runs in float32 from the saved
pre-activation as in the bf16 layer (``layer.gated_activation_backward``; the routing weights' gradient is
``<grad_activated, activated>`` per row), and the pre-activation's gradient is quantized for the up GEMM's
transpose. A per-output-channel weight scale scales the reduction of the transposed GEMM, so it is folded into the
gradient rows before they are quantized. Saved for the backward: the routing, the pre-activation ``[T * k, 2I]``,
and for weights to train ``hidden`` itself (the backward quantizes their transposes from the master weights). An fp8
weight or scale that requires grad raises.
"""

import contextlib
import contextvars
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moe_gemm import _ops, _validation
from moe_gemm.activation import check_activation_name, gated_activation
from moe_gemm.dispatch import combine_pairs, sort_pairs, valid_pairs
from moe_gemm.functional import grouped_forward_fp8, quantize_fp8
from moe_gemm.layer import (
    MoEExperts,
    _check_expert_weights,
    _check_module_input,
    _StackedExperts,
    _sum_token_rows,
    gated_activation_backward,
)


def experts_forward_fp8(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale: torch.Tensor,
    *,
    act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
    weight_transposed: bool = False,
    concatenated: bool = True,
) -> torch.Tensor:
    """``experts_forward`` of FP8 experts: ``out[t] = sum_j w[t, j] * expert_{id[t, j]}(hidden[t])``, ``[T, H]``.

    Args:
        hidden: ``[T, H]`` bfloat16, float16 or float32; the output's dtype, and that of the GEMMs' outputs.
        top_k_index, top_k_weights: ``[T, k]``, as for ``experts_forward`` (ids outside ``[0, E)`` add nothing).
        gate_up_proj, down_proj: float8_e4m3fn ``[E, 2I, H]`` and ``[E, H, I]`` (``[E, H, 2I]`` and ``[E, I, H]``
            when ``weight_transposed``); or bfloat16, float16 or float32 ``[E, 2I, H]`` and ``[E, H, I]`` with both
            scales None: weights to train, quantized in 128 x 128 blocks at each call, their gradients computed
            where they require grad (module docstring).
        gate_up_proj_scale, down_proj_scale: their float32 scales, ``grouped_forward_fp8``'s ``weight_scale``:
            one per 128 x 128 block (``[E, ceil(2I / 128), ceil(H / 128)]`` and ``[E, ceil(H / 128), ceil(I / 128)]``)
            or per output channel (``[E, 2I]`` and ``[E, H]``); None for weights to train.
        act, concatenated: as for ``experts_forward``; a callable maps the ``[rows, 2I]`` gate/up output (in the
            dtype of ``hidden``) to the ``[rows, I]`` input of the down projection.

    Returns:
        ``[T, H]`` in the dtype of ``hidden``.

    Raises:
        TypeError, ValueError: for arguments that do not fit (``grouped_forward_fp8``'s checks name the weight);
        ValueError for an fp8 weight or scale that requires gradients while grad mode is on (they get none), for
        one scale None and not the other, and for weights to train with ``weight_transposed``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D tensor [T, H], got {_describe(hidden)}")
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"hidden: expected torch.bfloat16, torch.float16 or torch.float32, got {hidden.dtype}")
    if not isinstance(top_k_index, torch.Tensor) or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"top_k_index: expected [T, k] with T = {hidden.shape[0]} (hidden's rows), got {_describe(top_k_index)}"
        )
    if not isinstance(top_k_weights, torch.Tensor) or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights: expected the shape of top_k_index {tuple(top_k_index.shape)}, "
            f"got {_describe(top_k_weights)}"
        )
    if isinstance(act, str):
        check_activation_name(act)
    weights = {"gate_up_proj": gate_up_proj, "gate_up_proj_scale": gate_up_proj_scale, "down_proj": down_proj,
               "down_proj_scale": down_proj_scale}  # fmt: skip
    trained = _check_trained_weights(weights, weight_transposed)
    if trained:
        _check_expert_weights(hidden.shape[1], gate_up_proj, down_proj, None, None, False, isinstance(act, str))
    for name, value in weights.items():
        if trained and name in ("gate_up_proj", "down_proj"):
            continue
        if torch.is_grad_enabled() and isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(
                f"{name}: experts_forward_fp8 computes no gradient for fp8 weights and scales (frozen; the "
                f"gradients of hidden and top_k_weights it does compute), got a tensor that requires grad; pass "
                f"{name}.detach(), or high-precision weights with both scales None to train them"
            )
    options = (act, weight_transposed, concatenated)
    differentiable = (hidden, top_k_weights, gate_up_proj, down_proj) if trained else (hidden, top_k_weights)
    if torch.is_grad_enabled() and any(value.requires_grad for value in differentiable):
        return _ExpertsFP8Function.apply(hidden, top_k_weights, top_k_index, *weights.values(), options)
    if trained:
        reused = _reused_copies()
        gate_up_proj, gate_up_proj_scale = _quantized_master(gate_up_proj, "gate_up_proj", False, reused)
        down_proj, down_proj_scale = _quantized_master(down_proj, "down_proj", False, reused)
    return _forward(None, hidden, top_k_weights, top_k_index, gate_up_proj, gate_up_proj_scale, down_proj,
                    down_proj_scale, options)  # fmt: skip


class _QuantizedCopies(dict):
    """``reuse_quantized_weights()``' cache: ``(id(weight), transposed)`` -> ``(weakref to the weight, its layout, its
    version, (values, scale))``. A dict subclass, so that the finalizers that drop a freed weight's entry can hold it
    weakly (a strong reference would keep every copy alive as long as the weights live)."""

    def __init__(self):
        super().__init__()
        self.finalizers: list[weakref.finalize] = []


# The cache of the reuse_quantized_weights() block in effect, if any.
_REUSED: contextvars.ContextVar[_QuantizedCopies | None] = contextvars.ContextVar("moe_gemm_reused_fp8_weights",
                                                                                  default=None)  # fmt: skip


@contextlib.contextmanager
def reuse_quantized_weights() -> Iterator[None]:
    """Inside, experts trained in FP8 (``MoEExpertsFP8Training``, ``experts_forward_fp8`` with both scales None)
    quantize each master weight once, as stored for the forward and transposed for the backward, and reuse the fp8
    copies until the block ends; their backward, also run after it, uses the same copies. For the micro-batches of a
    gradient accumulation: the weights do not change between them, and quantizing them is most of an FP8 step's time
    at few rows per expert (BENCHMARKS.md, "FP8 layer: training the experts"). E.g.::

        with moe_gemm.reuse_quantized_weights():
            for micro_batch in micro_batches:
                loss_fn(model(micro_batch)).backward()
        optimizer.step()

    The copies are held until the block ends and the graphs that used them are freed (a freed weight's at once): the
    master weights' elements in bytes once per layout, a bf16 weight's size again. A weight is known by its identity,
    storage and layout; one whose version changes inside the block (an optimizer step of torch's single-tensor or
    foreach kind, an in-place write) raises RuntimeError at its next use instead of training on the stale copy. Fused
    optimizers (``fused=True``, apex's, DeepSpeed's) and writes through ``.data`` leave the version as it was, so
    step the optimizer outside the block. Nothing is reused under ``torch.compile`` or for inference tensors."""
    copies = _QuantizedCopies()
    token = _REUSED.set(copies)
    try:
        yield
    finally:
        _REUSED.reset(token)
        for finalizer in copies.finalizers:  # the weights outlive the block: their finalizers need not
            finalizer.detach()


def _reused_copies() -> _QuantizedCopies | None:
    """The cache of the ``reuse_quantized_weights()`` block in effect; None outside one and while compiling (Dynamo
    does not trace a context variable)."""
    return None if torch.compiler.is_compiling() else _REUSED.get()


def _drop_copy(copies: weakref.ref, key: tuple) -> None:
    cache = copies()
    if cache is not None:
        cache.pop(key, None)


def _quantized_master(weight: torch.Tensor, name: str, transposed: bool, reused: _QuantizedCopies | None):
    """``quantize_fp8_weight`` of a master weight, or of its transpose's view when ``transposed``; from ``reused``
    (``reuse_quantized_weights``' cache) when given, keeping what it makes there."""
    view = weight.transpose(1, 2) if transposed else weight
    if reused is None or weight.is_inference():  # (reused is None while compiling: _reused_copies)
        return quantize_fp8_weight(view)
    key = (id(weight), transposed)
    layout = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())
    cached = reused.get(key)
    if cached is not None and cached[0]() is weight:
        if cached[1:3] != (layout, weight._version):
            raise RuntimeError(
                f"{name} changed inside moe_gemm.reuse_quantized_weights() after it was quantized (an optimizer "
                f"step or an in-place write): its fp8 copy would be stale; change the weights outside the block"
            )
        return cached[3]
    quantized = quantize_fp8_weight(view)  # a weight not seen in the block (an entry left under its id was another's)
    reused.finalizers.append(weakref.finalize(weight, _drop_copy, weakref.ref(reused), key))
    reused[key] = (weakref.ref(weight), layout, weight._version, quantized)
    return quantized


def _check_trained_weights(weights: dict, weight_transposed: bool) -> bool:
    """Whether the weights are given to train (high-precision, both scales None); raises for a mix."""
    scales_missing = [weights[name] is None for name in ("gate_up_proj_scale", "down_proj_scale")]
    if any(scales_missing) and not all(scales_missing):
        raise ValueError(
            "gate_up_proj_scale, down_proj_scale: both None (weights to train, quantized at each call) or both given "
            "(fp8 weights), got one of each"
        )
    if not all(scales_missing):
        return False
    for name in ("gate_up_proj", "down_proj"):
        value = weights[name]
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            hint = "; fp8 weights come with their scales" if got == _validation.FP8_DTYPE else ""
            raise TypeError(
                f"{name}: weights to train (scales None) are torch.bfloat16, torch.float16 or torch.float32, "
                f"got {got}{hint}"
            )
    if weight_transposed:
        raise ValueError("weight_transposed: weights to train are [E, 2I, H] and [E, H, I] (weight_transposed=False)")
    return True


def _forward(ctx, hidden, top_k_weights, top_k_index, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale,
             options, trained=None):  # fmt: skip
    """The forward on fp8 weights; saves what the backward needs on ``ctx`` unless it is None. Weights to train pass
    ``trained``, ``(hidden or None, gate_up_proj, down_proj)``, saved instead of the fp8 weights and their scales:
    the backward quantizes the master weights' transposes itself."""
    act, weight_transposed, concatenated = options
    num_experts, top_k = gate_up_proj.shape[0], top_k_index.shape[1]
    hidden_fp8, hidden_scale = quantize_fp8(hidden)
    if _ops.dispatch_kernel_applies(top_k_index, num_experts):
        m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair = _ops.dispatch_kernel(top_k_index, num_experts)
    else:
        m_sizes, expert_of_row, pair_of_row, row_of_pair, _ = sort_pairs(top_k_index, num_experts)
        token_of_row = pair_of_row // max(top_k, 1)
    x_fp8, x_scale = _gather_rows(hidden_fp8, hidden_scale, token_of_row)
    fp8 = {"weight_transposed": weight_transposed, "out_dtype": hidden.dtype}
    gate_up = grouped_forward_fp8(x_fp8, x_scale, gate_up_proj, gate_up_proj_scale, m_sizes, **fp8)
    activated = gated_activation(gate_up, act, concatenated) if isinstance(act, str) else act(gate_up)
    if ctx is not None:
        saved_hidden, weights = None, (gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale)
        if trained is not None:
            saved_hidden, weights = trained[0], (trained[1], None, trained[2], None)
        ctx.save_for_backward(top_k_weights, top_k_index, *weights, gate_up, m_sizes, expert_of_row, pair_of_row,
                              token_of_row, row_of_pair, saved_hidden)  # fmt: skip
        ctx.options = options
    del gate_up
    activated_fp8, activated_scale = quantize_fp8(activated)
    del activated
    y_sorted = grouped_forward_fp8(activated_fp8, activated_scale, down_proj, down_proj_scale, m_sizes, **fp8)
    if _ops.combine_kernel_applies(y_sorted, top_k_weights, top_k_index):
        return _ops.combine_kernel(y_sorted, row_of_pair, top_k_weights, top_k_index, num_experts)
    return combine_pairs(y_sorted, row_of_pair, valid_pairs(top_k_index, num_experts), top_k_weights)


def _gather_rows(values: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of quantized ``values`` and their ``scale``: fp8 rows are gathered as bytes (index_select has no float8
    kernel on every device)."""
    gathered = values.view(torch.uint8).index_select(0, rows).view(torch.float8_e4m3fn)
    return gathered, scale.index_select(0, rows)


def _transposed_gemm(rows, quantized_rows, weight, weight_scale, m_sizes, expert_of_row, weight_transposed,
                     out_dtype):  # fmt: skip
    """``rows @ W_e`` (the input gradient of ``x @ W_e.T``) in FP8, ``W_e`` the forward's ``[N, K]`` weight, through
    ``grouped_forward_fp8``. Hopper's fp8 MMA reads both operands K-major, here N-major: the weight's transpose in
    memory, ``[E, K, N]``, which a ``weight_transposed`` weight already is, and which ``_transposed_in_memory`` makes
    once otherwise. A block scale is the same block's in either orientation; the rows come ``quantized_rows``, ``(values,
    scale)``, or are quantized here. A per-output-channel scale ``[E, N]`` scales this GEMM's reduction instead: it
    multiplies ``rows`` before they are quantized, and the weight is read with unit block scales."""
    if not weight_transposed:
        weight = _transposed_in_memory(weight)
        weight_scale = weight_scale.transpose(1, 2).contiguous() if weight_scale.dim() == 3 else weight_scale
    if weight_scale.dim() == 2:
        channel_scale = weight_scale.index_select(0, expert_of_row.clamp(max=weight.shape[0] - 1))
        quantized_rows = quantize_fp8(rows.float() * channel_scale)
        blocks = [_validation.fp8_groups(size) for size in weight.shape[1:]]
        weight_scale = torch.ones(weight.shape[0], *blocks, dtype=torch.float32, device=weight.device)
    elif quantized_rows is None:
        quantized_rows = quantize_fp8(rows)
    return grouped_forward_fp8(*quantized_rows, weight, weight_scale, m_sizes, out_dtype=out_dtype)


# The fp8 weights' transposes in memory, made at their first backward: id(weight) -> ((data_ptr, version), copy),
# each entry dropped when its weight is freed (weakref.finalize). Beside the weights, not on them: a tensor's
# attributes would travel with it through torch.save and deepcopy.
_TRANSPOSED: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}


def _transposed_in_memory(weight: torch.Tensor) -> torch.Tensor:
    """``weight [E, N, K]``'s transpose in memory, ``[E, K, N]`` contiguous. The weights are frozen, so the copy is
    made once and kept while the weight's storage and version stay the same: the fp8 weights' memory twice over,
    once a backward has run. (A write through ``weight.data`` changes neither: make a new tensor instead.) E.g. a
    torch-op transpose of DeepSeek-V3's gate/up weight, 7.5 GB of bytes read across rows, took 44.5 ms on an H200,
    four times the layer's whole backward."""
    key = (weight.data_ptr(), weight._version)
    cached = _TRANSPOSED.get(id(weight))
    if cached is not None and cached[0] == key:
        return cached[1]
    transposed = weight.transpose(1, 2).contiguous()
    if not torch.compiler.is_compiling():
        if cached is None:
            weakref.finalize(weight, _TRANSPOSED.pop, id(weight), None)
        _TRANSPOSED[id(weight)] = (key, transposed)
    return transposed


class _ExpertsFP8Function(torch.autograd.Function):
    """``experts_forward_fp8`` under autograd: the gradients of ``hidden`` and ``top_k_weights``, and of weights
    given to train (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, top_k_weights, top_k_index, gate_up_proj, gate_up_proj_scale, down_proj,
                down_proj_scale, options):  # fmt: skip
        ctx.weight_dtypes = trained = None
        if gate_up_proj_scale is None:  # weights to train
            ctx.weight_dtypes = (gate_up_proj.dtype, down_proj.dtype)
            # gate_up_proj's gradient reads hidden; the backward quantizes the transposes of the master weights.
            trained = (hidden if ctx.needs_input_grad[3] else None, gate_up_proj, down_proj)
            # reuse_quantized_weights()' cache, kept for the backward: autograd may run it on another thread.
            ctx.reused = _reused_copies()
            gate_up_proj, gate_up_proj_scale = _quantized_master(gate_up_proj, "gate_up_proj", False, ctx.reused)
            down_proj, down_proj_scale = _quantized_master(down_proj, "down_proj", False, ctx.reused)
        return _forward(ctx, hidden, top_k_weights, top_k_index, gate_up_proj, gate_up_proj_scale, down_proj,
                        down_proj_scale, options, trained)  # fmt: skip

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (top_k_weights, ids, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale, gate_up, m_sizes,
         expert_of_row, pair_of_row, token_of_row, row_of_pair, hidden) = ctx.saved_tensors  # fmt: skip
        act, weight_transposed, concatenated = ctx.options
        needs = ctx.needs_input_grad
        trains = ctx.weight_dtypes is not None
        if trains:
            # The transposes' 128 x 128 blocks are the weights' own, so this is the forward's quantization,
            # transposed in memory ([E, K, N]: weight_transposed's layout), made from the master weights; gate_up_proj's
            # only where the input gradient uses it, so that it is freed before gate_up_proj's weight gradient.
            down_proj, down_proj_scale = _quantized_master(down_proj, "down_proj", True, ctx.reused)
            weight_transposed = True
        num_experts = gate_up_proj.shape[0]
        valid_pair = valid_pairs(ids, num_experts)
        row_weights = torch.where(valid_pair, top_k_weights.float(), 0).view(-1).index_select(0, pair_of_row)
        grad_out = grad_out.contiguous()
        # Each row's gradient is its token's: quantized once per token (as the forward's hidden), then gathered;
        # with per-channel scales each row is scaled by its expert's first.
        if down_proj_scale.dim() == 2:
            grad_rows, quantized_rows = grad_out.index_select(0, token_of_row), None
        else:
            grad_rows, quantized_rows = None, _gather_rows(*quantize_fp8(grad_out), token_of_row)
        grad_activated = _transposed_gemm(grad_rows, quantized_rows, down_proj, down_proj_scale, m_sizes,
                                          expert_of_row, weight_transposed, grad_out.dtype)  # fmt: skip
        del grad_rows, quantized_rows, down_proj
        if isinstance(act, str):
            if _ops.gated_activation_kernel_applies(gate_up, act):
                backward = _ops.gated_activation_backward_kernel
            else:
                backward = gated_activation_backward
            grad_gate_up, weighted_activated, grad_row_weights = backward(
                grad_activated, gate_up, row_weights, act, concatenated
            )
        else:
            # A callable activation: its own autograd, on the saved pre-activation.
            with torch.enable_grad():
                pre_activation = gate_up.detach().requires_grad_()
                activated = act(pre_activation)
                weighted = grad_activated.float() * row_weights[:, None]
                (grad_gate_up,) = torch.autograd.grad(activated, pre_activation, weighted.to(activated.dtype))
            grad_row_weights = (activated.detach().float() * grad_activated.float()).sum(dim=1)
            weighted_activated = (activated.detach().float() * row_weights[:, None]).to(grad_out.dtype)
        del grad_activated, gate_up
        grads = [None] * 8
        if needs[1]:
            grad_pairs = grad_row_weights.index_select(0, row_of_pair).view(ids.shape)
            grads[1] = torch.where(valid_pair, grad_pairs, 0).to(top_k_weights.dtype)
        if trains and needs[5]:
            # grad_down[e] sums (w * grad_out[token]) (x) activated over its rows: grad_out[token] (x) (w * activated).
            grads[5] = _weight_gradient(weighted_activated, grad_out, m_sizes, None, token_of_row)
            grads[5] = grads[5].to(ctx.weight_dtypes[1])
        del weighted_activated
        if needs[0]:
            if trains:
                gate_up_proj, gate_up_proj_scale = _quantized_master(gate_up_proj, "gate_up_proj", True, ctx.reused)
            grad_x_sorted = _transposed_gemm(grad_gate_up, None, gate_up_proj, gate_up_proj_scale, m_sizes,
                                             expert_of_row, weight_transposed, grad_out.dtype)  # fmt: skip
            grads[0] = _sum_token_rows(grad_x_sorted, row_of_pair, ids, num_experts)
            del grad_x_sorted, gate_up_proj, gate_up_proj_scale
        if trains and needs[3]:
            grads[3] = _weight_gradient(hidden, grad_gate_up.to(hidden.dtype), m_sizes, token_of_row, None)
            grads[3] = grads[3].to(ctx.weight_dtypes[0])
        return tuple(grads)


def _weight_gradient(x, grad_y, m_sizes, x_rows, grad_y_rows):
    """``grad_W[e] = grad_y_e.T @ x_e`` over each expert's rows, in the dtype of ``x``; the rows of one operand are
    those of a source at ``x_rows`` or ``grad_y_rows``. The CUDA kernel reads them in place where
    ``_ops.gather_in_wgrad`` finds that faster than a copy (as the bf16 layer's backward), from a copy otherwise;
    PyTorch ops where the kernel does not take the operands (float32, or rows whose layout it refuses)."""
    source, rows = (x, x_rows) if x_rows is not None else (grad_y, grad_y_rows)
    other = grad_y if x_rows is not None else x
    kernel_takes = (
        x.dtype in _validation.GEMM_DTYPES
        and _validation.kernel_layout_problem(source) is None
        and _validation.kernel_layout_problem(other) is None
    )
    if x.is_cuda and not kernel_takes:
        op = _ops.grouped_mm_wgrad_gather_torch
    elif x.is_cuda and not _ops.gather_in_wgrad(rows.shape[0], m_sizes.shape[0], other.shape[1],
                                                 gathered_is_l=x_rows is None):  # fmt: skip
        copied = source.index_select(0, rows)
        x, grad_y = (copied, grad_y) if x_rows is not None else (x, copied)
        x_rows = grad_y_rows = None
        op = _ops.gemm_op("grouped_mm_wgrad_gather", x.device)
    else:
        op = _ops.gemm_op("grouped_mm_wgrad_gather", x.device)
    return _ops.call_below_autograd(op, x, grad_y.contiguous(), m_sizes, False, x_rows, grad_y_rows)


def _gated(act: Callable[[torch.Tensor], torch.Tensor], gate_up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` of ``[gate; up]`` halves: a callable activation of ``MoEExperts``, without the module."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


# quantize_fp8_weight's float32 copies: at most this many elements at a time (DeepSeek-V3's gate_up_proj whole would
# take 30 GB).
QUANTIZE_CHUNK_ELEMENTS = 1 << 28


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8, weight_scale)`` of an ``[E, N, K]`` weight: float8_e4m3fn values and float32 scales
    ``[E, ceil(N / 128), ceil(K / 128)]``, one per 128 x 128 block (the last ones partial), ``amax / 448`` floored as
    ``quantize_fp8``'s, the layout of DeepSeek-V3's ``weight_scale_inv``; an ``[E, K, N]`` weight quantized this way
    is ``weight_transposed``'s layout with its blocks (``grouped_forward_fp8``). On a GPU whose kernels run, one
    kernel that also reads a transposed view in place (``_quantize_fp8_weight_kernel``, where
    ``_ops.quantize_fp8_weight_kernel_applies``); elsewhere ``quantize_fp8_weight_torch``, bit for bit the same."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or not weight.is_floating_point():
        raise ValueError(f"weight: expected a 3-D float tensor [E, N, K], got {_describe(weight)}")
    if _ops.quantize_fp8_weight_kernel_applies(weight):
        return torch.ops.moe_gemm._quantize_fp8_weight_kernel.default(weight.detach())
    return quantize_fp8_weight_torch(weight)


def quantize_fp8_weight_torch(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_fp8_weight`` of a checked weight in PyTorch ops, on a float32 copy of a few experts at a time
    (``QUANTIZE_CHUNK_ELEMENTS``, padded to whole blocks)."""
    num_experts, n, k = weight.shape
    blocks_n, blocks_k = _validation.fp8_groups(n), _validation.fp8_groups(k)
    values = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(num_experts, blocks_n, blocks_k, dtype=torch.float32, device=weight.device)
    chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, blocks_n * blocks_k * 128 * 128))
    for first in range(0, num_experts, chunk):
        count = min(chunk, num_experts - first)
        experts = slice(first, first + count)
        # A float32 copy padded with zeros to whole blocks, never the weight itself (the division below is in place).
        padded = torch.zeros(count, blocks_n * 128, blocks_k * 128, dtype=torch.float32, device=weight.device)
        padded[:, :n, :k] = weight[experts].detach()
        blocks = padded.view(count, blocks_n, 128, blocks_k, 128)
        scale[experts] = _ops.fp8_scale(blocks.abs().amax(dim=(2, 4)))
        blocks.div_(scale[experts][:, :, None, :, None]).clamp_(-_ops.FP8_MAX, _ops.FP8_MAX)
        values[experts] = blocks.view(count, blocks_n * 128, blocks_k * 128)[:, :n, :k]
    return values, scale


class MoEExpertsFP8(nn.Module):
    """``MoEExperts`` with frozen FP8 weights: ``forward(hidden, top_k_index, top_k_weights)`` runs
    ``experts_forward_fp8``. Buffers (not parameters: nothing trains them) ``gate_up_proj [E, 2I, H]`` and
    ``down_proj [E, H, I]`` in float8_e4m3fn with their 128 x 128 block scales ``gate_up_proj_scale`` and
    ``down_proj_scale``. ``from_experts`` quantizes a ``MoEExperts``; e.g. ``layer.experts =
    MoEExpertsFP8.from_experts(layer.experts)`` serves a ``moe_gemm.MoE`` in FP8."""

    def __init__(self, gate_up_proj, gate_up_proj_scale, down_proj, down_proj_scale, act="silu"):
        super().__init__()
        self.register_buffer("gate_up_proj", gate_up_proj)
        self.register_buffer("gate_up_proj_scale", gate_up_proj_scale)
        self.register_buffer("down_proj", down_proj)
        self.register_buffer("down_proj_scale", down_proj_scale)
        self.act = act
        self.num_experts, self.hidden_size = down_proj.shape[0], down_proj.shape[1]
        self.intermediate_size = down_proj.shape[2]

    @classmethod
    def from_experts(cls, experts: MoEExperts) -> "MoEExpertsFP8":
        """``experts``' weights quantized in 128 x 128 blocks (``quantize_fp8_weight``); ``experts`` is left as it is.
        Raises ValueError for experts with biases (the FP8 layer has none yet)."""
        if not isinstance(experts, MoEExperts):
            raise TypeError(f"experts: expected a moe_gemm.MoEExperts, got {type(experts).__name__}")
        if experts.down_proj_bias is not None:
            raise ValueError("MoEExpertsFP8.from_experts: experts with biases are not supported in FP8 yet")
        gate_up, gate_up_scale = quantize_fp8_weight(experts.gate_up_proj)
        down, down_scale = quantize_fp8_weight(experts.down_proj)
        act = experts.act if isinstance(experts.act, str) else functools.partial(_gated, experts.act)
        return cls(gate_up, gate_up_scale, down, down_scale, act=act)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward_fp8(
            hidden, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
            self.down_proj_scale, act=self.act,
        )  # fmt: skip

    def extra_repr(self) -> str:
        act = repr(self.act) if isinstance(self.act, str) else type(self.act).__name__
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, act={act}, weights float8_e4m3fn in 128 x 128 blocks")


class MoEExpertsFP8Training(_StackedExperts):
    """Experts trained in FP8, ``MoEExperts``' parameters and layouts: they stay what they are (the master weights, in
    their dtype); each forward quantizes them in 128 x 128 blocks and runs ``experts_forward_fp8`` on them, so the
    forward and the input gradient run in FP8, and the weight gradients are computed in the dtype of ``hidden`` (the
    parameters'), from unquantized rows (module docstring). ``from_experts`` takes a ``MoEExperts``' parameters
    themselves, not copies: ``layer.experts = MoEExpertsFP8Training.from_experts(layer.experts)`` trains a
    ``moe_gemm.MoE``'s experts in FP8 with the same parameters (an optimizer built before keeps them). No biases (the
    FP8 layer has none yet). Not a ``MoEExperts``: ``moe_gemm.distributed.expert_parallel`` leaves it alone."""

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(num_experts, hidden_size, intermediate_size, act, False, device, dtype)
        self.num_experts = num_experts

    @classmethod
    def from_experts(cls, experts: MoEExperts) -> "MoEExpertsFP8Training":
        """A module holding ``experts``' own ``gate_up_proj`` and ``down_proj``; raises ValueError for biases."""
        if not isinstance(experts, MoEExperts):
            raise TypeError(f"experts: expected a moe_gemm.MoEExperts, got {type(experts).__name__}")
        if experts.down_proj_bias is not None:
            raise ValueError("MoEExpertsFP8Training.from_experts: experts with biases are not supported in FP8 yet")
        module = cls(num_experts=experts.num_experts, hidden_size=experts.hidden_size,
                     intermediate_size=experts.intermediate_size, act=experts.act, device="meta")  # fmt: skip
        module.gate_up_proj, module.down_proj = experts.gate_up_proj, experts.down_proj
        return module

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        _check_module_input(self, hidden, self.gate_up_proj)
        return experts_forward_fp8(hidden, top_k_index, top_k_weights, self.gate_up_proj, None, self.down_proj, None,
                                   act=self._layer_act())  # fmt: skip

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, {self._sizes_repr()}, forward and input gradient in FP8 (128 x 128 "
                "weight blocks)")
