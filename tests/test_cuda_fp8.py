"""The FP8 CUDA kernels. The GEMM (``_grouped_mm_fp8_kernel``, reached through ``grouped_forward_fp8``'s router),
with rowwise scales (x per row, weight per output channel) and blockwise ones (weight per 128 x 128 block, x per row
and 128 columns or per row): against the float64 reference of its dequantized operands on fresh random data whose
magnitude varies from block to block (a scale read from the wrong block shows), NaN-poisoned outputs, experts without
rows and ending mid-tile, tails of at most 64 rows, sizes summing short of M, every tile (the two blockwise ones
bitwise equal), K and N at the 16-element limit and ending mid-block; the router's other cases on the PyTorch path;
CUDA-graph replay with new sizes; opcheck and torch.compile. The quantization (``_quantize_fp8_kernel``, reached
through ``quantize_fp8``): bit for bit the PyTorch ops' result, zeros, NaN, inf and subnormal results included, on
strided rows too."""

import pytest
import torch
from helpers import assert_close_to_reference, requires_cuda_op

import moe_gemm
from moe_gemm import _ops
from moe_gemm.layer_fp8 import quantize_fp8_weight
from moe_gemm.reference import grouped_mm_fp8_reference
from moe_gemm.testing import plan_override

pytestmark = [pytest.mark.gpu, requires_cuda_op,
              pytest.mark.skipif(not _ops.FP8_KERNEL_BUILT, reason="the FP8 kernel is not built")]  # fmt: skip

# x_scale, weight_scale: "rows" [M], "channels" [E, N], "groups" [M, ceil(K/128)], "blocks" [E, ceil(N/128), ...].
SCALINGS = {
    "rowwise": ("rows", "channels"),
    "blockwise": ("groups", "blocks"),
    "blockwise, x per row": ("rows", "blocks"),
}


def fp8_problem(sizes, n, k, scaling="rowwise", num_rows=None, seed=0):
    """x and weights quantized as ``scaling`` says, on the GPU: ``(x, x_scale, weight, weight_scale, m_sizes)``. The
    values' magnitude varies per 128-column group of x and per 128 x 128 block of the weights (over 2**-6 to 2**6)."""
    x_kind, weight_kind = SCALINGS[scaling]
    generator = torch.Generator().manual_seed(seed)
    num_rows = sum(max(size, 0) for size in sizes) if num_rows is None else num_rows
    groups = (k + 127) // 128

    def block_magnitudes(*shape):
        return 2.0 ** torch.randint(-6, 7, shape, generator=generator).float()

    x_high = torch.randn(num_rows, k, generator=generator)
    x_high *= block_magnitudes(num_rows, groups).repeat_interleave(128, dim=1)[:, :k]
    weight_high = torch.randn(len(sizes), n, k, generator=generator)
    blocks = block_magnitudes(len(sizes), (n + 127) // 128, groups)
    weight_high *= blocks.repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :n, :k]
    x, x_scale = moe_gemm.quantize_fp8(x_high.bfloat16(), group=128 if x_kind == "groups" else None)
    if weight_kind == "channels":
        weight, weight_scale = moe_gemm.quantize_fp8(weight_high.reshape(-1, k), group=None)
        weight, weight_scale = weight.view(len(sizes), n, k), weight_scale.view(len(sizes), n)
    else:
        weight, weight_scale = quantize_fp8_weight(weight_high)
    cuda = {"device": "cuda"}
    return (x.to(**cuda), x_scale.to(**cuda), weight.to(**cuda), weight_scale.to(**cuda),
            torch.tensor(sizes, **cuda))  # fmt: skip


def run_poisoned(x, x_scale, weight, weight_scale, m_sizes):
    numel = x.shape[0] * weight.shape[1]
    poison = torch.full((numel,), float("nan"), device="cuda", dtype=torch.bfloat16)
    poisoned = poison.data_ptr()
    del poison  # the caching allocator hands this NaN block to the output
    assert _ops._fp8_kernel_applies(x, x_scale, weight, weight_scale, False, None), "the kernel's case"
    out = moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes)
    assert numel == 0 or out.data_ptr() == poisoned, "the output did not get the NaN-poisoned block"
    op = torch.ops.moe_gemm._grouped_mm_fp8_kernel.default
    assert torch.equal(out, op(x, x_scale, weight, weight_scale, m_sizes)), "not bitwise reproducible"
    return out


def reference_of(x, x_scale, weight, weight_scale, sizes):
    return grouped_mm_fp8_reference(x.cpu(), x_scale.cpu(), weight.cpu(), weight_scale.cpu(), sizes, False)


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("config", ["128x256", "128x128", "32x128s"])
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 5, 300, 0, 17], 256, 512),       # ragged, empty experts, tails under 64 rows
        ([1, 64, 65, 300, 2, 193, 63], 2880, 576),  # around the 64-row half tile, N ending mid-tile and mid-block
        ([1000], 144, 16),                    # E = 1, one partial k-block, N at the 16 limit
        ([7, 0, 129], 4096, 7168),            # DeepSeek-V3's K: 56 k-blocks
        ([40, 260], 272, 2880),               # GPT-OSS's K: the last k-block and scale group 64 columns wide
    ],
)
def test_matches_the_float64_reference(sizes, n, k, config, scaling):
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem(sizes, n, k, scaling)
    with plan_override(tile_config=config):  # blockwise scales run 32x128s as 128x128
        out = run_poisoned(x, x_scale, weight, weight_scale, m_sizes)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close_to_reference(out.float().cpu(), reference_of(x, x_scale, weight, weight_scale, sizes),
                              dtype=torch.bfloat16)  # fmt: skip


@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([1, 64, 65, 300, 0, 193], 2880, 2880),  # the last 256-column tile's second half past N; a partial k-block
        ([7, 0, 513], 4096, 7168),                # DeepSeek-V3's up-projection
    ],
)
def test_blockwise_tiles_agree_bitwise(sizes, n, k):
    # 128x256 tiles multiply a k-block's two 128-column halves in turn and add each in as 128x128 tiles add their
    # one: the same products and additions in the same order.
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem(sizes, n, k, "blockwise", seed=1)
    outs = []
    for config in ("128x256", "128x128"):
        with plan_override(tile_config=config):
            outs.append(run_poisoned(x, x_scale, weight, weight_scale, m_sizes))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rows_past_the_experts_are_zero_whatever_their_scales(scaling):
    sizes = [5, 0, 40]
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem(sizes, 256, 256, scaling, num_rows=70)
    x_scale[45:] = float("nan")  # rows 45.. belong to no expert: their scales must not reach the output
    out = run_poisoned(x, x_scale, weight, weight_scale, m_sizes)
    assert torch.equal(out[45:], torch.zeros_like(out[45:]))
    reference = reference_of(x, x_scale, weight, weight_scale, sizes)
    assert_close_to_reference(out[:45].float().cpu(), reference[:45], dtype=torch.bfloat16)


@pytest.mark.parametrize("case", ["K not a multiple of 16", "N not a multiple of 16, [E, K, N]", "float32 output"])
def test_what_the_kernel_cannot_take_runs_pytorch_ops(case):
    # The kernel's rules refuse nothing on the GPU: grouped_forward_fp8 computes these as on the CPU.
    k, n = (200, 256) if case.startswith("K") else (256, 40) if case.startswith("N") else (256, 256)
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem([7, 0, 30], n, k, "rowwise")
    transposed = case.startswith("N")
    w = weight.transpose(-1, -2).contiguous() if transposed else weight
    out_dtype = torch.float32 if case == "float32 output" else torch.bfloat16
    assert not _ops._fp8_kernel_applies(x, x_scale, w, weight_scale, transposed, out_dtype)
    out = moe_gemm.grouped_forward_fp8(x, x_scale, w, weight_scale, m_sizes, weight_transposed=transposed,
                                       out_dtype=out_dtype)  # fmt: skip
    assert out.dtype == out_dtype
    assert_close_to_reference(out.float().cpu(), reference_of(x, x_scale, weight, weight_scale, [7, 0, 30]),
                              dtype=torch.bfloat16)  # fmt: skip


def test_other_cases_take_the_pytorch_path():
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem([10, 20], 256, 256, "blockwise")
    channels = torch.rand(2, 256, device="cuda") + 0.5
    assert not _ops._fp8_kernel_applies(x, x_scale, weight, channels, False, None)  # x per group, weight per channel
    assert not _ops._fp8_kernel_applies(x, x_scale, weight, weight_scale, False, torch.float32)
    out = moe_gemm.grouped_forward_fp8(x, x_scale, weight, channels, m_sizes)
    assert_close_to_reference(out.float().cpu(), reference_of(x, x_scale, weight, channels, [10, 20]),
                              dtype=torch.bfloat16)  # fmt: skip


@pytest.mark.parametrize("scaling", ["rowwise", "blockwise"])
def test_cuda_graph_replay_with_new_sizes(scaling):
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem([100, 28, 0], 512, 256, scaling)
    run = lambda: moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    m_sizes.copy_(torch.tensor([3, 0, 125], device="cuda"))
    graph.replay()
    assert_close_to_reference(out.float().cpu(), reference_of(x, x_scale, weight, weight_scale, [3, 0, 125]),
                              dtype=torch.bfloat16)  # fmt: skip


@pytest.mark.parametrize("scaling", ["rowwise", "blockwise"])
def test_opcheck_and_compile(scaling):
    x, x_scale, weight, weight_scale, m_sizes = fp8_problem([10, 22], 256, 128, scaling)
    torch.library.opcheck(torch.ops.moe_gemm._grouped_mm_fp8_kernel.default,
                          (x, x_scale, weight, weight_scale, m_sizes),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
    compiled = torch.compile(moe_gemm.grouped_forward_fp8, fullgraph=True)
    assert torch.equal(compiled(x, x_scale, weight, weight_scale, m_sizes),
                       moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes))  # fmt: skip


def special_rows(num_rows, k, dtype, seed=0):
    """Random rows whose magnitude varies per 128-column group (2**-20 to 2**12, so that some values land among
    e4m3's subnormals), with a zero row, -0.0, a NaN and an inf in the first rows when there is room."""
    generator = torch.Generator().manual_seed(seed)
    groups = (k + 127) // 128
    x = torch.randn(num_rows, k, generator=generator)
    magnitudes = 2.0 ** torch.randint(-20, 13, (num_rows, max(groups, 1)), generator=generator)
    x *= magnitudes.repeat_interleave(128, 1)[:, :k]
    if num_rows >= 4 and k >= 2:
        x[0] = 0.0
        x[1, 0] = -0.0
        x[2, 1] = float("nan")
        x[3, k - 1] = float("inf")
    return x.to(dtype)


def bits(tensor):
    """The tensor's bytes as integers, so that NaNs compare equal to themselves."""
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [128, None])
@pytest.mark.parametrize("num_rows, k", [(0, 256), (5, 0), (37, 2880), (2, 7168), (300, 16), (6, 130)])
def test_the_quantize_kernel_is_bitwise_the_pytorch_ops(num_rows, k, group, dtype):
    assert _ops.QUANTIZE_FP8_KERNEL_BUILT
    x = special_rows(num_rows, k, dtype).cuda()
    x_fp8, x_scale = moe_gemm.quantize_fp8(x, group=group)
    expected_fp8, expected_scale = _ops.quantize_fp8_torch(x, group)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_scale.dtype == torch.float32
    assert x_fp8.shape == expected_fp8.shape and x_scale.shape == expected_scale.shape
    assert torch.equal(bits(x_fp8), bits(expected_fp8)) and torch.equal(bits(x_scale), bits(expected_scale))
    if num_rows >= 4 and k >= 2:  # the NaN and the inf make their groups NaN, never a silent finite value
        assert x_fp8[2].float().isnan().any() and x_fp8[3].float().isnan().any()


@pytest.mark.parametrize("group", [128, None])
def test_the_quantize_kernel_reads_strided_rows(group):
    wide = special_rows(40, 700, torch.bfloat16, seed=1).cuda()
    for x in (wide[:, 50:650], wide[::3, :600], wide[:, :600].t().contiguous().t()):  # row-strided, column-major
        got, expected = moe_gemm.quantize_fp8(x, group=group), _ops.quantize_fp8_torch(x.contiguous(), group)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, expected))


@pytest.mark.parametrize("group", [128, None])
def test_opcheck_quantize_kernel(group):
    x = special_rows(20, 300, torch.bfloat16, seed=2).cuda().nan_to_num(0.0, 0.0, 0.0)
    torch.library.opcheck(torch.ops.moe_gemm._quantize_fp8_kernel.default, (x, group),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
