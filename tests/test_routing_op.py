"""``torch.ops.moe_gemm.route`` on CPU (the PyTorch-ops kernel registered in ``moe_gemm/_ops.py``): ids and
weights of ``route_reference``, its hand-written backward against autograd through the tensor ops, ``opcheck`` and a
``fullgraph`` trace. The CUDA kernel behind the same op is tested in ``test_routing_kernel.py``."""

import pytest
import torch

from moe_gemm import _ops
from moe_gemm.reference import route_reference
from moe_gemm.routing import route_torch_ops

OPTIONS = {
    "softmax": ("softmax", False, None, None),
    "softmax_renormalized": ("softmax", True, None, None),
    "softmax_topk": ("softmax_topk", False, None, None),
    "sigmoid": ("sigmoid", True, None, None),
    "sigmoid_grouped": ("sigmoid", True, 4, 2),
    "sigmoid_grouped_unnormalized": ("sigmoid", False, 4, 3),
}


def op_arguments(logits, top_k, scoring, renormalize, n_group, topk_group, scale=2.5):
    bias = torch.randn(logits.shape[1]) / 4 if scoring == "sigmoid" else None
    return (logits, top_k, scoring, renormalize, n_group, topk_group, bias, scale)


def as_keywords(args):
    _, _, scoring, renormalize, n_group, topk_group, bias, scale = args
    return {"scoring": scoring, "renormalize": renormalize, "n_group": n_group, "topk_group": topk_group,
            "e_score_correction_bias": bias, "routed_scaling_factor": scale}  # fmt: skip


def test_route_uses_the_op_only_where_the_cuda_kernel_applies():
    logits = torch.randn(4, 16)
    assert not _ops.route_kernel_applies(logits, 2, None), "CPU tensors take the tensor ops"
    if not torch.cuda.is_available():
        return
    cuda_logits = logits.cuda()
    assert _ops.route_kernel_applies(cuda_logits, 2, None) == _ops.kernels_available(cuda_logits.device)
    assert not _ops.route_kernel_applies(torch.randn(4, 2048, device="cuda"), 2, None), "E > 1024"
    assert not _ops.route_kernel_applies(cuda_logits, 33, None), "top_k > 32"
    assert not _ops.route_kernel_applies(cuda_logits.double(), 2, None), "float64"


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_op_matches_reference(options):
    logits = torch.randn(40, 16, dtype=torch.bfloat16)
    logits[0, 3] = float("nan")
    logits[1] = float("-inf")
    args = op_arguments(logits, 5, *options)
    weights, ids = torch.ops.moe_gemm.route(*args)
    ref_weights, ref_ids = route_reference(logits, 5, **as_keywords(args))
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_op_backward_matches_autograd_of_the_tensor_ops(options):
    logits = torch.randn(12, 16, dtype=torch.float64)
    logits[0, 3] = float("nan")  # never chosen; gets gradient 0 both ways
    logits[2, :4] = float("-inf")
    args = op_arguments(logits, 4, *options)
    grad_weights = torch.randn(12, 4, dtype=torch.float64)

    x = logits.clone().requires_grad_()
    weights, _ = torch.ops.moe_gemm.route(x, *args[1:])
    (grad,) = torch.autograd.grad(weights, x, grad_weights)
    x_ref = logits.clone().requires_grad_()
    ref_weights, _ = route_torch_ops(x_ref, 4, **as_keywords(args))
    (ref_grad,) = torch.autograd.grad(ref_weights, x_ref, grad_weights)

    assert grad.dtype == torch.float64 and ref_grad.abs().max() > 0.01
    # The tensor ops run in float32 whatever the logits' dtype.
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_op_passes_opcheck(options):
    logits = torch.randn(9, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_gemm.route.default, op_arguments(logits, 3, *options))


def test_op_traces_without_graph_breaks():
    logits, bias = torch.randn(10, 32), torch.randn(32)

    def router(logits):
        return torch.ops.moe_gemm.route(logits, 4, "sigmoid", True, 8, 2, bias, 2.5)

    torch._dynamo.reset()
    compiled = torch.compile(router, backend="aot_eager", fullgraph=True)
    (weights, ids), (ref_weights, ref_ids) = compiled(logits), router(logits)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
