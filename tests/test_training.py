"""A few SGD steps of a tiny MoE model trained through grouped_forward (forward, dgrad and wgrad), whose loss must
follow a plain per-expert-loop implementation of the same model step by step. On CPU in float32 against float64, and
on the GPU in bfloat16 (the CUDA kernels) against float32."""

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda_op

import moe_gemm

TOKENS, HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 96, 64, 32, 6, 2
STEPS, LEARNING_RATE = 5, 0.5


def moe_forward(x, routing, w_up, w_down, expert_matmul):
    """Sort the (token, choice) pairs by expert, gate/up GEMM, SwiGLU, down GEMM, weighted sum back per token."""
    ids, weights = routing
    order = torch.sort(ids.flatten(), stable=True).indices
    token_of_row = order // TOP_K
    m_sizes = torch.bincount(ids.flatten(), minlength=EXPERTS)
    gate, up = expert_matmul(x[token_of_row], w_up, m_sizes).chunk(2, dim=-1)
    rows = expert_matmul(F.silu(gate) * up, w_down, m_sizes) * weights.flatten()[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_row, rows)


def loop_matmul(x, weight, m_sizes):
    """The reference: one matmul per expert, sizes read on the host."""
    outputs, start = [], 0
    for expert, rows in enumerate(m_sizes.tolist()):
        outputs.append(x[start : start + rows] @ weight[expert].t())
        start += rows
    return torch.cat(outputs)


def train(dtype, device, expert_matmul, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w_up = torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN**0.5
    w_down = torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE**0.5
    params = [w.to(device, dtype).requires_grad_() for w in (w_up, w_down)]
    # One batch fitted for a few steps; the last expert gets no tokens (an empty group in every GEMM).
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    target = torch.randn(TOKENS, HIDDEN, generator=generator)
    scores = torch.rand(TOKENS, EXPERTS, generator=generator)
    scores[:, -1] = -1
    top = scores.topk(TOP_K, dim=-1)
    routing = (top.indices.to(device), (top.values / top.values.sum(-1, keepdim=True)).to(device))
    losses = []
    for _ in range(STEPS):
        out = moe_forward(x.to(device, dtype), routing, *params, expert_matmul)
        loss = F.mse_loss(out.float(), target.to(device))
        loss.backward()
        with torch.no_grad():
            for param in params:
                param -= LEARNING_RATE * param.grad
                param.grad = None
        losses.append(loss.item())
    return losses


def grouped(x, weight, m_sizes):
    return moe_gemm.grouped_forward(x, weight, m_sizes)


def test_training_matches_the_loop_on_cpu():
    losses = train(torch.float32, "cpu", grouped)
    expected = train(torch.float64, "cpu", loop_matmul)
    assert losses[-1] < losses[0], "the model does not learn"
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)


@pytest.mark.gpu
@requires_cuda_op
def test_training_matches_the_loop_on_gpu():
    losses = train(torch.bfloat16, "cuda", grouped)
    expected = train(torch.float32, "cuda", loop_matmul)
    assert losses[-1] < losses[0], "the model does not learn"
    torch.testing.assert_close(losses, expected, rtol=3e-2, atol=0)
