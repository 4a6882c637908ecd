"""moe_gemm: a CUTLASS grouped GEMM for the expert layers of mixture-of-experts models on Hopper (sm_90a).

``grouped_forward(x, weight, m_sizes)`` multiplies each expert's contiguous block of rows of ``x`` by that expert's
weight. It runs the CUDA kernel of ``moe_gemm._C`` where the kernels are available, and PyTorch ops with the same
semantics elsewhere; it is differentiable, its backward running the same kernel for ``grad_x`` and a K-grouped
weight-gradient kernel for ``grad_W`` (``grouped_weight_grad``, which can also add into a float32 main-grad buffer).
``grouped_forward_fp8`` takes float8_e4m3fn operands with float32 scales, per row (channel) or per 128 columns
(128 x 128 blocks), as ``quantize_fp8`` makes them; forward only, PyTorch ops for now. Importing the package registers
the ops ``torch.ops.moe_gemm.*`` (``_ops.py``).

The MoE layer around it never syncs with the host: ``route`` (top-k routing), ``dispatch`` and ``combine`` (tokens to
expert-sorted rows and back), ``experts_forward`` and the modules ``MoEExperts`` and ``MoE``; ``fuse_experts`` moves
models whose experts are an ``nn.ModuleList`` of MLPs onto it. It is PyTorch ops, with CUDA kernels where they are
available: ``route`` is one fused kernel (``torch.ops.moe_gemm.route``), and ``experts_forward``'s eager path runs
dispatch, the gated activation and combine as one kernel each (``torch.ops.moe_gemm.dispatch_pairs``,
``gated_activation``, ``combine_rows``). ``moe_gemm.distributed`` (imported on its own) spreads the experts over the
ranks of a process group: ``ExpertParallelExperts``, and ``expert_parallel(model)`` for a model's layers.

``kernels_available(device)`` says whether the CUDA kernels run on a device: the extension is built and loaded, and the
device is an sm_90 GPU (H100, H200, GH200). Elsewhere every function takes the PyTorch path, with the same semantics.
"""

import torch

from moe_gemm._ops import kernels_available, kernels_unavailable_reason
from moe_gemm.dispatch import DispatchInfo, combine, dispatch
from moe_gemm.functional import grouped_forward, grouped_forward_fp8, grouped_weight_grad, quantize_fp8
from moe_gemm.fuse import fuse_experts
from moe_gemm.layer import MoE, MoEExperts, experts_forward
from moe_gemm.layer_fp8 import (
    MoEExpertsFP8,
    MoEExpertsFP8Training,
    experts_forward_fp8,
    quantize_fp8_weight,
    reuse_quantized_weights,
)
from moe_gemm.routing import route

__version__ = "0.1.0"
__all__ = [
    "DispatchInfo",
    "MoE",
    "MoEExperts",
    "MoEExpertsFP8",
    "MoEExpertsFP8Training",
    "__version__",
    "build_info",
    "combine",
    "dispatch",
    "experts_forward",
    "experts_forward_fp8",
    "fuse_experts",
    "grouped_forward",
    "grouped_forward_fp8",
    "grouped_weight_grad",
    "kernels_available",
    "quantize_fp8",
    "quantize_fp8_weight",
    "reuse_quantized_weights",
    "route",
]


def build_info() -> str:
    """One line: package version, torch version, and whether the CUDA kernels are available (and why not)."""
    reason = kernels_unavailable_reason()
    kernels = "available" if reason is None else f"unavailable ({reason})"
    return f"moe_gemm {__version__}, torch {torch.__version__}, CUDA kernels: {kernels}"
