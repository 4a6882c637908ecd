"""``fuse_experts``: MoE blocks whose experts are an ``nn.ModuleList`` of MLPs keep their outputs (and gradients)
once their experts are stacked and run by ``experts_forward``; blocks and expert lists it cannot take are refused."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_gemm
from moe_gemm import MoEExperts


class LlamaStyleMLP(nn.Module):
    """A gated MLP with the layer names ``NAMES`` (gate, up, down)."""

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, hidden, intermediate, act_fn, bias=False):
        super().__init__()
        gate, up, down = self.NAMES
        setattr(self, gate, nn.Linear(hidden, intermediate, bias=bias))
        setattr(self, up, nn.Linear(hidden, intermediate, bias=bias))
        setattr(self, down, nn.Linear(intermediate, hidden, bias=bias))
        self.act_fn = act_fn

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.NAMES)
        return down(self.act_fn(gate(x)) * up(x))


class MixtralStyleMLP(LlamaStyleMLP):
    """Mixtral's names before transformers 5: w1 (gate), w3 (up), w2 (down)."""

    NAMES = ("w1", "w3", "w2")


class LoopMoEBlock(nn.Module):
    """An MoE block as transformers 4 wrote them: softmax top-k router, then a loop over the experts."""

    def __init__(self, hidden, intermediate, num_experts, top_k, mlp, act_fn, bias=False, norm_topk_prob=True):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.experts = nn.ModuleList(mlp(hidden, intermediate, act_fn, bias) for _ in range(num_experts))

    def forward(self, hidden_states):
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs = F.softmax(self.gate(tokens), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for expert, mlp in enumerate(self.experts):
            token_index, slot = torch.where(ids == expert)
            if token_index.numel():
                expert_out = mlp(tokens[token_index]) * weights[token_index, slot, None].to(out.dtype)
                out.index_add_(0, token_index, expert_out)
        return out.view(hidden_states.shape)


class TinyModel(nn.Module):
    def __init__(self, block_options, hidden=16, num_layers=2):
        super().__init__()
        self.layers = nn.ModuleList(LoopMoEBlock(hidden, **block_options) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(self.norm(x))
        return x


BLOCKS = {
    "llama_silu": {"intermediate": 8, "num_experts": 6, "top_k": 2, "mlp": LlamaStyleMLP, "act_fn": nn.SiLU()},
    "mixtral_gelu_bias": {"intermediate": 8, "num_experts": 4, "top_k": 2, "mlp": MixtralStyleMLP,
                          "act_fn": nn.GELU(approximate="tanh"), "bias": True},
    "qwen_relu_unnormalized": {"intermediate": 12, "num_experts": 8, "top_k": 3, "mlp": LlamaStyleMLP,
                               "act_fn": nn.ReLU(), "norm_topk_prob": False},
}  # fmt: skip


@pytest.mark.parametrize("options", BLOCKS.values(), ids=BLOCKS.keys())
def test_fused_model_keeps_outputs_and_gradients(options, monkeypatch):
    model = TinyModel(options).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    expected = model(x)
    expected_grad = torch.autograd.grad(expected.square().sum(), model.norm.weight)[0]

    fused = moe_gemm.fuse_experts(model)

    assert fused == ["layers.0", "layers.1"]
    for layer in model.layers:
        assert isinstance(layer.experts, MoEExperts)
        assert not any(isinstance(m, nn.Linear) for m in layer.experts.modules()), "the per-expert MLPs are gone"
    calls = []
    original = moe_gemm.layer.experts_forward
    monkeypatch.setattr(moe_gemm.layer, "experts_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = model(x)
    assert len(calls) == 2, "every block runs through experts_forward"
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.autograd.grad(out.square().sum(), model.norm.weight)[0]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert expected.abs().max() > 0.1


def test_from_modules_stacks_weights_in_hugging_face_layout():
    block = LoopMoEBlock(16, 8, 3, 2, MixtralStyleMLP, nn.SiLU(), bias=True)
    experts = MoEExperts.from_modules(block.experts)
    assert experts.act == "silu"
    assert tuple(experts.gate_up_proj.shape) == (3, 16, 16) and tuple(experts.down_proj.shape) == (3, 16, 8)
    mlp = block.experts[1]
    assert torch.equal(experts.gate_up_proj[1], torch.cat([mlp.w1.weight, mlp.w3.weight]))
    assert torch.equal(experts.down_proj[1], mlp.w2.weight)
    assert torch.equal(experts.gate_up_proj_bias[1], torch.cat([mlp.w1.bias, mlp.w3.bias]))


def test_from_modules_keeps_dtype_requires_grad_and_an_activation_it_does_not_fuse():
    block = LoopMoEBlock(16, 8, 3, 2, LlamaStyleMLP, nn.ReLU(), bias=True).double()
    for mlp in block.experts:
        mlp.down_proj.requires_grad_(False)
    experts = MoEExperts.from_modules(block.experts)
    assert experts.act is block.experts[0].act_fn and "act=ReLU" in repr(experts)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in experts.parameters())
    assert experts.gate_up_proj.requires_grad and experts.gate_up_proj_bias.requires_grad
    assert not experts.down_proj.requires_grad and not experts.down_proj_bias.requires_grad

    hidden, weights = torch.randn(5, 16, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    ids = torch.rand(5, 3).argsort(dim=1)[:, :2]
    expected = torch.stack(
        [sum(weights[t, j] * block.experts[ids[t, j]](hidden[t]) for j in range(2)) for t in range(5)]
    )
    torch.testing.assert_close(experts(hidden, ids, weights), expected)


def test_custom_router():
    model = TinyModel(BLOCKS["llama_silu"]).double()
    bias = torch.randn(6)

    def deepseek_router(block, tokens):
        logits = block.gate(tokens).float()
        return moe_gemm.route(logits, 2, scoring="sigmoid", n_group=3, topk_group=2, e_score_correction_bias=bias)

    x = torch.randn(5, 16, dtype=torch.float64)
    experts = [layer.experts for layer in model.layers]
    expected = x
    for layer, mlps in zip(model.layers, experts):
        tokens = model.norm(expected)
        weights, ids = deepseek_router(layer, tokens)
        routed = torch.zeros_like(tokens)
        for t in range(tokens.shape[0]):
            for slot in range(2):
                routed[t] += weights[t, slot].double() * mlps[ids[t, slot]](tokens[t])
        expected = expected + routed

    moe_gemm.fuse_experts(model, route_fn=deepseek_router)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


def test_refuses_models_without_expert_lists_and_blocks_without_a_known_router():
    with pytest.raises(ValueError, match="no module"):
        moe_gemm.fuse_experts(nn.Sequential(nn.Linear(4, 4)))
    block = LoopMoEBlock(16, 8, 3, 2, LlamaStyleMLP, nn.SiLU())
    del block.norm_topk_prob
    moe_gemm.fuse_experts(block)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        block(torch.randn(2, 16))
    mixed = nn.ModuleList([LlamaStyleMLP(4, 2, nn.SiLU()), MixtralStyleMLP(4, 2, nn.SiLU())])
    with pytest.raises(ValueError, match="ModuleList"):
        MoEExperts.from_modules(mixed)


def test_transformers_modulelist_model():
    # transformers 4 stored Mixtral's experts as a ModuleList; transformers 5 already stacks them.
    modeling = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    if not hasattr(modeling, "MixtralBlockSparseTop2MLP"):
        pytest.skip("this transformers stores Mixtral's experts as 3-D tensors already (no ModuleList to fuse)")
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (2, 9))

    def mixtral_router(block, tokens):
        return moe_gemm.route(block.gate(tokens), block.top_k, scoring="softmax", renormalize=True)

    with torch.no_grad():
        expected = model(input_ids).logits
        for layer in model.model.layers:
            layer.block_sparse_moe.experts = MoEExperts.from_modules(layer.block_sparse_moe.experts)
            block = layer.block_sparse_moe
            # Mixtral's block returns (hidden, router_logits): keep that contract.
            block.forward = lambda h, block=block: (
                block.experts(h.reshape(-1, h.shape[-1]), *reversed(mixtral_router(block, h.reshape(-1, h.shape[-1]))))
                .view(h.shape),
                block.gate(h.reshape(-1, h.shape[-1])),
            )
        torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-4, atol=1e-4)
