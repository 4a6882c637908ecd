"""The sm90 weight-gradient kernel (K-grouped: the reduction runs over each expert's rows, read on the GPU) against
the float64 reference, on fresh random data; plus accumulation into float32 main-grads and CUDA-graph replay."""

import pytest
import torch

import moe_gemm
from helpers import assert_close_to_reference, requires_cuda_op
from moe_gemm.reference import grouped_mm_wgrad_reference

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
LAYOUTS = [False, True]  # weight_transposed


def make_inputs(sizes, n, k, dtype, num_rows=None, sizes_dtype=torch.int64):
    num_rows = sum(max(size, 0) for size in sizes) if num_rows is None else num_rows
    x = torch.randn(num_rows, k).to("cuda", dtype)
    grad_y = torch.randn(num_rows, n).to("cuda", dtype)
    return x, grad_y, torch.tensor(sizes, dtype=sizes_dtype, device="cuda")


def wgrad_poisoned(x, grad_y, m_sizes, transposed):
    """The op's result after filling the allocator's free memory with NaN, so unwritten elements show up."""
    poison = torch.full((1 << 26,), float("nan"), device="cuda", dtype=x.dtype)
    del poison
    out = moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, weight_transposed=transposed)
    torch.cuda.synchronize()
    return out


def check(sizes, n, k, dtype=torch.bfloat16, transposed=False, **kwargs):
    x, grad_y, m_sizes = make_inputs(sizes, n, k, dtype, **kwargs)
    out = wgrad_poisoned(x, grad_y, m_sizes, transposed)
    expected = grouped_mm_wgrad_reference(x, grad_y, m_sizes.cpu(), transposed)
    assert out.dtype == dtype and out.shape == expected.shape
    # Row-count-weighted errors: an expert with a few rows has a few-term sum, rounded once to 16 bits.
    assert_close_to_reference(out, expected)
    for expert, rows in enumerate(expected.abs().sum(dim=(1, 2)).tolist()):
        if rows == 0:
            assert torch.equal(out[expert], torch.zeros_like(out[expert])), f"expert {expert} must be exactly zero"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize(
    "sizes",
    [
        [0, 5, 300, 0, 17],        # ragged, not multiples of the 64-row k-block, empty experts
        [0, 0, 0, 1000],           # all rows in the last expert
        [1000, 0, 0, 0],           # all rows in the first expert
        [64, 128, 65, 63, 1],      # at and around the k-block
        [7],                       # E = 1
    ],
)
def test_ragged_and_empty_experts(sizes, transposed, dtype):
    check(sizes, n=256, k=384, dtype=dtype, transposed=transposed)


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
@pytest.mark.parametrize(("n", "k"), [(8, 8), (136, 72), (264, 520)])
def test_n_and_k_off_the_tile(n, k, transposed):
    check([3, 70, 0, 129], n, k, transposed=transposed)


def test_many_experts():
    sizes = torch.randint(0, 6, (512,)).tolist()
    check(sizes, n=64, k=128)


def test_model_shape_with_balanced_routing():
    # Qwen3-30B-A3B's down projection at 256 tokens, top-8 of 128 experts: about 16 rows each.
    ids = torch.rand(256, 128).topk(8, dim=-1).indices.flatten()
    check(torch.bincount(ids, minlength=128).tolist(), n=2048, k=768)


@pytest.mark.parametrize("sizes_dtype", [torch.int32, torch.int64])
def test_sizes_int32_and_int64(sizes_dtype):
    check([9, 0, 77], n=128, k=256, sizes_dtype=sizes_dtype)


def test_rows_past_the_last_group_contribute_nothing():
    check([10, 0, 20], n=128, k=128, num_rows=50)


def test_sizes_summing_past_m_are_clamped():
    # Expert 1 is cut at row 40, expert 2 starts past M and gets zero; a negative size counts as zero.
    check([30, 25, 10, -4], n=128, k=128, num_rows=40)


def test_zero_rows():
    out = check([0, 0, 0], n=64, k=32)
    assert out.abs().sum() == 0


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
def test_accumulate_into_float32_main_grad(transposed):
    sizes = [0, 33, 200, 0, 5]
    x, grad_y, m_sizes = make_inputs(sizes, 192, 320, torch.bfloat16)
    shape = (len(sizes), 320, 192) if transposed else (len(sizes), 192, 320)
    main_grad = torch.randn(shape, device="cuda")
    before = main_grad.clone()
    moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, weight_transposed=transposed, main_grad=main_grad)
    expected = grouped_mm_wgrad_reference(x, grad_y, sizes, transposed)
    assert_close_to_reference(main_grad - before, expected, dtype=torch.bfloat16)
    # The sums are float32: far tighter than a bfloat16 gradient would be.
    error = torch.linalg.vector_norm(main_grad.double() - before.double() - expected)
    assert error <= 1e-5 * torch.linalg.vector_norm(expected)
    for expert in (0, 3):  # no rows: left exactly as they were
        assert torch.equal(main_grad[expert], before[expert])


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_several_tiles_per_cta_with_empty_experts(accumulate):
    # Hundreds of tiles, so every CTA takes several and the stage ring wraps many times, with empty experts in
    # between: written as zeros, or skipped when accumulating.
    generator = torch.Generator().manual_seed(3)
    sizes = [0 if i % 3 == 1 else int(s) for i, s in enumerate(torch.randint(1, 300, (96,), generator=generator))]
    x, grad_y, m_sizes = make_inputs(sizes, 384, 512, torch.bfloat16)
    expected = grouped_mm_wgrad_reference(x, grad_y, sizes)
    if not accumulate:
        out = wgrad_poisoned(x, grad_y, m_sizes, False)
        assert_close_to_reference(out, expected)
        assert torch.equal(out[1::3], torch.zeros_like(out[1::3]))
        return
    main_grad = torch.randn(len(sizes), 384, 512, device="cuda")
    before = main_grad.clone()
    moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, main_grad=main_grad)
    assert_close_to_reference(main_grad - before, expected, dtype=torch.bfloat16)
    assert torch.equal(main_grad[1::3], before[1::3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_and_short_reductions_in_turn(dtype):
    # Long reductions (a 16-bit tile stored under the next tile's MMAs) and short ones (stored at once: fewer
    # k-blocks than store chunks) in turn, empty experts between; 640 tiles, so every CTA runs several.
    sizes = [700, 3, 0, 256, 255, 64, 1000, 0, 190, 513]
    x, grad_y, m_sizes = make_inputs(sizes, 1024, 2048, dtype)
    out = wgrad_poisoned(x, grad_y, m_sizes, False)
    assert_close_to_reference(out, grouped_mm_wgrad_reference(x, grad_y, sizes))


def test_accumulate_into_a_strided_main_grad():
    # main_grad is a column slice of a wider buffer: rows and experts are not contiguous.
    sizes = [40, 0, 90]
    x, grad_y, m_sizes = make_inputs(sizes, 128, 256, torch.float16)
    storage = torch.randn(3, 128, 256 + 64, device="cuda")
    main_grad = storage[:, :, :256]
    before = storage.clone()
    moe_gemm.grouped_weight_grad(x, grad_y, m_sizes, main_grad=main_grad)
    expected = grouped_mm_wgrad_reference(x, grad_y, sizes)
    assert_close_to_reference(main_grad - before[:, :, :256], expected, dtype=torch.float16)
    assert torch.equal(storage[:, :, 256:], before[:, :, 256:]), "wrote outside the view"


def test_cuda_graph_replay_with_changed_sizes():
    x, grad_y, m_sizes = make_inputs([100, 0, 50, 6], 128, 256, torch.bfloat16)
    moe_gemm.grouped_weight_grad(x, grad_y, m_sizes)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_gemm.grouped_weight_grad(x, grad_y, m_sizes)
    for sizes in ([100, 0, 50, 6], [0, 156, 0, 0], [1, 2, 3, 150]):
        m_sizes.copy_(torch.tensor(sizes))
        x.copy_(torch.randn_like(x, dtype=torch.float32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(out, grouped_mm_wgrad_reference(x, grad_y, sizes))


@pytest.mark.parametrize("transposed", LAYOUTS, ids=["nk", "kn"])
def test_autograd_uses_the_kernel_gradients(transposed):
    sizes = [17, 0, 130, 64]
    x, grad_out, m_sizes = make_inputs(sizes, 192, 256, torch.bfloat16)
    shape = (4, 256, 192) if transposed else (4, 192, 256)
    weight = (torch.randn(shape, device="cuda") / 16).bfloat16().requires_grad_()
    x.requires_grad_()
    moe_gemm.grouped_forward(x, weight, m_sizes, weight_transposed=transposed).backward(grad_out)
    assert_close_to_reference(weight.grad, grouped_mm_wgrad_reference(x, grad_out, sizes, transposed))
    expected_grad_x = torch.zeros(x.shape, dtype=torch.float64, device="cuda")
    start = 0
    for expert, rows in enumerate(sizes):
        w = weight[expert].double()
        expected_grad_x[start : start + rows] = grad_out[start : start + rows].double() @ (w.t() if transposed else w)
        start += rows
    assert_close_to_reference(x.grad, expected_grad_x)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    sizes = [20, 0, 44]
    x, grad_out, m_sizes = make_inputs(sizes, 128, 64, torch.bfloat16)
    weight = (torch.randn(3, 128, 64, device="cuda") / 8).bfloat16()
    compiled = torch.compile(moe_gemm.grouped_forward, fullgraph=True)
    results = []
    for fn in (compiled, moe_gemm.grouped_forward):
        x_, w_ = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        fn(x_, w_, m_sizes).backward(grad_out)
        results.append((x_.grad, w_.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_fewer_row_blocks_than_a_raster_group():
    # 5 blocks of 128 gradient rows, fewer than the 8 of a raster group, and a partial last block.
    check([0, 90, 300, 7], n=520, k=640)
