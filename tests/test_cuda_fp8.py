"""The rowwise FP8 CUDA kernel (``_grouped_mm_fp8_rowwise``, reached through ``grouped_forward_fp8``'s router):
against the float64 reference of its dequantized operands on fresh random data, NaN-poisoned outputs, experts
without rows and ending mid-tile, tails of at most 64 rows, sizes summing short of M, both tile configurations, K and
N at the 16-element limit; the router's other cases on the PyTorch path; CUDA-graph replay with new sizes; opcheck and
torch.compile."""

import pytest
import torch
from helpers import assert_close_to_reference, requires_cuda_op

import moe_gemm
from moe_gemm import _ops
from moe_gemm.reference import grouped_mm_fp8_reference
from moe_gemm.testing import plan_override

pytestmark = [pytest.mark.gpu, requires_cuda_op,
              pytest.mark.skipif(not _ops.FP8_KERNEL_BUILT, reason="the FP8 kernel is not built")]  # fmt: skip


def rowwise_problem(sizes, n, k, num_rows=None, seed=0):
    """x quantized per row, weight per output channel (both by quantize_fp8 with group None), on the GPU."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = sum(max(size, 0) for size in sizes) if num_rows is None else num_rows
    x, x_scale = moe_gemm.quantize_fp8(torch.randn(num_rows, k, generator=generator).bfloat16(), group=None)
    weight_high = torch.randn(len(sizes), n, k, generator=generator) * torch.rand(len(sizes), n, 1, generator=generator)
    weight, weight_scale = moe_gemm.quantize_fp8(weight_high.reshape(-1, k), group=None)
    cuda = {"device": "cuda"}
    return (x.to(**cuda), x_scale.to(**cuda), weight.view(len(sizes), n, k).to(**cuda),
            weight_scale.view(len(sizes), n).to(**cuda), torch.tensor(sizes, **cuda))  # fmt: skip


def run_poisoned(x, x_scale, weight, weight_scale, m_sizes):
    poison = torch.full((x.shape[0] * weight.shape[1] + 4096,), float("nan"), device="cuda", dtype=torch.bfloat16)
    del poison  # the caching allocator hands this NaN block to the output
    assert _ops._fp8_rowwise_kernel_applies(x, x_scale, weight, weight_scale, False, None), "the kernel's case"
    out = moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes)
    op = torch.ops.moe_gemm._grouped_mm_fp8_rowwise.default
    assert torch.equal(out, op(x, x_scale, weight, weight_scale, m_sizes)), "not bitwise reproducible"
    return out


@pytest.mark.parametrize("config", ["128x256", "128x128"])
@pytest.mark.parametrize(
    "sizes, n, k",
    [
        ([0, 5, 300, 0, 17], 256, 512),       # ragged, empty experts, tails under 64 rows
        ([1, 64, 65, 300, 2, 193, 63], 2880, 576),  # around the 64-row half tile, N ending mid-tile
        ([1000], 144, 16),                    # E = 1, one partial k-block, N at the 16 limit
        ([7, 0, 129], 4096, 7168),            # DeepSeek-V3's K: 56 k-blocks
    ],
)
def test_matches_the_float64_reference(sizes, n, k, config):
    x, x_scale, weight, weight_scale, m_sizes = rowwise_problem(sizes, n, k)
    with plan_override(tile_config=config):
        out = run_poisoned(x, x_scale, weight, weight_scale, m_sizes)
    reference = grouped_mm_fp8_reference(x.cpu(), x_scale.cpu(), weight.cpu(), weight_scale.cpu(), sizes, False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close_to_reference(out.float().cpu(), reference, dtype=torch.bfloat16)


def test_rows_past_the_experts_are_zero_and_never_read():
    sizes = [5, 0, 40]
    x, x_scale, weight, weight_scale, m_sizes = rowwise_problem(sizes, 256, 256, num_rows=70)
    x_scale[45:] = float("nan")  # rows 45.. belong to no expert: their scales must not reach the output
    out = run_poisoned(x, x_scale, weight, weight_scale, m_sizes)
    assert torch.equal(out[45:], torch.zeros_like(out[45:]))
    reference = grouped_mm_fp8_reference(x.cpu(), x_scale.cpu(), weight.cpu(), weight_scale.cpu(), sizes, False)
    assert_close_to_reference(out[:45].float().cpu(), reference[:45], dtype=torch.bfloat16)


def test_other_cases_take_the_pytorch_path():
    x, x_scale, weight, weight_scale, m_sizes = rowwise_problem([10, 20], 256, 256)
    blocks = torch.rand(2, 2, 2, device="cuda") + 0.5
    assert not _ops._fp8_rowwise_kernel_applies(x, x_scale, weight, blocks, False, None)
    assert not _ops._fp8_rowwise_kernel_applies(x, x_scale, weight, weight_scale, False, torch.float32)
    out = moe_gemm.grouped_forward_fp8(x, x_scale, weight, blocks, m_sizes)
    reference = grouped_mm_fp8_reference(x.cpu(), x_scale.cpu(), weight.cpu(), blocks.cpu(), [10, 20], False)
    assert_close_to_reference(out.float().cpu(), reference, dtype=torch.bfloat16)


def test_cuda_graph_replay_with_new_sizes():
    x, x_scale, weight, weight_scale, m_sizes = rowwise_problem([100, 28, 0], 512, 256)
    run = lambda: moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    m_sizes.copy_(torch.tensor([3, 0, 125], device="cuda"))
    graph.replay()
    reference = grouped_mm_fp8_reference(x.cpu(), x_scale.cpu(), weight.cpu(), weight_scale.cpu(), [3, 0, 125], False)
    assert_close_to_reference(out.float().cpu(), reference, dtype=torch.bfloat16)


def test_opcheck_and_compile():
    x, x_scale, weight, weight_scale, m_sizes = rowwise_problem([10, 22], 256, 128)
    torch.library.opcheck(torch.ops.moe_gemm._grouped_mm_fp8_rowwise.default,
                          (x, x_scale, weight, weight_scale, m_sizes),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
    compiled = torch.compile(moe_gemm.grouped_forward_fp8, fullgraph=True)
    assert torch.equal(compiled(x, x_scale, weight, weight_scale, m_sizes),
                       moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes))  # fmt: skip
