"""``python -m moe_gemm.demo``: an MoE layer through moe_gemm's recommended API, checked against float64.

The expert layer of qwen3-30b-a3b scaled down (64 tokens, top-8 of 16 experts, hidden 256, intermediate 128,
bfloat16) runs twice: as the module ``moe_gemm.MoE``, and as the two calls it is made of, ``moe_gemm.route`` (router
logits to expert ids and weights) and ``moe_gemm.experts_forward`` (the experts' grouped GEMMs, activation and
weighted sum). Each result is checked against the float64 references of ``moe_gemm.reference``, computed one token at a
time. It runs on the GPU where ``moe_gemm.kernels_available()`` (the CUDA kernels built, an sm_90 device), else on the
CPU through the PyTorch path. Exit status 1 when a check fails. The benchmark is ``python -m moe_gemm.bench``.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import moe_gemm
from moe_gemm.reference import experts_forward_reference, route_reference

TOKENS, EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 64, 16, 8, 256, 128
DTYPE = torch.bfloat16
# bfloat16 keeps 8 bits of mantissa: a rounding error of about 2**-9 relative per element.
MAX_REL_ERROR = 1e-2

COLUMNS = f"""\
  step             the call: the module MoE, or the two calls it is made of (route, then experts_forward)
  output           the shape of what it returns: [tokens, top_k] routing weights, [tokens, hidden] layer outputs
  rel. error       ||out - ref|| / ||ref|| (Frobenius) against the float64 reference, computed one token at a time;
                   for route the error of the weights, the expert ids having to be equal
  ms               wall time of one call after a warm-up call (the device synchronised)
  check            ok when the error is at most {MAX_REL_ERROR:g} (and route's ids are equal), else FAIL"""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return (torch.linalg.vector_norm(out.double().cpu() - ref) / torch.linalg.vector_norm(ref)).item()


def timed(fn, *args):
    """``(fn(*args), wall time in ms)`` of a call after a warm-up call (the first call of a custom op imports
    torch._dynamo, about a second)."""
    fn(*args)
    device = args[0].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


@torch.no_grad()
def run(device: torch.device) -> int:
    torch.manual_seed(0)
    sizes = {"hidden_size": HIDDEN, "num_experts": EXPERTS, "intermediate_size": INTERMEDIATE, "top_k": TOP_K}
    layer = moe_gemm.MoE(**sizes, renormalize=True, device=device, dtype=DTYPE)
    hidden = torch.randn(TOKENS, HIDDEN, device=device, dtype=DTYPE)

    # The module: router (float32), route, experts.
    out, layer_ms = timed(layer, hidden)
    # The same layer as calls on tensors, as a model integration makes them.
    logits = F.linear(hidden.float(), layer.router.weight.float())
    (weights, ids), route_ms = timed(lambda x: moe_gemm.route(x, TOP_K, renormalize=True), logits)
    experts = layer.experts
    experts_out, experts_ms = timed(
        lambda x: moe_gemm.experts_forward(x, ids, weights, experts.gate_up_proj, experts.down_proj), hidden
    )

    ref_weights, ref_ids = route_reference(logits.cpu(), TOP_K, renormalize=True)
    gate_up_proj, down_proj = experts.gate_up_proj.cpu(), experts.down_proj.cpu()
    ref_out = experts_forward_reference(hidden.cpu(), ref_ids, ref_weights, gate_up_proj, down_proj)
    ids_equal = torch.equal(ids.cpu(), ref_ids)

    if device.type == "cuda":
        where = f"{device}, CUDA kernels"
    else:
        where = "cpu, PyTorch path"
    print(
        f"moe_gemm demo on {where}: qwen3-30b-a3b's expert layer scaled down to {TOKENS} tokens, top-{TOP_K} of "
        f"{EXPERTS} experts, hidden {HIDDEN}, intermediate {INTERMEDIATE}, {str(DTYPE).removeprefix('torch.')}"
    )
    print(moe_gemm.build_info())
    print(f"{'step':<16} {'output':>10} {'rel. error':>11} {'ms':>8}  check")
    rows = [
        ("MoE", out, ref_out, layer_ms, True),
        ("route", weights, ref_weights, route_ms, ids_equal),
        ("experts_forward", experts_out, ref_out, experts_ms, True),
    ]
    failed = False
    for step, result, ref, ms, extra_check in rows:
        error = relative_error(result, ref)
        ok = extra_check and bool(torch.isfinite(result).all()) and error <= MAX_REL_ERROR
        failed |= not ok
        shape = "[" + ", ".join(map(str, result.shape)) + "]"
        print(f"{step:<16} {shape:>10} {error:>11.2e} {ms:>8.2f}  {'ok' if ok else 'FAIL'}")
    print("Columns:\n" + COLUMNS)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_gemm.demo", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    return run(torch.device("cuda") if moe_gemm.kernels_available() else torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
