"""``experts_implementation="moe_gemm"`` in Hugging Face transformers: tiny randomly initialised models (no
downloads) give the logits of ``"eager"``; ``moe_gemm.route`` picks the experts of the models' own routers.
Skipped without transformers, or per model where the installed transformers lacks it."""

from copy import deepcopy as copy_module

import pytest
import torch

from helpers import requires_cuda_op

import moe_gemm
from moe_gemm.integrations import transformers as integration

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="this transformers has no experts interface")

TINY = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_CONFIGS = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 3,
         "norm_topk_prob": True, "head_dim": 8},
    ),
    "mixtral": ("MixtralConfig", {"intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2}),
    "deepseek_v3": (
        "DeepseekV3Config",
        {"intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1,
         "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "q_lora_rank": 16,
         "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
         "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        {"intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8, "n_shared_experts": 1,
         "num_experts_per_tok": 3, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
         "routed_scaling_factor": 2.5, "norm_topk_prob": True, "head_dim": 8},
    ),
    "gpt_oss": (
        "GptOssConfig",
        {"intermediate_size": 16, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 8,
         "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
    ),
}  # fmt: skip


def tiny_model(name: str):
    config_class_name, options = TINY_CONFIGS[name]
    config_class = getattr(transformers, config_class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_class_name}")
    config = config_class(**{**TINY, **options})
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation="eager", attn_implementation="eager", dtype=torch.float32
    )
    # Biases and DeepSeek's score correction start at zero: make them random so that they are exercised.
    with torch.no_grad():
        for parameter_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if parameter_name.endswith(("proj_bias", "e_score_correction_bias", "router.bias")):
                tensor.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_logits_match_eager(name, monkeypatch):
    integration.register()
    calls = []

    def counted_experts_forward(*args, **kwargs):
        calls.append(kwargs["act"])
        return moe_gemm.experts_forward(*args, **kwargs)

    monkeypatch.setattr(integration, "experts_forward", counted_experts_forward)
    model = tiny_model(name)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 11))
    with torch.no_grad():
        eager = model(input_ids).logits
        model.set_experts_implementation("moe_gemm")
        assert model.config._experts_implementation == "moe_gemm"
        ours = model(input_ids).logits
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    # One call per MoE layer; GPT-OSS gates with its own clamped SwiGLU, the others with the SwiGLU of experts_forward.
    assert len(calls) == (1 if name in ("deepseek_v3", "glm4_moe") else 2)
    assert all(act == "silu" for act in calls) != (name == "gpt_oss")
    assert eager.abs().max() > 0.1, "logits too small for the comparison to mean anything"



def parameter_gradients(model, implementation: str, dtype: torch.dtype, input_ids) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the language-model loss, in float64, for a copy of ``model`` in ``dtype``."""
    copy = copy_module(model).to(dtype)
    copy.set_experts_implementation(implementation)
    copy.train()
    copy(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad.double() for name, p in copy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda_op])]
)
@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_bf16_gradients_stay_as_close_to_float32_as_eager(name, device):
    """Training in bfloat16 through moe_gemm moves no parameter's gradient further from the float32 gradient than
    eager bfloat16 does, beyond 2x: the router and the norms upstream of the experts included. On the CPU (the
    PyTorch path) and on the GPU (the kernels)."""
    integration.register()
    model = tiny_model(name).float().to(device)
    input_ids = torch.randint(0, TINY["vocab_size"], (4, 48), device=device)
    reference = parameter_gradients(model, "eager", torch.float32, input_ids)
    eager = parameter_gradients(model, "eager", torch.bfloat16, input_ids)
    ours = parameter_gradients(model, "moe_gemm", torch.bfloat16, input_ids)
    assert ours.keys() == reference.keys()
    for parameter_name, ref in reference.items():
        if ref.norm() == 0:
            continue
        eager_error = ((eager[parameter_name] - ref).norm() / ref.norm()).item()
        our_error = ((ours[parameter_name] - ref).norm() / ref.norm()).item()
        message = f"{parameter_name}: {our_error:.4f} from float32 against eager's {eager_error:.4f}"
        assert our_error <= 2 * max(eager_error, 1e-3), message


def route_options(name: str, config, router) -> dict:
    """The arguments of ``moe_gemm.route`` that describe the router of model ``name``."""
    if name in ("mixtral", "qwen3_moe"):
        return {"scoring": "softmax", "renormalize": config.norm_topk_prob if name == "qwen3_moe" else True}
    if name == "gpt_oss":
        return {"scoring": "softmax_topk"}
    return {
        "scoring": "sigmoid",
        "renormalize": config.norm_topk_prob,
        "n_group": config.n_group,
        "topk_group": config.topk_group,
        "e_score_correction_bias": router.e_score_correction_bias,
        "routed_scaling_factor": config.routed_scaling_factor,
    }


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_route_matches_the_models_routers(name):
    model = tiny_model(name)
    moe = model.model.layers[-1].mlp
    router = moe.gate if hasattr(moe, "gate") else moe.router
    with torch.no_grad():
        logits, hf_weights, hf_ids = router(torch.randn(40, TINY["hidden_size"]))
        weights, ids = moe_gemm.route(logits, hf_ids.shape[1], **route_options(name, model.config, router))
    # The models' routers order experts as torch.topk does (unsorted for DeepSeek-V3): compare per expert.
    hf_order, order = hf_ids.argsort(dim=1), ids.argsort(dim=1)
    assert torch.equal(hf_ids.gather(1, hf_order), ids.gather(1, order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.float().gather(1, hf_order))


def test_experts_without_gate():
    # Nemotron-H's experts are up_proj -> act_fn -> down_proj (has_gate=False), tested as a module.
    modeling = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    integration.register()
    config = transformers.NemotronHConfig(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=6, mlp_hidden_act="relu2"
    )
    config._experts_implementation = "eager"
    experts = modeling.NemotronHExperts(config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_()
    hidden, ids, weights = torch.randn(10, 16), torch.rand(10, 6).argsort(dim=1)[:, :2], torch.rand(10, 2)
    with torch.no_grad():
        eager = experts(hidden, ids, weights)
        config._experts_implementation = "moe_gemm"
        ours = experts(hidden, ids, weights)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_expert_parallel_sentinels_add_nothing(name, monkeypatch):
    # Under transformers' expert parallelism a rank's experts module gets ids of its own experts and the sentinel
    # num_experts (with weight 0) for the slots whose expert lives elsewhere. moe_gemm gives those slots no
    # contribution: the same as eager on the same call with the sentinel slots' experts dropped.
    integration.register()
    model = tiny_model(name)
    experts = next(module for module in model.modules() if type(module).__name__.endswith("Experts"))
    num_experts = experts.num_experts
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, TINY["hidden_size"], generator=generator)
    ids = torch.rand(12, num_experts, generator=generator).argsort(dim=1)[:, :2]
    weights = torch.rand(12, 2, generator=generator)
    sentinel = torch.rand(12, 2, generator=generator) < 0.4
    calls = []
    experts_forward = integration.experts_forward
    monkeypatch.setattr(integration, "experts_forward", lambda *a, **k: calls.append(1) or experts_forward(*a, **k))
    with torch.no_grad():
        experts.config._experts_implementation = "moe_gemm"
        ours = experts(hidden, torch.where(sentinel, num_experts, ids), torch.where(sentinel, 0.0, weights))
        assert calls  # moe_gemm ran
        experts.config._experts_implementation = "eager"
        # Eager on the same slots, the sentinel ones given weight 0 and a real expert in their place.
        eager = experts(hidden, ids, torch.where(sentinel, 0.0, weights))
    assert sentinel.any() and not sentinel.all()
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
