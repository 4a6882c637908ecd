"""How far each parameter's bf16 gradient lies from the float32 gradient, for tiny random transformers MoE models
trained one step (language-model loss), with experts_implementation "eager", "grouped_mm" and "moe_gemm", and
moe_gemm with parts of it swapped for PyTorch ops (to find which part moves a gradient):

  small_kernels_off  dispatch, the activation and combine as PyTorch ops
  gemm_torch         the grouped GEMMs as PyTorch ops
  all_torch          both
  unfused            experts_forward(..., fused=False): the composed ops under autograd

Prints, per model, the parameters where some variant is more than 1.5x eager's relative distance (mean over seeds),
and every router weight. The evidence behind docs/design.md's precision paragraph.

  python scripts/grad_precision.py [cuda|cpu] [model,model,...] [seeds]
"""
import sys, functools
from copy import deepcopy
import torch
import transformers
import moe_gemm
from moe_gemm import _ops
from moe_gemm.integrations import transformers as integration

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
MODELS = sys.argv[2].split(",") if len(sys.argv) > 2 else None
SEEDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
TINY = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", {"intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8,
                  "num_experts_per_tok": 3, "norm_topk_prob": True, "head_dim": 8}),
    "deepseek_v3": ("DeepseekV3Config", {"intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8,
                    "n_shared_experts": 1, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
                    "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4, "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True}),
    "glm4_moe": ("Glm4MoeConfig", {"intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8,
                 "n_shared_experts": 1, "num_experts_per_tok": 3, "n_group": 1, "topk_group": 1,
                 "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "head_dim": 8}),
    "qwen3_next": ("Qwen3NextConfig", {"intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8,
                   "num_experts_per_tok": 3, "norm_topk_prob": True, "head_dim": 8, "shared_expert_intermediate_size": 16,
                   "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
                   "linear_value_head_dim": 8, "layer_types": ["linear_attention", "full_attention"]}),
}

def tiny_model(name):
    cls_name, options = CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**TINY, **options})
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager",
                                                          attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for pname, t in [*model.named_parameters(), *model.named_buffers()]:
            if pname.endswith(("proj_bias", "e_score_correction_bias", "router.bias")):
                t.normal_(0, 0.1)
    return model.to(device)

def grads(model, impl, dtype, ids):
    copy = deepcopy(model).to(dtype)
    copy.set_experts_implementation(impl)
    copy.train()
    copy(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.double() for n, p in copy.named_parameters() if p.grad is not None}

class patched:
    def __init__(self, **attrs): self.attrs = attrs
    def __enter__(self):
        self.old = {k: getattr(_ops, k) for k in self.attrs}
        for k, v in self.attrs.items(): setattr(_ops, k, v)
    def __exit__(self, *a):
        for k, v in self.old.items(): setattr(_ops, k, v)

no = lambda *a, **k: False
torch_gemm = lambda name, dev: getattr(_ops, name.rstrip("_") + "_torch")
VARIANTS = {
    "moe_gemm": {},
    "small_kernels_off": dict(dispatch_kernel_applies=no, gated_activation_kernel_applies=no, combine_kernel_applies=no),
    "gemm_torch": dict(gemm_op=torch_gemm),
    "all_torch": dict(gemm_op=torch_gemm, dispatch_kernel_applies=no, gated_activation_kernel_applies=no,
                      combine_kernel_applies=no),
}
integration.register()
for name in (MODELS or CONFIGS):
    if not hasattr(transformers, CONFIGS[name][0]):
        print("skip", name); continue
    torch.manual_seed(0)
    try:
        model = tiny_model(name).float()
    except Exception as e:
        print("skip", name, repr(e)[:200]); continue
    worst = {}
    for seed in range(SEEDS):
        torch.manual_seed(seed)
        ids = torch.randint(0, TINY["vocab_size"], (4, 48), device=device)
        ref = grads(model, "eager", torch.float32, ids)
        res = {"eager": grads(model, "eager", torch.bfloat16, ids), "grouped_mm": grads(model, "grouped_mm", torch.bfloat16, ids)}
        for v, attrs in VARIANTS.items():
            with patched(**attrs):
                res[v] = grads(model, "moe_gemm", torch.bfloat16, ids)
        original = integration.experts_forward
        integration.experts_forward = functools.partial(original, fused=False)
        res["unfused"] = grads(model, "moe_gemm", torch.bfloat16, ids)
        integration.experts_forward = original
        for pname, r in ref.items():
            if r.norm() == 0: continue
            row = {k: ((g[pname] - r).norm() / r.norm()).item() for k, g in res.items()}
            worst.setdefault(pname, []).append(row)
    print(f"== {name} on {device}: parameters where some bf16 variant is > 1.5x eager's distance (mean of {SEEDS} seeds)")
    keys = ["eager", "grouped_mm", *VARIANTS, "unfused"]
    print(f"{'parameter':60s} " + " ".join(f"{k:>17s}" for k in keys))
    for pname, rows in worst.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        if max(mean[k] for k in keys[1:]) > 1.5 * mean["eager"] or "gate.weight" in pname:
            print(f"{pname:60s} " + " ".join(f"{mean[k]:17.4f}" for k in keys))
