"""``experts_implementation="moe_gemm"`` for Hugging Face transformers (the experts interface of transformers 5).

``register()`` adds ``moe_gemm_experts_forward`` to ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``; then::

    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_gemm")
    # or, on a loaded model: model.set_experts_implementation("moe_gemm")

serves every experts module decorated with ``@use_experts_implementation`` (Mixtral, Qwen-MoE, DeepSeek-V3,
GPT-OSS, ...) with ``moe_gemm.experts_forward``, and the FP8 experts of transformers' fine-grained FP8 quantization
(``FP8Experts``: float8_e4m3fn weights with ``*_scale_inv`` per 128 x 128 block) with
``moe_gemm.layer_fp8.experts_forward_fp8``, without dequantizing the weights. The module's flags say how to read its
weights: ``has_gate`` (``gate_up_proj``, else ``up_proj``), ``has_bias`` (``*_proj_bias``), ``is_transposed``
(``[E, in, out]`` weights) and ``is_concatenated`` (``[gate; up]`` halves, else interleaved). A module with its own
``_apply_gate``, or an activation other than SiLU or GELU, is gated by its own code.
"""

import torch

from moe_gemm._validation import fp8_groups
from moe_gemm.layer import activation_name, experts_forward
from moe_gemm.layer_fp8 import experts_forward_fp8

IMPLEMENTATION_NAME = "moe_gemm"


def _fused_activation(module: torch.nn.Module) -> str | None:
    """The name of the module's gated activation when ``experts_forward`` fuses it and the module gates with the
    default ``act_fn(gate) * up``, else None."""
    from transformers.integrations.moe import _default_apply_gate

    if type(module)._apply_gate is not _default_apply_gate:
        return None
    return activation_name(getattr(module, "act_fn", None))


def moe_gemm_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts interface's signature: ``[T, H]`` hidden states, ``[T, k]`` ids and weights -> ``[T, H]``.

    Ids outside ``[0, num_experts)`` (expert-parallel sentinels) contribute nothing.
    """
    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError("experts_implementation='moe_gemm' does not support a post-expert norm")
    prefix = "gate_up_proj" if self.has_gate else "up_proj"
    if not self.has_gate:
        act = self.act_fn
    else:
        act = _fused_activation(self) or self._apply_gate
    return experts_forward(
        hidden_states,
        top_k_index,
        top_k_weights,
        getattr(self, prefix),
        self.down_proj,
        act=act,
        weight_transposed=self.is_transposed,
        concatenated=self.is_concatenated,
        gate_up_bias=getattr(self, f"{prefix}_bias") if self.has_bias else None,
        down_bias=self.down_proj_bias if self.has_bias else None,
    )


def moe_gemm_fp8_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts interface for transformers' ``FP8Experts`` (fine-grained FP8): ``experts_forward_fp8`` on its fp8
    weights and their ``*_scale_inv``, the activations quantized per row and 128 columns (its "dynamic" scheme).

    The scales are used as stored: 128 x 128 blocks (a gate/up grid that transformers pads to two block rows when
    ``2I <= 128`` is cut back to ``ceil(2I / 128)``), UE8M0 ones converted to float32 exactly. Other block sizes, and
    none (one scale per expert), raise NotImplementedError.
    """
    if getattr(self, "activation_scheme", "dynamic") != "dynamic":
        raise NotImplementedError("experts_implementation='moe_gemm' runs FP8 experts with activation_scheme='dynamic'")
    if self.block_size is None or tuple(self.block_size) != (128, 128):
        raise NotImplementedError(
            f"experts_implementation='moe_gemm' runs FP8 experts with 128 x 128 weight blocks, got {self.block_size}"
        )
    prefix = "gate_up_proj" if self.has_gate else "up_proj"
    # Block scales [E, ceil(N / 128), ceil(K / 128)] in float32 (UE8M0 ones exactly), cut to the weight's N.
    scales = [getattr(self, f"{name}_scale_inv").float()[:, : fp8_groups(getattr(self, name).shape[1])]
              for name in (prefix, "down_proj")]  # fmt: skip
    if not self.has_gate:
        act = self.act_fn
    elif all(getattr(self, name, None) is None for name in ("swiglu_alpha", "limit", "gate_softcap")):
        act = activation_name(self.act_fn) or self._apply_gate
    else:
        act = self._apply_gate
    return experts_forward_fp8(
        hidden_states, top_k_index, top_k_weights, getattr(self, prefix), scales[0], self.down_proj, scales[1], act=act
    )


def register() -> None:
    """Make ``experts_implementation="moe_gemm"`` available to transformers models, their FP8 experts included
    (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, moe_gemm_experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without fine-grained FP8 experts
        return
    ALL_FP8_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, moe_gemm_fp8_experts_forward)
