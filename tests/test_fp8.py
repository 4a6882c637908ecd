"""FP8 (issue 25, the Python side): ``grouped_forward_fp8`` against the float64 reference of its dequantized operands,
the scale layouts checked by hand, ``quantize_fp8``'s error bound and its zeros, NaN and inf, the ops under opcheck
and torch.compile, and every bad input. Float8_e4m3fn exists on CPU: all of it runs without a GPU."""

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close_to_reference, relative_error

import moe_gemm
from moe_gemm import _ops, _validation
from moe_gemm.reference import dequantize_fp8_reference, grouped_mm_fp8_reference

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most half a step, 2**-4 of it, and a
# subnormal one (below 2**-6) by at most half the subnormal step 2**-9, in units of the scale. The float32 quotient
# x / scale rounds first, by 2**-24 relative: 2**-22 covers it.
RELATIVE_BOUND = 2**-4 + 2**-22
SUBNORMAL_BOUND = 2**-10


def groups(size: int) -> int:
    return -(-size // 128)


@dataclass
class FP8Problem:
    """Inputs of one FP8 grouped GEMM, and the float ``x`` quantized into ``x`` and ``x_scale``."""

    x_high: torch.Tensor
    x: torch.Tensor
    x_scale: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    m_sizes: torch.Tensor
    weight_transposed: bool

    def run(self, **options) -> torch.Tensor:
        return moe_gemm.grouped_forward_fp8(
            self.x, self.x_scale, self.weight, self.weight_scale, self.m_sizes,
            weight_transposed=self.weight_transposed, **options,
        )  # fmt: skip

    def reference(self) -> torch.Tensor:
        return grouped_mm_fp8_reference(
            self.x, self.x_scale, self.weight, self.weight_scale, self.m_sizes, self.weight_transposed
        )


def make_fp8_problem(
    sizes, n, k, *, num_rows=None, x_group=128, weight_blocks=True, transposed=False, sizes_dtype=torch.int64
) -> FP8Problem:
    """Fresh random inputs. ``x`` is ``quantize_fp8`` of random bfloat16 data. A blockwise weight is random e4m3
    values under random scales 2**-12 .. 2**-6 (a block read with another block's scale is far off); a per-channel
    one is ``quantize_fp8`` of random data, a row per channel."""
    num_rows = sum(max(size, 0) for size in sizes) if num_rows is None else num_rows
    x_high = torch.randn(num_rows, k).bfloat16()
    x, x_scale = moe_gemm.quantize_fp8(x_high, group=x_group)
    num_experts = len(sizes)
    if weight_blocks:
        weight = (torch.randn(num_experts, n, k) * 100).clamp(-448, 448).to(FP8)
        weight_scale = 2 ** torch.empty(num_experts, groups(n), groups(k)).uniform_(-12, -6)
    else:
        weight, weight_scale = moe_gemm.quantize_fp8(torch.randn(num_experts * n, k) / k**0.5, group=None)
        weight, weight_scale = weight.view(num_experts, n, k), weight_scale.view(num_experts, n)
    if transposed:
        # The block scales follow the weight's dims; per-channel ones stay [E, N].
        weight = weight.transpose(-1, -2).contiguous()
        weight_scale = weight_scale.transpose(-1, -2).contiguous() if weight_blocks else weight_scale
    m_sizes = torch.tensor(sizes, dtype=sizes_dtype)
    return FP8Problem(x_high, x, x_scale, weight, weight_scale, m_sizes, transposed)


def expected_end(sizes, num_rows) -> int:
    return min(sum(max(size, 0) for size in sizes), num_rows)


# ----------------------------------------------------------------------------------------------------------------------
# The GEMM against the float64 reference.


@pytest.mark.parametrize("transposed", [False, True], ids=["nk", "kn"])
@pytest.mark.parametrize("x_group", [128, None], ids=["x_per_group", "x_per_row"])
@pytest.mark.parametrize("weight_blocks", [True, False], ids=["w_per_block", "w_per_channel"])
def test_matches_the_float64_reference(transposed, x_group, weight_blocks):
    # Expert 1 is empty, expert 3 negative, rows 25.. belong to no expert; N and K leave partial groups and blocks.
    sizes = [7, 0, 12, -3, 6]
    problem = make_fp8_problem(
        sizes, n=140, k=200, num_rows=30, x_group=x_group, weight_blocks=weight_blocks, transposed=transposed
    )
    reference = problem.reference()
    y = problem.run()
    assert y.dtype == torch.bfloat16 and y.shape == (30, 140)
    assert torch.equal(y[25:], torch.zeros_like(y[25:]))
    assert_close_to_reference(y, reference)
    assert_close_to_reference(problem.run(out_dtype=torch.float32), reference)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_out_dtype(out_dtype):
    problem = make_fp8_problem([9, 4, 0, 11], n=48, k=160)
    y = problem.run(out_dtype=out_dtype)
    assert y.dtype == out_dtype
    assert_close_to_reference(y, problem.reference())


SIZE_CASES = {
    "empty experts": ([0, 9, 0, 0, 14, 0], 23),
    "one expert": ([17], 17),
    "one expert owns every row": ([0, 20, 0], 20),
    "zero rows": ([0, 0, 0], 0),
    "no expert owns a row": ([0, 0], 5),
    "sizes past M": ([10, 20, 15], 30),
    "negative sizes": ([-5, 8, -1, 4], 14),
}


@pytest.mark.parametrize("sizes_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", SIZE_CASES)
def test_sizes(case, sizes_dtype):
    sizes, num_rows = SIZE_CASES[case]
    problem = make_fp8_problem(sizes, n=32, k=144, num_rows=num_rows, sizes_dtype=sizes_dtype)
    y = problem.run(out_dtype=torch.float32)
    end = expected_end(sizes, num_rows)
    assert y.shape == (num_rows, 32)
    assert torch.equal(y[end:], torch.zeros_like(y[end:]))
    assert_close_to_reference(y, problem.reference())
    if end > 0:
        assert y[:end].abs().amax() > 0


def test_rows_past_the_last_expert_are_never_read():
    problem = make_fp8_problem([6, 0, 9], n=32, k=160, num_rows=24)
    clean = problem.run()
    problem.x[15:] = torch.tensor(float("nan")).to(FP8)
    problem.x_scale[15:] = float("nan")
    poisoned = problem.run()
    assert torch.equal(poisoned, clean) and not poisoned[15:].any()


def test_the_quantized_product_is_within_e4m3_rounding_of_the_unquantized_one():
    # Only x is quantized here: |x_fp8 * s - x| <= RELATIVE_BOUND |x| + SUBNORMAL_BOUND s per element, so each output
    # is off by at most that bound times |W| summed over K. It fails if quantize_fp8 and grouped_forward_fp8 read a
    # scale differently (a multiplier and a divisor, say).
    for x_group in (128, None):
        problem = make_fp8_problem([11, 0, 14], n=48, k=300, x_group=x_group, weight_blocks=False)
        weight = dequantize_fp8_reference(problem.weight, problem.weight_scale)
        exact = torch.cat([problem.x_high[:11].double() @ weight[0].t(), problem.x_high[11:].double() @ weight[2].t()])
        scale = dequantize_fp8_reference(torch.ones(problem.x.shape), problem.x_scale)
        bound = (RELATIVE_BOUND * problem.x_high.double().abs() + SUBNORMAL_BOUND * scale).split([11, 14])
        bound = torch.cat([bound[0] @ weight[0].abs().t(), bound[1] @ weight[2].abs().t()])
        y = problem.run(out_dtype=torch.float32).double()
        # float32 accumulation over K = 300: well below 1e-5 of sum |x| |W|.
        slack = 1e-5 * (problem.x_high.double().abs() @ weight[0].abs().t())
        assert ((y - exact).abs() <= bound + slack).all()
        assert relative_error(y, exact) > 1e-3, "x was quantized"


def test_deepseek_v3_blockwise_layout_by_hand():
    # weight_scale[e, i, j] scales the block weight[e, 128 i : 128 (i + 1), 128 j : 128 (j + 1)] (DeepSeek-V3's
    # weight_scale_inv) and x_scale[r, j] the columns 128 j : 128 (j + 1) of row r, the last blocks partial (N = 320,
    # K = 448: 3 x 4 blocks). Computed here with the scales expanded by repeat_interleave, in float32.
    sizes, n, k = [9, 0, 14], 320, 448
    problem = make_fp8_problem(sizes, n=n, k=k)
    x_scales = problem.x_scale.repeat_interleave(128, dim=1)[:, :k]
    w_scales = problem.weight_scale.repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :n, :k]
    x, weight = problem.x.float() * x_scales, problem.weight.float() * w_scales
    expected = torch.cat([x_e @ weight[e].t() for e, x_e in enumerate(x.split(sizes))])
    y = problem.run(out_dtype=torch.float32)
    assert relative_error(y, expected) < 1e-6

    # The [E, K, N] layout takes the transposes of the weight and of its block scales, stored or as views.
    weight_kn, scale_kn = problem.weight.transpose(-1, -2), problem.weight_scale.transpose(-1, -2)
    for weight_read, scale_read in ((weight_kn.contiguous(), scale_kn.contiguous()), (weight_kn, scale_kn)):
        y_kn = moe_gemm.grouped_forward_fp8(
            problem.x, problem.x_scale, weight_read, scale_read, problem.m_sizes,
            weight_transposed=True, out_dtype=torch.float32,
        )  # fmt: skip
        assert relative_error(y_kn, expected) < 1e-6
    # An [E, N, K] weight read through its transposed view, with the flag: the same matrices again.
    y_view = moe_gemm.grouped_forward_fp8(
        problem.x, problem.x_scale, weight_kn.contiguous().transpose(-1, -2), scale_kn.contiguous().transpose(-1, -2),
        problem.m_sizes, out_dtype=torch.float32,
    )  # fmt: skip
    assert relative_error(y_view, expected) < 1e-6


def test_zero_columns():
    # K = 0: no scale per row group, every product an empty sum.
    x, x_scale = moe_gemm.quantize_fp8(torch.empty(5, 0))
    assert x.shape == (5, 0) and x_scale.shape == (5, 0)
    weight, weight_scale = torch.empty(2, 16, 0, dtype=FP8), torch.empty(2, 1, 0)
    y = moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, torch.tensor([2, 3]))
    assert torch.equal(y, torch.zeros(5, 16, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------------------
# quantize_fp8.


@pytest.mark.parametrize("group", [128, None], ids=["per_group", "per_row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_fp8_round_trip(dtype, group):
    # Rows 2**-8 .. 2**8 apart in magnitude, K = 300: two full groups and a partial one.
    magnitudes = 2.0 ** torch.randint(-8, 9, (37, 1))
    x = (torch.randn(37, 300) * magnitudes).to(dtype)
    x_fp8, scale = moe_gemm.quantize_fp8(x, group=group)
    assert x_fp8.dtype == FP8 and x_fp8.shape == (37, 300) and x_fp8.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == ((37, 3) if group else (37,))

    # Each group's scale is its amax / 448 (as a product with the reciprocal, which torch on CUDA computes for a
    # division by a number; _ops.fp8_scale), so its largest value lands on +-448.
    width = group or 300
    for start in range(0, 300, width):
        amax = x[:, start : start + width].float().abs().amax(dim=1)
        scale_column = scale[:, start // width] if group else scale
        assert torch.equal(scale_column, amax * (1.0 / 448))
        assert torch.equal(x_fp8[:, start : start + width].float().abs().amax(dim=1), torch.full((37,), 448.0))

    x = x.double()
    scale_of_element = dequantize_fp8_reference(torch.ones(37, 300), scale)
    error = (dequantize_fp8_reference(x_fp8, scale) - x).abs()
    assert (error <= RELATIVE_BOUND * x.abs() + SUBNORMAL_BOUND * scale_of_element).all()
    assert error.max() > 0


@pytest.mark.parametrize("group", [128, None], ids=["per_group", "per_row"])
def test_quantize_fp8_of_zeros_and_tiny_values(group):
    x = torch.randn(4, 200)
    x[1] = 0  # a zero row
    x[2, :128] = 0  # a zero group, in the per-group case
    x[3] = 1e-37  # a normal float32 below 448 times the smallest normal
    x_fp8, scale = moe_gemm.quantize_fp8(x, group=group)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (scale[1] == _ops.FP8_MIN_SCALE).all() and (scale[3] == _ops.FP8_MIN_SCALE).all()
    if group:
        assert scale[2, 0] == _ops.FP8_MIN_SCALE
    back = dequantize_fp8_reference(x_fp8, scale)
    assert torch.equal(back[1], torch.zeros(200, dtype=torch.float64))
    assert not back[2, :128].any()
    # 1e-37 / 1.2e-38 = 8.47 rounds to 8 or 9: within the bound, far from 0.
    assert ((back[3] - x[3].double()).abs() <= RELATIVE_BOUND * x[3].double().abs()).all()

    zeros, zero_scale = moe_gemm.quantize_fp8(torch.zeros(6, 128, dtype=torch.bfloat16), group=group)
    assert not zeros.float().any() and torch.isfinite(zero_scale).all() and (zero_scale > 0).all()
    weight = torch.ones(2, 16, 128).to(FP8)
    y = moe_gemm.grouped_forward_fp8(zeros, zero_scale, weight, torch.ones(2, 16), torch.tensor([3, 3]))
    assert torch.equal(y, torch.zeros(6, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("group", [128, None], ids=["per_group", "per_row"])
def test_a_nan_or_inf_never_passes_silently(bad, group):
    # No sync to check the values: the group holding it dequantizes to NaN, and so does every output of its row.
    x = torch.randn(6, 300)
    clean_fp8, clean_scale = moe_gemm.quantize_fp8(x, group=group)
    x[2, 150] = bad
    x_fp8, scale = moe_gemm.quantize_fp8(x, group=group)
    spoiled = (2, 1) if group else (2,)
    assert not torch.isfinite(scale[spoiled])
    back = dequantize_fp8_reference(x_fp8, scale)
    columns = slice(128, 256) if group else slice(None)
    assert back[2, columns].isnan().all()
    kept = torch.ones(6, 300, dtype=torch.bool)
    kept[2, columns] = False
    assert torch.equal(x_fp8.float()[kept], clean_fp8.float()[kept])

    weight, weight_scale = torch.ones(2, 16, 300).to(FP8), torch.ones(2, 16)
    y = moe_gemm.grouped_forward_fp8(x_fp8, scale, weight, weight_scale, torch.tensor([3, 3]))
    assert y[2].isnan().all() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_quantize_fp8_of_no_rows():
    x_fp8, scale = moe_gemm.quantize_fp8(torch.empty(0, 200))
    assert x_fp8.shape == (0, 200) and scale.shape == (0, 2)
    x_fp8, scale = moe_gemm.quantize_fp8(torch.empty(3, 0), group=None)
    assert x_fp8.shape == (3, 0) and torch.equal(scale, torch.full((3,), _ops.FP8_MIN_SCALE))


# ----------------------------------------------------------------------------------------------------------------------
# The ops: opcheck, torch.compile, no autograd.


@pytest.mark.parametrize(
    "x_group, weight_blocks, transposed, out_dtype", [(128, True, False, torch.float32), (None, False, True, None)]
)
def test_opcheck_grouped_mm_fp8(x_group, weight_blocks, transposed, out_dtype):
    problem = make_fp8_problem([5, 0, 7], n=32, k=160, num_rows=14, x_group=x_group, weight_blocks=weight_blocks,
                               transposed=transposed)  # fmt: skip
    inputs = (problem.x, problem.x_scale, problem.weight, problem.weight_scale, problem.m_sizes)
    # opcheck's test_schema compares the inputs before and after with torch.allclose, which has no float8 kernel
    # ("mul_cpu_reduced_float" not implemented): what it checks is done by hand below, byte for byte.
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    op = torch.ops.moe_gemm.grouped_mm_fp8.default
    torch.library.opcheck(op, (*inputs, transposed, out_dtype), test_utils=checks)
    before = [t.clone() for t in inputs]
    y = op(*inputs, transposed, out_dtype)
    for tensor, copy in zip(inputs, before):
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), copy.reshape(-1).view(torch.uint8)), "input written"
        assert not torch._C._overlaps(y, tensor), "the output aliases an input"


@pytest.mark.parametrize("group", [128, None], ids=["per_group", "per_row"])
def test_opcheck_quantize_fp8(group):
    torch.library.opcheck(torch.ops.moe_gemm.quantize_fp8.default, (torch.randn(10, 200).bfloat16(), group))


def test_torch_compile_full_graph():
    torch._dynamo.reset()
    problem = make_fp8_problem([7, 0, 12], n=48, k=160, num_rows=21)

    def forward(x_high, weight, weight_scale, m_sizes):
        x, x_scale = moe_gemm.quantize_fp8(x_high)
        return moe_gemm.grouped_forward_fp8(x, x_scale, weight, weight_scale, m_sizes)

    arguments = (problem.x_high, problem.weight, problem.weight_scale, problem.m_sizes)
    y = torch.compile(forward, fullgraph=True, backend="aot_eager")(*arguments)
    assert torch.equal(y, forward(*arguments))
    assert_close_to_reference(y, problem.reference())


def test_no_autograd():
    problem = make_fp8_problem([5, 7], n=32, k=128)
    arguments = [problem.x, problem.x_scale, problem.weight, problem.weight_scale, problem.m_sizes]
    for index, name in enumerate(["x", "x_scale", "weight", "weight_scale"]):
        grad_arguments = list(arguments)
        grad_arguments[index] = arguments[index].clone().requires_grad_()
        with pytest.raises(ValueError, match=rf"^{name}: grouped_forward_fp8 has no backward \(FP8 experts train"):
            moe_gemm.grouped_forward_fp8(*grad_arguments)
        with torch.no_grad():
            assert torch.equal(moe_gemm.grouped_forward_fp8(*grad_arguments), problem.run())
    x_high = torch.randn(12, 128, requires_grad=True)
    with pytest.raises(ValueError, match=r"^x: quantize_fp8 has no backward .* pass x.detach\(\)"):
        moe_gemm.quantize_fp8(x_high)
    with torch.no_grad():
        moe_gemm.quantize_fp8(x_high)
    # The op called directly records a node whose backward raises, rather than backpropagating zeros.
    y = torch.ops.moe_gemm.grouped_mm_fp8(problem.x, problem.x_scale.requires_grad_(), *arguments[2:])
    with pytest.raises(RuntimeError, match=r"moe_gemm::grouped_mm_fp8 has no backward"):
        y.float().sum().backward()


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs. The valid problem: E = 3, M = 12, N = 32, K = 256, blockwise scales (the CUDA kernel's rules hold).


def good(**overrides) -> dict:
    problem = make_fp8_problem([5, 0, 7], n=32, k=256)
    arguments = {
        "x": problem.x, "x_scale": problem.x_scale, "weight": problem.weight, "weight_scale": problem.weight_scale,
        "m_sizes": problem.m_sizes, "weight_transposed": False, "out_dtype": torch.bfloat16,
    }  # fmt: skip
    return {**arguments, **overrides}


def fp8(*shape, device="cpu"):
    return torch.randn(shape).to(FP8).to(device)


GENERAL_CASES = {
    "x not a tensor": (good(x=[[1.0]]), TypeError, r"^x: expected a torch.Tensor, got list"),
    "x_scale not a tensor": (good(x_scale=1.0), TypeError, r"^x_scale: expected a torch.Tensor, got float"),
    "x bfloat16": (
        good(x=torch.randn(12, 256).bfloat16()), TypeError,
        r"^x: expected torch.float8_e4m3fn, got torch.bfloat16; moe_gemm.quantize_fp8",
    ),
    "x e5m2": (good(x=torch.randn(12, 256).to(torch.float8_e5m2)), TypeError, r"^x: .* got torch.float8_e5m2"),
    "weight float32": (
        good(weight=torch.randn(3, 32, 256)), TypeError, r"^weight: expected torch.float8_e4m3fn, got torch.float32"
    ),
    "x_scale bfloat16": (
        good(x_scale=torch.ones(12, 2).bfloat16()), TypeError,
        r"^x_scale: expected torch.float32 scales, got torch.bfloat16",
    ),
    "weight_scale float64": (
        good(weight_scale=torch.ones(3, 1, 2).double()), TypeError,
        r"^weight_scale: expected torch.float32 scales, got torch.float64",
    ),
    "out_dtype float64": (
        good(out_dtype=torch.float64), TypeError,
        r"^out_dtype: expected torch.bfloat16, torch.float16 or torch.float32, got torch.float64",
    ),
    "out_dtype fp8": (good(out_dtype=FP8), TypeError, r"^out_dtype: .* got torch.float8_e4m3fn"),
    "float sizes": (
        good(m_sizes=torch.tensor([5.0, 0.0, 7.0])), TypeError,
        r"^m_sizes: expected torch.int32 or torch.int64 row counts, got torch.float32",
    ),
    "sizes 2-D": (good(m_sizes=torch.tensor([[5, 0, 7]])), ValueError, r"^m_sizes: expected a 1-D tensor \[E\]"),
    "one size per expert": (
        good(m_sizes=torch.tensor([5, 7])), ValueError, r"^m_sizes: expected one size per expert, E = 3 .* got 2"
    ),
    "x 3-D": (good(x=fp8(2, 6, 256)), ValueError, r"^x: expected a 2-D tensor \[M, K\], got shape \(2, 6, 256\)"),
    "weight 2-D": (good(weight=fp8(32, 256)), ValueError, r"^weight: expected a 3-D tensor \[E, N, K\]"),
    "K differs": (
        good(x=fp8(12, 128), x_scale=torch.ones(12, 1)), ValueError,
        r"^x: expected K = 256 columns to match weight \[E, N, K\] .* got 128",
    ),
    "K differs, transposed": (
        good(weight_transposed=True), ValueError, r"^x: expected K = 32 columns to match weight \[E, K, N\]"
    ),
    "x_scale groups": (
        good(x_scale=torch.ones(12, 3)), ValueError,
        r"^x_scale: expected \[M\] = \(12,\) \(one scale per row\) or \[M, ceil\(K / 128\)\] = \(12, 2\) "
        r"\(one per row and 128 columns\) for x of shape \(12, 256\), got \(12, 3\)",
    ),
    "x_scale rows": (good(x_scale=torch.ones(11, 2)), ValueError, r"^x_scale: .* got \(11, 2\)"),
    "x_scale per row, too few": (good(x_scale=torch.ones(11)), ValueError, r"^x_scale: .* got \(11,\)"),
    "x_scale 3-D": (good(x_scale=torch.ones(12, 2, 1)), ValueError, r"^x_scale: .* got \(12, 2, 1\)"),
    "weight_scale blocks": (
        good(weight_scale=torch.ones(3, 2, 2)), ValueError,
        r"^weight_scale: expected \[E, N\] = \(3, 32\) \(one scale per output channel\) or "
        r"\[E, ceil\(N / 128\), ceil\(K / 128\)\] = \(3, 1, 2\) \(one per 128 x 128 block\) for weight \[E, N, K\] "
        r"\(weight_transposed=False\) of shape \(3, 32, 256\), got \(3, 2, 2\)",
    ),
    "weight_scale channels": (good(weight_scale=torch.ones(3, 33)), ValueError, r"^weight_scale: .* got \(3, 33\)"),
    "weight_scale experts": (good(weight_scale=torch.ones(2, 1, 2)), ValueError, r"^weight_scale: .* got \(2, 1, 2\)"),
    "weight_scale blocks, transposed": (
        # [E, ceil(N / 128), ceil(K / 128)] given for an [E, K, N] weight: its block dims follow the weight's.
        good(weight=fp8(3, 256, 32), weight_scale=torch.ones(3, 1, 2), weight_transposed=True), ValueError,
        r"^weight_scale: .* \[E, ceil\(K / 128\), ceil\(N / 128\)\] = \(3, 2, 1\) .* got \(3, 1, 2\)",
    ),
    "weight on another device": (
        good(weight=fp8(3, 32, 256, device="meta")), ValueError,
        r"^weight: expected a tensor on the device of x \(cpu\), got meta",
    ),
    "x_scale on another device": (
        good(x_scale=torch.ones(12, 2, device="meta")), ValueError, r"^x_scale: .* device of x \(cpu\), got meta"
    ),
    "weight_scale on another device": (
        good(weight_scale=torch.ones(3, 1, 2, device="meta")), ValueError, r"^weight_scale: .* got meta"
    ),
    "sizes on another device": (
        good(m_sizes=torch.zeros(3, dtype=torch.int64, device="meta")), ValueError, r"^m_sizes: .* got meta"
    ),
}  # fmt: skip

# What only the CUDA kernel cannot take (its router sends these to the PyTorch ops): the function computes them.
KERNEL_CASES = {
    "K not a multiple of 16": good(x=fp8(12, 200), weight=fp8(3, 32, 200)),
    "N not a multiple of 16": good(weight=fp8(3, 40, 256)),
    "N not a multiple of 16, transposed": good(weight=fp8(3, 256, 40), weight_scale=torch.ones(3, 2, 1),
                                               weight_transposed=True),
    "x column-major": good(x=fp8(256, 12).t()),
}  # fmt: skip


def call_function(arguments):
    arguments = dict(arguments)
    positional = [arguments.pop(name) for name in ("x", "x_scale", "weight", "weight_scale", "m_sizes")]
    return moe_gemm.grouped_forward_fp8(*positional, **arguments)


@pytest.mark.parametrize("case", GENERAL_CASES)
def test_grouped_forward_fp8_rejects(case):
    arguments, error, message = GENERAL_CASES[case]
    with pytest.raises(error, match=message):
        call_function(arguments)


@pytest.mark.parametrize("case", [case for case in GENERAL_CASES if not case.endswith(("a tensor", "device"))])
def test_the_ops_pytorch_kernel_rejects(case):
    # Called directly, past the function's checks. The schema itself refuses what is not a tensor, and the dispatcher
    # sends a call with a meta tensor to the fake kernel.
    arguments, error, message = GENERAL_CASES[case]
    with pytest.raises(error, match=message):
        torch.ops.moe_gemm.grouped_mm_fp8(*arguments.values())


@pytest.mark.parametrize("case", GENERAL_CASES)
def test_validation_rejects(case):
    arguments, error, message = GENERAL_CASES[case]
    with pytest.raises(error, match=message):
        _validation.validate_fp8(*arguments.values())


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_validation_leaves_what_only_the_cuda_kernel_refuses_to_its_router(case):
    _validation.validate_fp8(*KERNEL_CASES[case].values())  # no error: the router takes them to the PyTorch ops


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_the_pytorch_path_takes_what_only_the_cuda_kernel_refuses(case):
    arguments = KERNEL_CASES[case]
    assert call_function(arguments).shape == (12, arguments["weight"].shape[1 + arguments["weight_transposed"]])


def test_validation_accepts_both_layouts_and_reads_the_other_one_through_a_view():
    arguments = good()
    stored, stored_scale = arguments["weight"], arguments["weight_scale"]
    weight, scale, flag = _validation.validate_fp8(*arguments.values())
    assert weight is stored and scale is stored_scale and flag is False
    # An [E, N, K] weight handed over as its [E, K, N] view is read in place, its block scales transposed alike.
    arguments.update(weight=stored.transpose(-1, -2), weight_scale=stored_scale.transpose(-1, -2))
    arguments["weight_transposed"] = True
    weight, scale, flag = _validation.validate_fp8(*arguments.values())
    assert weight.is_contiguous() and weight.data_ptr() == stored.data_ptr() and flag is False
    assert torch.equal(scale, stored_scale) and scale.shape == (3, 1, 2)


QUANTIZE_CASES = {
    "x not a tensor": (([[1.0]], 128), TypeError, r"^x: expected a torch.Tensor, got list"),
    "x int32": ((torch.ones(4, 128, dtype=torch.int32), 128), TypeError, r"^x: expected one of .* got torch.int32"),
    "x already fp8": ((fp8(4, 128), 128), TypeError, r"^x: expected one of .* got torch.float8_e4m3fn"),
    "x 1-D": ((torch.randn(8), 128), ValueError, r"^x: expected a 2-D tensor \[M, K\], got shape \(8,\)"),
    "group 64": (
        (torch.randn(4, 128), 64), ValueError,
        r"^group: expected 128 \(one scale per row and 128 columns\) or None \(one scale per row\), got 64",
    ),
    "group True": ((torch.randn(4, 128), True), ValueError, r"^group: .* got True"),
}  # fmt: skip


@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_quantize_fp8_rejects(case):
    arguments, error, message = QUANTIZE_CASES[case]
    with pytest.raises(error, match=message):
        moe_gemm.quantize_fp8(*arguments)


@pytest.mark.parametrize("case", ["x int32", "x already fp8", "x 1-D", "group 64"])
def test_the_quantize_ops_pytorch_kernel_rejects(case):
    arguments, error, message = QUANTIZE_CASES[case]
    with pytest.raises(error, match=message):
        torch.ops.moe_gemm.quantize_fp8(*arguments)
