"""moe_gemm: a CUTLASS grouped GEMM for the expert layers of mixture-of-experts models on Hopper (sm_90a).

``grouped_forward(x, weight, m_sizes)`` multiplies each expert's contiguous block of rows of ``x`` by that expert's
weight. It runs the CUDA kernel of ``moe_gemm._C`` when built, and a pure-PyTorch path with the same semantics on CPU
or without the extension; it is differentiable, its backward running the same kernel for ``grad_x`` and a K-grouped
weight-gradient kernel for ``grad_W`` (``grouped_weight_grad``, which can also add into a float32 main-grad buffer).
Importing the package registers the ops ``torch.ops.moe_gemm.grouped_mm``, ``grouped_mm_wgrad`` and
``grouped_mm_wgrad_accumulate_``.

The MoE layer around it never syncs with the host: ``route`` (top-k routing), ``dispatch`` and ``combine`` (tokens to
expert-sorted rows and back), ``experts_forward`` and the modules ``MoEExperts`` and ``MoE``; ``fuse_experts`` moves
models whose experts are an ``nn.ModuleList`` of MLPs onto it. It is PyTorch ops, with CUDA kernels where the
extension is built: ``route`` is one fused kernel (``torch.ops.moe_gemm.route``), and ``experts_forward``'s eager path
runs dispatch, the gated activation and combine as one kernel each (``_layer_kernels``).
"""

import torch

from moe_gemm._ops import KERNELS_UNAVAILABLE_REASON, cuda_available
from moe_gemm.dispatch import DispatchInfo, combine, dispatch
from moe_gemm.functional import grouped_forward, grouped_weight_grad
from moe_gemm.fuse import FusedExperts, fuse_experts
from moe_gemm.layer import MoE, MoEExperts, experts_forward
from moe_gemm.routing import route

__version__ = "0.1.0"
__all__ = [
    "DispatchInfo",
    "FusedExperts",
    "MoE",
    "MoEExperts",
    "__version__",
    "build_info",
    "combine",
    "cuda_available",
    "dispatch",
    "experts_forward",
    "fuse_experts",
    "grouped_forward",
    "grouped_weight_grad",
    "route",
]


def build_info() -> str:
    """One line: package version, torch version, and whether the CUDA kernels are built (and why not)."""
    kernels = "built" if cuda_available() else f"not built ({KERNELS_UNAVAILABLE_REASON})"
    return f"moe_gemm {__version__}, torch {torch.__version__}, CUDA kernels: {kernels}"
