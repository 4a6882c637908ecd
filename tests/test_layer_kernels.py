"""The MoE layer's CUDA kernels (``csrc/moe_layer_kernels.cu``) against the PyTorch ops they replace: dispatch
(the same permutation exactly, from one pair to 131k pairs, up to the largest expert count it takes), the gated
activation, its backward and combine (within one rounding of the output type, dropped rows poisoned with NaN), and
``experts_forward`` through them: the forward's bits and the gradients' distance to float64 against the composed
ops, inside a CUDA graph with the routing changed between replays."""

import pytest
import torch
from helpers import assert_close_to_reference, relative_error, requires_cuda_op

import moe_gemm
from moe_gemm import _ops
from moe_gemm.dispatch import combine_pairs, sort_pairs
from moe_gemm.layer import gated_activation, gated_activation_backward

pytestmark = [pytest.mark.gpu, requires_cuda_op]

# One unit in the last place of each type, relative: what a different rounding order may cost.
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-23}


def poison_the_allocator(num_bytes: int) -> None:
    """Fill a block of ``num_bytes`` with NaN and free it: the caching allocator hands that block to the next
    allocation of that size on this stream, so an output the kernel does not fully write shows NaN."""
    block = torch.full((num_bytes // 2,), float("nan"), device="cuda", dtype=torch.float16)
    del block


def random_ids(num_tokens, top_k, num_experts, *, sentinels=0.0, skew=False):
    """``[T, k]`` distinct experts per token (all in expert 0's neighbourhood with ``skew``), a fraction of them
    replaced by the sentinels -1 and E."""
    if skew:
        scores = torch.rand(num_tokens, num_experts) + torch.linspace(1, 0, num_experts)
    else:
        scores = torch.rand(num_tokens, num_experts)
    ids = scores.topk(min(top_k, num_experts), dim=1).indices
    if sentinels:
        drop = torch.rand(ids.shape) < sentinels
        ids = torch.where(drop, torch.where(torch.rand(ids.shape) < 0.5, -1, num_experts), ids)
    return ids.cuda()


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts, sentinels, skew",
    [
        (1, 1, 1, 0.0, False),
        (1, 8, 128, 0.0, False),
        (3, 2, 8, 0.3, False),
        (77, 4, 60, 0.1, True),
        (1000, 8, 256, 0.05, False),
        (2048, 6, 64, 0.0, True),
        (16384, 8, 128, 0.01, False),
        (40, 4, 5887, 0.1, False),  # the most experts the kernel takes: one warp
        (500, 2, 1000, 0.0, False),
        (0, 4, 16, 0.0, False),
        # Past 4096 pairs the sort runs on several CTAs (kDispatchPairsPerBlock): their boundaries, and many CTAs.
        (4096, 1, 16, 0.0, False),
        (4097, 1, 16, 0.2, True),
        (1025, 4, 5887, 0.1, False),
        (32768, 8, 128, 0.01, True),
        (9000, 16, 256, 0.0, False),
    ],
)
def test_dispatch_kernel_matches_the_stable_sort(num_tokens, top_k, num_experts, sentinels, skew):
    ids = random_ids(num_tokens, top_k, num_experts, sentinels=sentinels, skew=skew)
    assert _ops.dispatch_kernel_applies(ids, num_experts)
    m_sizes, expert_of_row, pair_of_row, token_of_row, row_of_pair = _ops.dispatch_kernel(ids, num_experts)
    expected = sort_pairs(ids.cpu(), num_experts)  # the PyTorch ops on the CPU
    for name, got, want in zip(
        ["m_sizes", "expert_of_row", "pair_of_row", "row_of_pair"],
        [m_sizes, expert_of_row, pair_of_row, row_of_pair],
        expected[:4],
    ):
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), name
    assert torch.equal(token_of_row.cpu(), expected[2] // max(top_k, 1))


@pytest.mark.parametrize("num_tokens", [300, 3000])
def test_dispatch_kernel_takes_int32_ids_and_all_pairs_in_one_expert(num_tokens):
    ids = torch.full((num_tokens, 4), 7, dtype=torch.int32, device="cuda")
    ids[::3, 1] = -5  # dropped
    m_sizes, _, pair_of_row, _, row_of_pair = _ops.dispatch_kernel(ids, 9)
    expected = sort_pairs(ids.cpu(), 9)
    dropped = len(range(0, num_tokens, 3))
    assert torch.equal(m_sizes.cpu(), expected[0]) and m_sizes[7].item() == 4 * num_tokens - dropped
    assert torch.equal(pair_of_row.cpu(), expected[2]) and torch.equal(row_of_pair.cpu(), expected[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_activation_kernel_matches_torch_ops(act, concatenated, dtype):
    gate_up = (torch.randn(333, 2 * 200, device="cuda") * 3).to(dtype)
    assert _ops.gated_activation_kernel_applies(gate_up, act)
    poison_the_allocator(333 * 200 * gate_up.element_size())
    out = _ops.gated_activation_kernel(gate_up, act, concatenated)
    expected = gated_activation(gate_up, act, concatenated)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=ULP[dtype], atol=1e-6)
    # Most elements round the same way to the bit.
    assert (out == expected).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("rows, intermediate", [(333, 200), (5, 2048), (1, 8)])
def test_gated_activation_backward_kernel_matches_torch_ops(rows, intermediate, act, concatenated, dtype):
    gate_up = (torch.randn(rows, 2 * intermediate, device="cuda") * 3).to(dtype)
    grad_activated = torch.randn(rows, intermediate, device="cuda").to(dtype)
    row_weights = torch.rand(rows, device="cuda")
    row_weights[0] = 0  # a dropped pair's row: no gradient flows
    poison_the_allocator(rows * 2 * intermediate * gate_up.element_size())
    got = _ops.gated_activation_backward_kernel(grad_activated, gate_up, row_weights, act, concatenated)
    expected = gated_activation_backward(grad_activated, gate_up, row_weights, act, concatenated)
    for name, a, b in zip(("grad_gate_up", "weighted_activated", "grad_row_weights"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        # Elementwise outputs within a rounding of the type; the row sums within float32 summation order.
        rtol = 1e-5 if name == "grad_row_weights" else ULP[dtype]
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5 * intermediate**0.5, msg=name)
    assert torch.equal(got[0][0], torch.zeros_like(got[0][0])) and torch.equal(got[1][0], torch.zeros_like(got[1][0]))
    # float64 on the host: autograd's gradient of w * <act(gate) * up, grad_activated> (bf16/fp16 inputs exact).
    leaf = gate_up.double().cpu().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1) if concatenated else (leaf[:, 0::2], leaf[:, 1::2])
    activations = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
                   "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}  # fmt: skip
    activated = activations[act](gate) * up
    weights = row_weights.double().cpu()[:, None]
    (grad_host,) = torch.autograd.grad((weights * activated * grad_activated.double().cpu()).sum(), leaf)
    assert_close_to_reference(got[0].cpu(), grad_host)
    assert_close_to_reference(got[2].cpu(), (activated * grad_activated.double().cpu()).sum(1).detach(), dtype)


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens, top_k, num_experts, hidden", [(1, 8, 128, 2048), (129, 4, 16, 520), (2, 1, 3, 8)])
def test_combine_kernel_matches_torch_ops(num_tokens, top_k, num_experts, hidden, dtype, weights_dtype):
    ids = random_ids(num_tokens, top_k, num_experts, sentinels=0.2)
    ids[0, 0] = -1  # at least one dropped pair
    _, expert_of_row, _, _, row_of_pair = _ops.dispatch_kernel(ids, num_experts)
    y_sorted = torch.randn(num_tokens * top_k, hidden, device="cuda").to(dtype)
    y_sorted[expert_of_row == num_experts] = float("nan")  # what dropped rows hold must add nothing
    weights = torch.rand(num_tokens, top_k, device="cuda").to(weights_dtype)
    assert _ops.combine_kernel_applies(y_sorted, weights, ids)
    poison_the_allocator(num_tokens * hidden * y_sorted.element_size())
    out = _ops.combine_kernel(y_sorted, row_of_pair, weights, ids, num_experts)
    valid = (ids >= 0) & (ids < num_experts)
    expected = combine_pairs(y_sorted, row_of_pair, valid, weights)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=ULP[dtype], atol=1e-5)
    # float64 on the host, token by token.
    host = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for token in range(num_tokens):
        for slot in range(top_k):
            if valid[token, slot]:
                row = row_of_pair[token * top_k + slot]
                host[token] += weights[token, slot].double().cpu() * y_sorted[row].double().cpu()
    assert_close_to_reference(out.cpu(), host)
    assert torch.equal(_ops.combine_kernel(y_sorted, row_of_pair, weights, ids, num_experts), out)  # reproducible


def layer_leaves(num_tokens, top_k, num_experts, hidden, intermediate) -> dict[str, torch.Tensor]:
    """``experts_forward``'s differentiable inputs in bf16 on the GPU (drawn in float32 on the CPU), requiring grad."""
    leaves = {
        "hidden": torch.randn(num_tokens, hidden),
        "top_k_weights": torch.rand(num_tokens, top_k),
        "gate_up_proj": torch.randn(num_experts, 2 * intermediate, hidden) / hidden**0.5,
        "down_proj": torch.randn(num_experts, hidden, intermediate) / intermediate**0.5,
    }
    return {name: t.to("cuda", torch.bfloat16).requires_grad_() for name, t in leaves.items()}


@pytest.mark.parametrize("concatenated", [True, False], ids=["concatenated", "interleaved"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_fused_layer_through_the_kernels_is_as_close_to_float64_as_the_composed_ops(act, concatenated):
    num_tokens, top_k, num_experts, hidden, intermediate = 50, 4, 16, 256, 128
    ids = random_ids(num_tokens, top_k, num_experts, sentinels=0.1)
    leaves = layer_leaves(num_tokens, top_k, num_experts, hidden, intermediate)
    grad_out = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)

    def run(tensors, fused):
        device = tensors["hidden"].device
        options = {"act": act, "concatenated": concatenated, "fused": fused}
        out = moe_gemm.experts_forward(top_k_index=ids.to(device), **tensors, **options)
        return (out, *torch.autograd.grad(out, list(tensors.values()), grad_out.to(device, out.dtype)))

    fused = run(leaves, True)  # the fused layer's kernels
    composed = run(leaves, False)  # PyTorch ops around the GEMMs, under autograd
    reference = run({name: t.detach().cpu().double().requires_grad_() for name, t in leaves.items()}, False)
    assert torch.equal(fused[0], composed[0])
    for name, a, b, ref in zip(["out", *leaves], fused, composed, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        fused_error = relative_error(a.cpu(), ref)
        composed_error = relative_error(b.cpu(), ref)
        assert fused_error <= 1.5 * composed_error + 1e-6, f"{name}: {fused_error:.2e} against {composed_error:.2e}"
    with torch.no_grad():
        assert torch.equal(moe_gemm.experts_forward(top_k_index=ids, **leaves, act=act, concatenated=concatenated),
                           fused[0])  # fmt: skip


def test_experts_forward_in_a_cuda_graph_follows_the_routing():
    num_tokens, top_k, num_experts, hidden, intermediate = 8, 2, 32, 256, 64
    experts = moe_gemm.MoEExperts(
        num_experts=num_experts, hidden_size=hidden, intermediate_size=intermediate, device="cuda", dtype=torch.bfloat16
    )
    hidden_states = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    ids = random_ids(num_tokens, top_k, num_experts)
    weights = torch.rand(num_tokens, top_k, device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            experts(hidden_states, ids, weights)  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts(hidden_states, ids, weights)
        for step in range(3):
            ids.copy_(random_ids(num_tokens, top_k, num_experts, sentinels=0.2 * step))
            hidden_states.copy_(torch.randn_like(hidden_states))
            out.fill_(float("nan"))
            graph.replay()
            expected = experts(hidden_states, ids, weights)
            torch.cuda.synchronize()
            assert torch.equal(out, expected), f"replay {step}"


def test_fused_layer_compiles_whole_with_inductor():
    # torch.compile(fullgraph=True) with the default backend traces the fused layer's Function, its kernels through
    # their fake kernels, and lowers the ops around them with Inductor: the same values as eager, gradients included.
    num_tokens, top_k, num_experts, hidden, intermediate = 300, 4, 16, 256, 128
    ids = random_ids(num_tokens, top_k, num_experts, sentinels=0.1)
    leaves = layer_leaves(num_tokens, top_k, num_experts, hidden, intermediate)

    def layer(hidden, top_k_weights, gate_up_proj, down_proj):
        return moe_gemm.experts_forward(hidden, ids, top_k_weights, gate_up_proj, down_proj)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out, expected = compiled(**leaves), layer(**leaves)
    torch.testing.assert_close(out, expected, rtol=ULP[torch.bfloat16], atol=1e-3)
    grad_out = torch.randn_like(out)
    tensors = list(leaves.values())
    for name, got, want in zip(
        leaves, torch.autograd.grad(out, tensors, grad_out), torch.autograd.grad(expected, tensors, grad_out)
    ):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=4 * ULP[torch.bfloat16], atol=1e-3, msg=name)
