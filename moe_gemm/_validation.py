"""Input checks of the public functions and of the ops' PyTorch kernels, run before any kernel so that errors name the
argument, what was expected and what was given. The C++ kernels check again with ``TORCH_CHECK``, as a last guard;
these messages are the ones users should see. Callers whose arguments have other names (the MoE layer's
``gate_up_proj``, ``down_proj``) pass them as ``x_name`` and ``weight_name``.
"""

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
GEMM_DTYPES = (torch.bfloat16, torch.float16)
SIZE_DTYPES = (torch.int32, torch.int64)
SCORINGS = ("softmax", "softmax_topk", "sigmoid")
# TMA loads need 16-byte aligned base addresses and row strides.
ALIGN_BYTES = 16


def _weight_layout(weight_transposed: bool) -> str:
    return "[E, K, N] (weight_transposed=True)" if weight_transposed else "[E, N, K] (weight_transposed=False)"


def check_grouped_inputs(x, weight, m_sizes, weight_transposed, *, cuda_kernel, x_name="x", weight_name="weight"):
    """Check types, dtypes, ranks, shapes and devices; raise TypeError or ValueError naming the argument.

    ``cuda_kernel`` restricts the dtypes to what the CUDA kernel supports; the PyTorch path takes any float.
    """
    for name, value in ((x_name, x), (weight_name, weight), ("m_sizes", m_sizes)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")

    if cuda_kernel and x.dtype not in GEMM_DTYPES:
        raise TypeError(
            f"{x_name}: the CUDA kernel supports torch.bfloat16 and torch.float16, got {x.dtype}; "
            f"convert with {x_name}.to(torch.bfloat16) (and {weight_name} likewise)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{x_name}: expected one of {', '.join(map(str, FLOAT_DTYPES))}, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{weight_name}: expected the dtype of {x_name} ({x.dtype}), got {weight.dtype}")
    _check_grouped_shapes(x, weight, m_sizes, weight_transposed, x_name, weight_name, ())


def _check_grouped_shapes(x, weight, m_sizes, weight_transposed, x_name, weight_name, others) -> None:
    """The checks shared by ``check_grouped_inputs`` and ``validate_fp8``, once the dtypes of ``x`` and ``weight`` are
    right: ``m_sizes``' dtype, the ranks, one device (``others``: more ``(name, tensor)`` pairs on it), K and E."""
    if m_sizes.dtype not in SIZE_DTYPES:
        raise TypeError(f"m_sizes: expected torch.int32 or torch.int64 row counts, got {m_sizes.dtype}")

    if x.dim() != 2:
        raise ValueError(f"{x_name}: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(
            f"{weight_name}: expected a 3-D tensor {_weight_layout(weight_transposed)}, got shape {tuple(weight.shape)}"
        )
    if m_sizes.dim() != 1:
        raise ValueError(f"m_sizes: expected a 1-D tensor [E], got shape {tuple(m_sizes.shape)}")

    for name, value in ((weight_name, weight), ("m_sizes", m_sizes), *others):
        if value.device != x.device:
            raise ValueError(f"{name}: expected a tensor on the device of {x_name} ({x.device}), got {value.device}")

    k = weight.shape[1] if weight_transposed else weight.shape[2]
    if x.shape[1] != k:
        raise ValueError(
            f"{x_name}: expected K = {k} columns to match {weight_name} {_weight_layout(weight_transposed)} of shape "
            f"{tuple(weight.shape)}, got {x.shape[1]}"
        )
    if m_sizes.shape[0] != weight.shape[0]:
        raise ValueError(
            f"m_sizes: expected one size per expert, E = {weight.shape[0]} ({weight_name}.shape[0]), "
            f"got {m_sizes.shape[0]}"
        )


def normalize_weight_layout(weight: torch.Tensor, weight_transposed: bool) -> tuple[torch.Tensor, bool]:
    """Return ``(weight, weight_transposed)`` describing the same matrices with ``weight.stride(-1) == 1``.

    A weight stored in the other layout (``stride(-2) == 1``, e.g. ``w.transpose(-1, -2)`` of a contiguous ``w``) is
    read through its transposed view with the flag flipped, so it is never copied. Anything else is returned as is.
    """
    if weight.stride(-1) != 1 and weight.stride(-2) == 1:
        return weight.transpose(-1, -2), not weight_transposed
    return weight, weight_transposed


def _is_aligned(t: torch.Tensor) -> bool:
    # Fake tensors under torch.compile have no data pointer, and Dynamo cannot trace storage_offset() either (a
    # graph break in torch 2.11): the check is left to the CUDA op, which refuses a misaligned pointer when it runs.
    if torch.compiler.is_compiling():
        return True
    return t.data_ptr() % ALIGN_BYTES == 0


def kernel_layout_problem(t: torch.Tensor) -> str | None:
    """Why a kernel cannot read ``t``'s row-major matrices in place (unit inner stride, 16-byte aligned rows and
    base), or None when it can."""
    align = ALIGN_BYTES // t.element_size()
    if t.shape[-1] % align:
        return f"the last dimension must be a multiple of {align} elements (16 bytes), got shape {tuple(t.shape)}"
    if t.stride(-1) != 1:
        return f"the last dimension must have stride 1, got strides {t.stride()}"
    for dim in range(t.dim() - 1):
        if t.shape[dim] > 1 and t.stride(dim) % align:
            return f"stride({dim}) must be a multiple of {align} elements (16 bytes), got strides {t.stride()}"
    if t.numel() > 0 and not _is_aligned(t):
        return "the data pointer must be 16-byte aligned (a view starting mid-row is not)"
    return None


def check_kernel_layout(
    x: torch.Tensor, weight: torch.Tensor, weight_transposed: bool, *, x_name: str = "x", weight_name: str = "weight"
) -> None:
    """Check what the CUDA kernel needs beyond ``check_grouped_inputs``: N and K multiples of 8 and readable strides.

    Call after ``normalize_weight_layout``.
    """
    n, k = (weight.shape[2], weight.shape[1]) if weight_transposed else (weight.shape[1], weight.shape[2])
    align = ALIGN_BYTES // x.element_size()
    if k % align:
        raise ValueError(
            f"{x_name}: the CUDA kernel needs K (columns of {x_name}) to be a multiple of {align} (16-byte rows), "
            f"got {k}"
        )
    if n % align:
        raise ValueError(
            f"{weight_name}: the CUDA kernel needs N to be a multiple of {align} (16-byte rows), got N = {n} in "
            f"{weight_name} {_weight_layout(weight_transposed)} of shape {tuple(weight.shape)}"
        )
    # TMA coordinates are 32-bit.
    if x.shape[0] >= 2**31 or n >= 2**31 or k >= 2**31:
        raise ValueError(
            f"{x_name}: the CUDA kernel takes M, N and K below 2**31, got M = {x.shape[0]}, N = {n}, K = {k}"
        )
    for name, value in ((x_name, x), (weight_name, weight)):
        problem = kernel_layout_problem(value)
        if problem is not None:
            raise ValueError(f"{name}: the CUDA kernel cannot read it in place: {problem}; pass {name}.contiguous()")


# Layout facts of inputs that passed every check, keyed by what the checks read (shapes, strides, dtypes, devices,
# flags) but the data pointers: eager calls at decode sizes repeat the same few keys, and the checks cost more host
# time than the CUDA launch. Value: whether the weight is read through its transposed view.
_PASSED: dict[tuple, bool] = {}
_PASSED_MAX_ENTRIES = 256


def _cache_key(x, weight, m_sizes, weight_transposed, cuda_kernel) -> tuple | None:
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(m_sizes, torch.Tensor)):
        return None
    return (
        x.shape, x.stride(), x.dtype, x.device,
        weight.shape, weight.stride(), weight.dtype, weight.device,
        m_sizes.shape, m_sizes.dtype, m_sizes.device,
        weight_transposed, cuda_kernel,
    )  # fmt: skip


def validate(
    x: torch.Tensor,
    weight: torch.Tensor,
    m_sizes: torch.Tensor,
    weight_transposed: bool,
    *,
    cuda_kernel: bool,
    x_name: str = "x",
    weight_name: str = "weight",
) -> tuple[torch.Tensor, bool]:
    """All checks of ``grouped_forward``; returns the weight and flag to pass on (see ``normalize_weight_layout``).
    Errors name ``x`` and ``weight`` as ``x_name`` and ``weight_name``."""
    names = {"x_name": x_name, "weight_name": weight_name}
    compiling = torch.compiler.is_compiling()
    key = None if compiling else _cache_key(x, weight, m_sizes, weight_transposed, cuda_kernel)
    flipped = _PASSED.get(key) if key is not None else None
    if flipped is not None:
        if flipped:
            weight, weight_transposed = weight.transpose(-1, -2), not weight_transposed
        # Only the data pointers' alignment is not in the key.
        if cuda_kernel and not (_aligned_or_empty(x) and _aligned_or_empty(weight)):
            check_kernel_layout(x, weight, weight_transposed, **names)
        return weight, weight_transposed
    check_grouped_inputs(x, weight, m_sizes, weight_transposed, cuda_kernel=cuda_kernel, **names)
    normalized, normalized_flag = normalize_weight_layout(weight, weight_transposed)
    if cuda_kernel:
        check_kernel_layout(x, normalized, normalized_flag, **names)
    if key is not None:
        if len(_PASSED) >= _PASSED_MAX_ENTRIES:
            _PASSED.clear()
        _PASSED[key] = normalized is not weight
    return normalized, normalized_flag


def _aligned_or_empty(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.data_ptr() % ALIGN_BYTES == 0


def check_gather_rows(x, gather_rows, name: str = "gather_rows", source_name: str = "x") -> None:
    """The checks of ``grouped_mm_gather`` (and ``grouped_mm_wgrad_gather``) on row indices into ``x`` (TypeError or
    ValueError naming ``name``, the source ``source_name``): a 1-D int64 tensor on the device of ``x``. Their values
    are not checked here: ``index_select`` raises for one outside ``[0, x.shape[0])`` on the PyTorch path, and the
    CUDA kernel does not look (the op's docstring says why)."""
    if not isinstance(gather_rows, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(gather_rows).__name__}")
    if gather_rows.dtype != torch.int64:
        raise TypeError(f"{name}: expected torch.int64 row indices, got {gather_rows.dtype}")
    if gather_rows.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [M], got shape {tuple(gather_rows.shape)}")
    if isinstance(x, torch.Tensor) and gather_rows.device != x.device:
        raise ValueError(
            f"{name}: expected a tensor on the device of {source_name} ({x.device}), got {gather_rows.device}"
        )


def check_sizes_on_host(m_sizes: torch.Tensor, num_rows: int) -> None:
    """Raise ValueError for negative sizes or ``sum(m_sizes) > M``. Reads the sizes on the host (a sync on CUDA)."""
    sizes = m_sizes.tolist()
    negative = [expert for expert, size in enumerate(sizes) if size < 0]
    if negative:
        raise ValueError(f"m_sizes: expected sizes >= 0, got negative sizes for experts {negative[:8]}")
    if sum(sizes) > num_rows:
        raise ValueError(f"m_sizes: expected sum(m_sizes) <= M = {num_rows} (rows of x), got {sum(sizes)}")


def check_wgrad_inputs(x, grad_y, m_sizes, weight_transposed, main_grad, *, cuda_kernel: bool) -> None:
    """The checks of ``grouped_weight_grad`` and of the weight-gradient ops; ``cuda_kernel`` adds the CUDA kernel's
    dtype and layout rules."""
    for name, value in (("x", x), ("grad_y", grad_y), ("m_sizes", m_sizes)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 2 or grad_y.dim() != 2 or x.shape[0] != grad_y.shape[0]:
        raise ValueError(
            f"x [M, K] and grad_y [M, N] must be 2-D with the same rows, got {tuple(x.shape)} and {tuple(grad_y.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected one of {', '.join(map(str, FLOAT_DTYPES))}, got {x.dtype}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y: expected the dtype of x ({x.dtype}), got {grad_y.dtype}")
    if m_sizes.dim() != 1 or m_sizes.dtype not in SIZE_DTYPES:
        raise TypeError(f"m_sizes: expected a 1-D int32 or int64 tensor, got {m_sizes.dtype} {tuple(m_sizes.shape)}")
    if len({t.device for t in (x, grad_y, m_sizes)}) != 1:
        devices = f"{x.device}, {grad_y.device}, {m_sizes.device}"
        raise ValueError(f"x, grad_y and m_sizes must be on one device, got {devices}")
    expected = (m_sizes.shape[0], x.shape[1], grad_y.shape[1])
    expected = expected if weight_transposed else (expected[0], expected[2], expected[1])
    if main_grad is not None:
        if not isinstance(main_grad, torch.Tensor) or main_grad.dtype != torch.float32:
            raise TypeError(f"main_grad: expected a torch.float32 tensor, got {getattr(main_grad, 'dtype', main_grad)}")
        if tuple(main_grad.shape) != expected or main_grad.device != x.device:
            got = f"{tuple(main_grad.shape)} on {main_grad.device}"
            raise ValueError(f"main_grad: expected shape {expected} on {x.device}, got {got}")
    if cuda_kernel:
        if x.dtype not in GEMM_DTYPES:
            raise TypeError(f"x: the CUDA kernel supports torch.bfloat16 and torch.float16, got {x.dtype}")
        for name, tensor in (("x", x), ("grad_y", grad_y), ("main_grad", main_grad)):
            problem = None if tensor is None else kernel_layout_problem(tensor)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")


# FP8 operands: float8_e4m3fn values with float32 scales, one per row (x) or output channel (weight), or one per
# row and 128 columns (x) or 128 x 128 block (weight), as DeepSeek-V3's checkpoints and DeepGEMM.
FP8_DTYPE = torch.float8_e4m3fn
FP8_GROUP = 128
FP8_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fp8_groups(size: int) -> int:
    """``ceil(size / 128)``: the scales along a dimension of ``size`` elements, the last group partial."""
    return -(-size // FP8_GROUP)


def validate_fp8(x, x_scale, weight, weight_scale, m_sizes, weight_transposed, out_dtype):
    """All checks of ``grouped_forward_fp8`` (TypeError or ValueError naming the argument, saying what was expected and
    what was given). The CUDA kernel's own rules (N and K multiples of 16, 16-byte rows, [E, N, K] memory) refuse
    nothing: its router (``_ops.grouped_mm_fp8_cuda``) sends what the kernel cannot take to the PyTorch ops. Returns ``(weight, weight_scale, weight_transposed)`` to pass on: a weight whose memory is the
    other layout is read through its transposed view (``normalize_weight_layout``), its block scales transposed alike.
    """
    tensors = {"x": x, "x_scale": x_scale, "weight": weight, "weight_scale": weight_scale, "m_sizes": m_sizes}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    for name, value in (("x", x), ("weight", weight)):
        if value.dtype != FP8_DTYPE:
            raise TypeError(
                f"{name}: expected torch.float8_e4m3fn, got {value.dtype}; moe_gemm.quantize_fp8 gives the values "
                f"and their scales"
            )
    for name, value in (("x_scale", x_scale), ("weight_scale", weight_scale)):
        if value.dtype != torch.float32:
            raise TypeError(f"{name}: expected torch.float32 scales, got {value.dtype}")
    if out_dtype is not None and out_dtype not in FP8_OUT_DTYPES:
        raise TypeError(f"out_dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    scales = (("x_scale", x_scale), ("weight_scale", weight_scale))
    _check_grouped_shapes(x, weight, m_sizes, weight_transposed, "x", "weight", scales)

    num_rows, k = x.shape
    per_row, per_group = (num_rows,), (num_rows, fp8_groups(k))
    if tuple(x_scale.shape) not in (per_row, per_group):
        raise ValueError(
            f"x_scale: expected [M] = {per_row} (one scale per row) or [M, ceil(K / 128)] = {per_group} (one per row "
            f"and 128 columns) for x of shape {tuple(x.shape)}, got {tuple(x_scale.shape)}"
        )
    num_experts, n = weight.shape[0], weight.shape[2] if weight_transposed else weight.shape[1]
    per_channel, per_block = (num_experts, n), (num_experts, *map(fp8_groups, weight.shape[1:]))
    blocks = "[E, ceil(K / 128), ceil(N / 128)]" if weight_transposed else "[E, ceil(N / 128), ceil(K / 128)]"
    if tuple(weight_scale.shape) not in (per_channel, per_block):
        raise ValueError(
            f"weight_scale: expected [E, N] = {per_channel} (one scale per output channel) or {blocks} = {per_block} "
            f"(one per 128 x 128 block) for weight {_weight_layout(weight_transposed)} of shape "
            f"{tuple(weight.shape)}, got {tuple(weight_scale.shape)}"
        )

    normalized, flag = normalize_weight_layout(weight, weight_transposed)
    if normalized is not weight and weight_scale.dim() == 3:
        weight_scale = weight_scale.transpose(-1, -2)
    return normalized, weight_scale, flag


def check_quantize_fp8(x, group) -> None:
    """The checks of ``quantize_fp8``: a 2-D float tensor, ``group`` 128 or None."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected one of {', '.join(map(str, FLOAT_DTYPES))}, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if group is not None and (isinstance(group, bool) or group != FP8_GROUP):
        raise ValueError(
            f"group: expected 128 (one scale per row and 128 columns) or None (one scale per row), got {group!r}"
        )


def check_no_grad(function: str, tensors: dict) -> None:
    """ValueError for a tensor of ``tensors`` (name -> tensor) that requires grad while grad mode is on: ``function``
    has no backward, and a result silently cut off from the autograd graph would hide it."""
    if not torch.is_grad_enabled():
        return
    for name, value in tensors.items():
        if value.requires_grad:
            raise ValueError(
                f"{name}: {function} has no backward (FP8 experts train through experts_forward_fp8), got a "
                f"tensor that requires grad; pass {name}.detach() or call it under torch.no_grad()"
            )


def check_route_options(num_experts, top_k, scoring, n_group, topk_group, has_correction_bias=False) -> None:
    """The checks of ``route`` that need no tensor, for ``num_experts`` experts: also what the MoE layer checks at
    construction. ValueError with ``route``'s messages."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if scoring != "sigmoid":
        if n_group is not None or topk_group is not None or has_correction_bias:
            raise ValueError("n_group, topk_group and e_score_correction_bias apply to scoring='sigmoid' only")
        return
    if (n_group is None) != (topk_group is None):
        raise ValueError("n_group and topk_group go together")
    if n_group is not None:
        if n_group < 1 or num_experts % n_group != 0 or not 1 <= topk_group <= n_group:
            raise ValueError(
                f"need n_group dividing {num_experts} and 1 <= topk_group <= n_group, got {n_group}, {topk_group}"
            )
        # Only the experts of the kept groups can be chosen; past them route would weight excluded experts.
        group_size = num_experts // n_group
        if top_k > topk_group * group_size:
            raise ValueError(
                f"top_k = {top_k} experts cannot come from topk_group = {topk_group} groups of E / n_group = "
                f"{num_experts} / {n_group} = {group_size} experts (at most {topk_group * group_size})"
            )


def check_route_arguments(router_logits, top_k, scoring, n_group, topk_group, e_score_correction_bias) -> None:
    """The checks of ``route`` and of the route op's PyTorch kernel: ValueError saying what is wrong."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a floating-point [T, E] tensor, got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    check_route_options(num_experts, top_k, scoring, n_group, topk_group, e_score_correction_bias is not None)
    bias = e_score_correction_bias
    if bias is not None and (tuple(bias.shape) != (num_experts,) or bias.device != router_logits.device):
        raise ValueError(
            f"e_score_correction_bias must be [{num_experts}] on the device of router_logits ({router_logits.device}), "
            f"got {tuple(bias.shape)} on {bias.device}"
        )
