"""The registry (``moe_gemm/_ops.py``): every op defined with its schema, ``kernels_available`` and its reason, the
PyTorch path on a CUDA GPU that is not sm_90 (simulated on CPU with fake CUDA tensors and a patched capability query),
the ops' PyTorch kernels checking their inputs as the CUDA kernels do, the fake kernels of the CUDA-only ops, and the
layer's private GEMM entry points."""

import contextlib
import inspect
import warnings

import pytest
import torch
from helpers import assert_close_to_reference, make_problem
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_gemm
from moe_gemm import _ops, _validation, functional
from moe_gemm.reference import ROUTE_OPTIONS, grouped_mm_reference, grouped_mm_wgrad_reference


def test_every_op_has_its_schema():
    for name, schema in _ops.SCHEMAS.items():
        op = getattr(torch.ops.moe_gemm, name).default
        assert str(op._schema) == f"moe_gemm::{name}{schema}"
    assert "str scoring" in _ops.SCHEMAS["route"] and "int? n_group" in _ops.SCHEMAS["route"]
    assert "str act" in _ops.SCHEMAS["gated_activation"]


def test_no_kernels_on_a_cpu_device():
    assert not moe_gemm.kernels_available(torch.device("cpu"))
    assert "CUDA devices" in _ops.kernels_unavailable_reason("cpu")
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in _ops.kernels_unavailable_reason()
        assert "CUDA kernels: unavailable (no CUDA GPU is visible" in moe_gemm.build_info()


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(capability)``: pretend the extension is loaded and every CUDA device has that compute capability."""
    queries = []

    def install(capability, name="NVIDIA A100-SXM4-80GB"):
        monkeypatch.setattr(_ops, "_C", object())
        monkeypatch.setattr(_ops, "_device_capability", lambda index: queries.append(index) or capability)
        monkeypatch.setattr(_ops, "_device_name", lambda index: name)
        monkeypatch.setattr(_ops, "_DEVICE_PROBLEMS", {})
        monkeypatch.setattr(_ops, "_fallback_warned", False)
        return queries

    return install


def test_a_gpu_that_is_not_sm90_is_refused_once_per_device(gpu):
    queries = gpu((8, 0))
    reason = _ops.kernels_unavailable_reason("cuda:0")
    assert "NVIDIA A100-SXM4-80GB" in reason and "compute capability 8.0" in reason and "sm_90a" in reason
    assert not _ops.kernels_available(torch.device("cuda", 0))
    assert not _ops.kernels_available("cuda:1")
    assert queries == [0, 1], "the capability is read once per device"


def test_an_sm90_gpu_with_the_extension_runs_the_kernels(gpu):
    gpu((9, 0), name="NVIDIA H200")
    assert _ops.kernels_available("cuda:0")
    assert _ops.kernels_unavailable_reason(torch.device("cuda", 0)) is None
    assert _ops.gemm_op("grouped_mm", torch.device("cuda", 0)) is torch.ops.moe_gemm.grouped_mm.default


def test_the_fallback_warns_once_per_process_naming_the_gpu(gpu):
    gpu((8, 6), name="NVIDIA RTX A6000")
    with pytest.warns(RuntimeWarning, match=r"NVIDIA RTX A6000, compute capability 8\.6"):
        assert not _ops.use_kernels(torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _ops.use_kernels(torch.device("cuda", 0))
        assert not _ops.use_kernels(torch.device("cpu"))


@contextlib.contextmanager
def fake_cuda_mode(monkeypatch):
    """Enters a FakeTensorMode, in which tensors live on "cuda" without a GPU and any host read of a value (a sync)
    raises, and returns ``make(*shape, dtype=torch.bfloat16)``. Fake tensors have no data pointer: the alignment
    check takes them as aligned, as the allocator's blocks are."""
    monkeypatch.setattr(_validation, "_is_aligned", lambda tensor: True)
    with FakeTensorMode():
        yield lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="cuda")


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_grouped_forward_on_a_non_sm90_gpu_takes_torch_grouped_mm_without_a_sync(gpu, monkeypatch, transposed):
    gpu((8, 0))
    torch_path = _spy(monkeypatch, _ops, "grouped_mm_torch")
    torch_grouped_mm = _spy(monkeypatch, torch, "_grouped_mm")
    with fake_cuda_mode(monkeypatch) as make:
        x, m_sizes = make(64, 32), make(4, dtype=torch.int64)
        weight = make(4, 32, 16) if transposed else make(4, 16, 32)
        with pytest.warns(RuntimeWarning, match="compute capability 8.0"):
            y = moe_gemm.grouped_forward(x, weight, m_sizes, weight_transposed=transposed)
        grad_w = moe_gemm.grouped_weight_grad(x, make(64, 16), m_sizes, weight_transposed=transposed)
    assert y.shape == (64, 16) and y.device.type == "cuda"
    assert grad_w.shape == weight.shape
    assert torch_path == ["grouped_mm_torch"] and torch_grouped_mm == ["_grouped_mm", "_grouped_mm"]


def test_backward_on_a_non_sm90_gpu_takes_the_torch_path(gpu, monkeypatch):
    # The autograd engine cannot run on fake CUDA tensors without CUDA: the backward's GEMMs are called directly.
    gpu((8, 0))
    forward_calls = _spy(monkeypatch, _ops, "grouped_mm_torch")
    wgrad_calls = _spy(monkeypatch, _ops, "grouped_mm_wgrad_torch")
    with fake_cuda_mode(monkeypatch) as make:
        x, weight, m_sizes = make(64, 32), make(4, 16, 32), make(4, dtype=torch.int64)
        grad_x, grad_w = _ops.grouped_mm_backward(make(64, 16), x, weight, m_sizes, False, True, True)
    assert grad_x.shape == x.shape and grad_w.shape == weight.shape
    assert forward_calls == ["grouped_mm_torch"] and wgrad_calls == ["grouped_mm_wgrad_torch"]


def test_route_on_a_non_sm90_gpu_takes_the_tensor_ops(gpu, monkeypatch):
    gpu((8, 0))
    torch_ops = []

    def route_torch(router_logits, top_k, *options):
        # The tensor ops themselves slice, which fake CUDA tensors cannot do without CUDA: only the path is checked.
        torch_ops.append("route_torch")
        shape = (router_logits.shape[0], top_k)
        return router_logits.new_empty(shape), router_logits.new_empty(shape, dtype=torch.int64)

    monkeypatch.setattr(_ops, "route_torch", route_torch)
    with FakeTensorMode():
        logits = torch.empty(10, 64, device="cuda")
        with pytest.warns(RuntimeWarning, match="NVIDIA A100"):
            weights, ids = moe_gemm.route(logits, 6, scoring="sigmoid", n_group=8, topk_group=4)
    assert torch_ops == ["route_torch"] and weights.shape == ids.shape == (10, 6)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_the_layer_kernels_apply_on_sm90_only(gpu, capability):
    gpu(capability)
    sm90 = capability == (9, 0)
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = torch.empty(8, 2, dtype=torch.int64, device="cuda")
        gate_up = torch.empty(16, 64, dtype=torch.bfloat16, device="cuda")
        y_sorted = torch.empty(16, 32, dtype=torch.bfloat16, device="cuda")
        assert _ops.dispatch_kernel_applies(ids, 8) == sm90
        assert _ops.gated_activation_kernel_applies(gate_up, "silu") == sm90
        assert _ops.combine_kernel_applies(y_sorted, torch.empty(8, 2, device="cuda"), ids) == sm90
        assert _ops.route_kernel_applies(torch.empty(8, 64, device="cuda"), 6, None) == sm90


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_the_weight_quantize_kernel_takes_stored_weights_and_their_transposes_on_sm90(gpu, monkeypatch, capability):
    gpu(capability)
    monkeypatch.setattr(_ops, "QUANTIZE_FP8_WEIGHT_KERNEL_BUILT", True)
    torch_path = _spy(monkeypatch, moe_gemm.layer_fp8, "quantize_fp8_weight_torch")
    sm90 = capability == (9, 0)
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch.empty(4, 256, 384, dtype=torch.bfloat16, device="cuda")
        assert _ops.quantize_fp8_weight_kernel_applies(weight) == sm90
        assert _ops.quantize_fp8_weight_kernel_applies(weight.transpose(1, 2)) == sm90
        assert _ops.quantize_fp8_weight_kernel_applies(weight.float()) == sm90
        rows_of_382 = torch.empty(4, 256, 382, dtype=torch.bfloat16, device="cuda")  # not a multiple of 8
        assert not _ops.quantize_fp8_weight_kernel_applies(rows_of_382)
        every_other = torch.empty_strided((4, 128, 192), (256 * 384, 768, 2), dtype=torch.bfloat16, device="cuda")
        assert not _ops.quantize_fp8_weight_kernel_applies(every_other)  # neither direction contiguous
        assert not _ops.quantize_fp8_weight_kernel_applies(weight.double())
        if sm90:  # (the PyTorch path cannot run on fake CUDA tensors without CUDA)
            values, scale = moe_gemm.quantize_fp8_weight(weight.transpose(1, 2))
            assert values.shape == (4, 384, 256) and values.dtype == torch.float8_e4m3fn
            assert scale.shape == (4, 3, 2) and scale.dtype == torch.float32
    assert torch_path == []


def test_the_fake_kernels_of_the_cuda_only_ops():
    with FakeTensorMode():
        ids = torch.empty(8, 2, dtype=torch.int64, device="cuda")
        outputs = torch.ops.moe_gemm.dispatch_pairs(ids, 5)
        assert [tuple(t.shape) for t in outputs] == [(5,), (16,), (16,), (16,), (16,)]
        assert all(t.dtype == torch.int64 for t in outputs)
        values, scale = torch.ops.moe_gemm._quantize_fp8_weight_kernel(torch.empty(3, 200, 72, device="cuda"))
        assert values.shape == (3, 200, 72) and values.dtype == torch.float8_e4m3fn
        assert scale.shape == (3, 2, 1) and scale.dtype == torch.float32
        gate_up = torch.empty(16, 64, dtype=torch.bfloat16, device="cuda")
        assert torch.ops.moe_gemm.gated_activation(gate_up, "gelu_tanh", False).shape == (16, 32)
        y_sorted = torch.empty(16, 24, dtype=torch.bfloat16, device="cuda")
        out = torch.ops.moe_gemm.combine_rows(y_sorted, outputs[4], torch.empty(8, 2, device="cuda"), ids, 5)
        assert out.shape == (8, 24) and out.dtype == torch.bfloat16


OP_INPUT_CASES = {
    "grouped_mm K differs": (
        lambda: torch.ops.moe_gemm.grouped_mm(torch.randn(6, 16), torch.randn(2, 8, 12), torch.tensor([3, 3])),
        ValueError, r"x: expected K = 12",
    ),
    "grouped_mm dtypes differ": (
        lambda: torch.ops.moe_gemm.grouped_mm(torch.randn(6, 16), torch.randn(2, 8, 16).double(), torch.tensor([3, 3])),
        TypeError, r"weight: expected the dtype of x",
    ),
    "grouped_mm one size per expert": (
        lambda: torch.ops.moe_gemm.grouped_mm(torch.randn(6, 16), torch.randn(2, 8, 16), torch.tensor([6])),
        ValueError, r"m_sizes: expected one size per expert, E = 2",
    ),
    "grouped_mm float sizes": (
        lambda: torch.ops.moe_gemm.grouped_mm(torch.randn(6, 16), torch.randn(2, 8, 16), torch.tensor([3.0, 3.0])),
        TypeError, r"m_sizes: expected torch.int32 or torch.int64",
    ),
    "wgrad rows differ": (
        lambda: torch.ops.moe_gemm.grouped_mm_wgrad(torch.randn(6, 16), torch.randn(5, 8), torch.tensor([3, 3])),
        ValueError, r"x \[M, K\] and grad_y \[M, N\] must be 2-D with the same rows",
    ),
    "wgrad_accumulate_ buffer dtype": (
        lambda: torch.ops.moe_gemm.grouped_mm_wgrad_accumulate_(
            torch.zeros(2, 8, 16, dtype=torch.bfloat16), torch.randn(6, 16), torch.randn(6, 8), torch.tensor([3, 3])
        ),
        TypeError, r"main_grad: expected a torch.float32",
    ),
    "wgrad_accumulate_ buffer shape": (
        lambda: torch.ops.moe_gemm.grouped_mm_wgrad_accumulate_(
            torch.zeros(2, 16, 8), torch.randn(6, 16), torch.randn(6, 8), torch.tensor([3, 3])
        ),
        ValueError, r"main_grad: expected shape \(2, 8, 16\)",
    ),
    "route scoring": (
        lambda: torch.ops.moe_gemm.route(torch.randn(4, 16), 2, "relu", False, None, None, None, 1.0),
        ValueError, r"scoring must be one of",
    ),
    "route groups that cannot supply top_k": (
        lambda: torch.ops.moe_gemm.route(torch.randn(4, 16), 8, "sigmoid", False, 4, 1, None, 1.0),
        ValueError, r"top_k = 8 experts cannot come from topk_group = 1 groups",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OP_INPUT_CASES))
def test_the_ops_pytorch_kernels_check_their_inputs(case):
    call, error, message = OP_INPUT_CASES[case]
    with pytest.raises(error, match=message):
        call()


def test_route_options_are_the_keywords_of_route():
    parameters = inspect.signature(moe_gemm.route).parameters.values()
    keywords = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == ROUTE_OPTIONS and list(keywords) == list(ROUTE_OPTIONS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_the_pytorch_path_matches_the_reference(dtype, transposed):
    # Expert 1 is empty, expert 3 has a negative size, rows 25.. belong to no expert.
    sizes, num_rows = [7, 0, 12, -3, 6], 30
    problem = make_problem(sizes, n=24, k=40, dtype=dtype, transposed=transposed, num_rows=num_rows)
    y = _ops.grouped_mm_torch(problem.x, problem.weight, problem.m_sizes, transposed)
    assert y.dtype == dtype and torch.equal(y[25:], torch.zeros_like(y[25:]))
    assert_close_to_reference(y, problem.reference())
    grad_y = torch.randn(num_rows, 24).to(dtype)
    grad_w = _ops.grouped_mm_wgrad_torch(problem.x, grad_y, problem.m_sizes, transposed)
    assert grad_w.dtype == dtype and not grad_w[1].any() and not grad_w[3].any()
    assert_close_to_reference(grad_w, grouped_mm_wgrad_reference(problem.x, grad_y, sizes, transposed))


def test_expert_gemm_reads_the_other_layout_through_a_view_and_names_the_callers_arguments():
    problem = make_problem([5, 0, 7], n=16, k=32, dtype=torch.float32)
    weight_kn = problem.weight.transpose(-1, -2).contiguous()
    y, weight_read, flag = functional._expert_gemm(problem.x, weight_kn.transpose(-1, -2), problem.m_sizes, False)
    assert flag is True and weight_read.data_ptr() == weight_kn.data_ptr() and weight_read.is_contiguous()
    assert_close_to_reference(y, problem.reference())

    grad_y = torch.randn_like(y)
    grad_x, grad_w = functional._expert_gemm_backward(grad_y, problem.x, weight_read, problem.m_sizes, flag, True, True)
    assert_close_to_reference(grad_x, grouped_mm_reference(grad_y, weight_read, problem.m_sizes, not flag))
    expected = grouped_mm_wgrad_reference(problem.x, grad_y, problem.m_sizes, flag)
    assert_close_to_reference(grad_w, expected)
    assert functional._expert_gemm_backward(grad_y, problem.x, weight_read, problem.m_sizes, flag, False, False) == (
        None,
        None,
    )

    with pytest.raises(ValueError, match=r"^hidden: expected K = 32 columns to match gate_up_proj"):
        functional._expert_gemm(
            problem.x[:, :24], problem.weight, problem.m_sizes, False, x_name="hidden", weight_name="gate_up_proj"
        )
    with pytest.raises(TypeError, match=r"^down_proj: expected the dtype of hidden \(torch.float32\)"):
        functional._expert_gemm(
            problem.x, problem.weight.double(), problem.m_sizes, False, x_name="hidden", weight_name="down_proj"
        )


def test_expert_gemm_honours_moe_gemm_check(monkeypatch):
    problem = make_problem([5, 7], n=16, k=32, dtype=torch.float32)
    monkeypatch.setenv("MOE_GEMM_CHECK", "1")
    with pytest.raises(ValueError, match="m_sizes: expected sum"):
        functional._expert_gemm(problem.x, problem.weight, torch.tensor([5, 8]), False)


def test_the_fallback_warning_names_the_callers_line(gpu, monkeypatch):
    # route -> the op -> torch's dispatcher -> the op's PyTorch kernel -> use_kernels; and functional's helper ->
    # use_kernels: either way the warning points at this file, not inside moe_gemm or torch.
    gpu((8, 0))
    monkeypatch.setattr(_ops, "route_torch", lambda logits, top_k, *options: (logits.new_empty(10, top_k),) * 2)
    with FakeTensorMode(), pytest.warns(RuntimeWarning, match="NVIDIA A100") as record:
        moe_gemm.route(torch.empty(10, 64, device="cuda"), 6)
    assert [warning.filename for warning in record] == [__file__]
    monkeypatch.setattr(_ops, "_fallback_warned", False)
    with FakeTensorMode(), pytest.warns(RuntimeWarning, match="NVIDIA A100") as record:
        functional._kernels_for(torch.empty(4, device="cuda"))
    assert [warning.filename for warning in record] == [__file__]


def test_torch_grouped_mm_is_not_called_where_torch_lacks_it(gpu, monkeypatch):
    gpu((8, 0))
    monkeypatch.delattr(torch, "_grouped_mm")
    with FakeTensorMode():
        x = torch.empty(64, 32, dtype=torch.bfloat16, device="cuda")
        weight = torch.empty(4, 16, 32, dtype=torch.bfloat16, device="cuda")
        assert not _ops._torch_grouped_mm_applies(x, weight, 16)


@pytest.mark.skipif(not torch.__version__.startswith("2.13."), reason="what torch 2.13 does")
def test_torch_2_13_grouped_mm_refuses_a_float32_output_of_bfloat16():
    a = torch.ones(8, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="output dtype must match"):
        torch._grouped_mm(a.t(), a, offs=torch.tensor([8], dtype=torch.int32), out_dtype=torch.float32)
    assert not _ops._grouped_mm_float32_output(torch.device("cpu"))


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
def test_main_grad_takes_one_float32_grouped_mm_where_torch_offers_it(monkeypatch, transposed):
    # A torch whose _grouped_mm writes float32 products of bfloat16 (as torch 2.13 does not), and NaN into the groups
    # without rows: the experts that own no row must add exactly nothing.
    calls = []

    def grouped_mm(a, b, offs, out_dtype):
        calls.append(out_dtype)
        out = torch.full((offs.shape[0], a.shape[0], b.shape[1]), float("nan"), dtype=out_dtype)
        start = 0
        for group, end in enumerate(offs.tolist()):
            if end > start:
                out[group] = a[:, start:end].to(out_dtype) @ b[start:end].to(out_dtype)
            start = end
        return out

    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm, raising=False)
    monkeypatch.setattr(_ops, "_torch_grouped_mm_applies", lambda a, b, out_columns: True)
    monkeypatch.setattr(_ops, "_grouped_mm_float32_output", lambda device: True)
    monkeypatch.setattr(_ops, "grouped_mm_wgrad_reference", None)  # the per-expert loop must not run
    sizes, num_rows = [9, 0, 17, -4, 22, 6], 48
    x = torch.randn(num_rows, 32, dtype=torch.bfloat16)
    grad_y = torch.randn(num_rows, 16, dtype=torch.bfloat16)
    expected = grouped_mm_wgrad_reference(x, grad_y, sizes, transposed)
    main_grad = torch.ones(expected.shape)
    _ops.grouped_mm_wgrad_accumulate_torch(main_grad, x, grad_y, torch.tensor(sizes), transposed)
    assert calls == [torch.float32]
    torch.testing.assert_close(main_grad, expected.float() + 1, rtol=1e-5, atol=1e-4)
    # Expert 1 is empty, 3 negative, 5 starts past the last row.
    for expert in (1, 3, 5):
        assert torch.equal(main_grad[expert], torch.ones_like(main_grad[expert]))


def test_the_pytorch_path_multiplies_bfloat16_in_bfloat16(monkeypatch):
    dtypes = []
    mm = torch.mm

    def spy(a, b, **kwargs):
        dtypes.append((a.dtype, b.dtype))
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    x = torch.randn(48, 32, dtype=torch.bfloat16)
    weight = torch.randn(3, 16, 32, dtype=torch.bfloat16)
    m_sizes = torch.tensor([20, 0, 28])
    moe_gemm.grouped_forward(x, weight, m_sizes)
    moe_gemm.grouped_weight_grad(x, torch.randn(48, 16, dtype=torch.bfloat16), m_sizes)
    assert len(dtypes) == 4 and set(dtypes) == {(torch.bfloat16, torch.bfloat16)}
