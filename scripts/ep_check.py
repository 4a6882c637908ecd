"""Expert parallelism on every rank of a ``torchrun`` group, against the layer on one device: the check of a
multi-GPU machine (one process per GPU, NCCL), and on CPU (gloo) a test of this script::

    torchrun --nproc-per-node 8 scripts/ep_check.py                # CUDA: both transports, CUDA-graph replay
    torchrun --nproc-per-node 2 scripts/ep_check.py --device cpu   # gloo: the all_to_all transport, float64

Every rank builds the same whole layer (E = 4 experts per rank, biases, SwiGLU) and every rank's tokens from one
seed, runs ``ExpertParallelExperts`` on its own tokens with each transport, and compares the output and every
gradient (its tokens' hidden states and routing weights, its experts' weights and biases) with ``MoEExperts`` over
all the experts and all the tokens, on its own device. Routings: ``uniform``; ``skewed`` (every token of every rank
to the last rank's experts, a quarter of the slots sentinels -1 or E, rank 0 without tokens); ``one_expert`` (every
slot on expert 1 or a sentinel). Tokens per rank differ (``--tokens`` + 37 * rank). Each forward and backward runs
twice and must repeat bitwise. With CUDA, the symmetric-memory layer's forward is captured in a CUDA graph and
replayed on routings written into its inputs, each equal bitwise to an eager forward of the same inputs.

Tolerances: float64 on CPU, 1e-10; bf16 on CUDA, the relative Frobenius error of each result at most 1.25x the
one-device bf16 layer's distance from its float32 twin, plus 1e-3 (the summation orders differ). NVLink multicast
stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``, set here
before the group starts unless already set). Rank 0 prints one line per check and a verdict; exit status 1 when any
check fails on any rank.
"""
import argparse
import copy
import datetime
import os
import sys

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):  # fmt: skip
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moe_gemm  # noqa: E402
from moe_gemm import _ops  # noqa: E402
from moe_gemm.distributed import TRANSPORTS, ExpertParallelExperts  # noqa: E402

EXPERTS_PER_RANK, HIDDEN, INTERMEDIATE, TOP_K = 4, 256, 128, 6
ROUTINGS = ("uniform", "skewed", "one_expert")
REPEATS_OF_GRAPH = 3


def tokens_per_rank(base: int, world_size: int, routing: str) -> list[int]:
    counts = [base + 37 * rank for rank in range(world_size)]
    if routing == "skewed":
        counts[0] = 0
    return counts


def make_routing(routing: str, num_tokens: int, num_experts: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [T, TOP_K], weights [T, TOP_K])`` on the CPU, drawn from ``generator``."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    if routing == "skewed":
        scores[:, -EXPERTS_PER_RANK:] += 2  # the last rank's experts first
    ids = scores.argsort(dim=1, descending=True)[:, :TOP_K]
    if routing == "one_expert":
        ids = torch.ones_like(ids)
    if routing in ("skewed", "one_expert"):
        sentinel = torch.where(torch.rand(ids.shape, generator=generator) < 0.5, -1, num_experts)
        ids = torch.where(torch.rand(ids.shape, generator=generator) < 0.25, sentinel, ids)
    return ids, torch.rand(ids.shape, generator=generator)


def forward_backward(layer, hidden, ids, weights, grad_out) -> dict[str, torch.Tensor]:
    hidden = hidden.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(hidden, ids, weights)
    out.backward(grad_out)
    results = {"out": out.detach(), "hidden": hidden.grad, "top_k_weights": weights.grad}
    return results | {name: parameter.grad for name, parameter in layer.named_parameters()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    reference = want.double().norm().item()
    return (got.double() - want.double()).norm().item() / max(reference, 1e-30)


def check_routing(routing: str, args, device, dtype, rank: int, world_size: int) -> list[tuple[str, bool, str]]:
    """The checks of one routing on this rank: ``(name, passed, detail)``."""
    num_experts = EXPERTS_PER_RANK * world_size
    generator = torch.Generator().manual_seed(args.seed)
    counts = tokens_per_rank(args.tokens, world_size, routing)
    total = sum(counts)
    whole = moe_gemm.MoEExperts(num_experts=num_experts, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                bias=True)  # fmt: skip
    with torch.no_grad():
        for parameter in whole.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    hidden = torch.randn(total, HIDDEN, generator=generator)
    ids, weights = make_routing(routing, total, num_experts, generator)
    grad_out = torch.randn(total, HIDDEN, generator=generator)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    local = slice(rank * EXPERTS_PER_RANK, (rank + 1) * EXPERTS_PER_RANK)

    def on_device(tensor, cast=True):
        return tensor.to(device, dtype) if cast and tensor.is_floating_point() else tensor.to(device)

    layer_whole = copy.deepcopy(whole).to(device, dtype)
    inputs = [on_device(t) for t in (hidden, ids)] + [weights.to(device), on_device(grad_out)]
    expected = forward_backward(layer_whole, *inputs)
    baseline = None
    if dtype != torch.float64:  # the one-device layer's own distance from float32 (the CUDA kernels take 16 bits)
        exact = forward_backward(copy.deepcopy(whole).float(), hidden, ids, weights, grad_out)
        baseline = {name: relative_error(expected[name].cpu(), exact[name]) for name in exact}

    def want(name: str) -> torch.Tensor:
        return expected[name][mine] if name in ("out", "hidden", "top_k_weights") else expected[name][local]

    checks = []
    for transport in args.transports:
        options = {"max_tokens": max(counts)} if transport == "symmetric_memory" else {}
        layer = ExpertParallelExperts.from_experts(layer_whole, transport=transport, **options)
        arguments = [t[mine] for t in inputs]
        first, second = (forward_backward(layer, *arguments) for _ in range(2))
        worst, worst_name = 0.0, ""
        passed = True
        for name, value in first.items():
            error = relative_error(value, want(name))
            bound = 1e-10 if baseline is None else 1.25 * baseline[name] + 1e-3
            passed &= bool(torch.isfinite(value).all()) and error <= bound
            if error > worst:
                worst, worst_name = error, name
        checks.append((f"{routing} {transport}: output and gradients", passed, f"worst {worst:.1e} ({worst_name})"))
        bitwise = all(torch.equal(first[name], second[name]) for name in first)
        checks.append((f"{routing} {transport}: reruns bitwise", bitwise, ""))
        if transport == "symmetric_memory" and device.type == "cuda":
            checks.append(check_graph(layer, arguments, routing, num_experts, args.seed + 1 + rank))
    return checks


def check_graph(layer, arguments, routing: str, num_experts: int, seed: int) -> tuple[str, bool, str]:
    """The symmetric-memory layer's forward captured once, replayed on new routings written into its inputs."""
    hidden, ids, weights = (t.clone() for t in arguments[:3])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer(hidden, ids, weights)  # the buffers exist already (the checks above); this warms the capture up
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(hidden, ids, weights)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(hidden, ids, weights)
        equal = True
        for replay in range(REPEATS_OF_GRAPH):
            new_ids, new_weights = make_routing(ROUTINGS[replay % len(ROUTINGS)], ids.shape[0], num_experts, generator)
            ids.copy_(new_ids)
            weights.copy_(new_weights)
            hidden.normal_()
            out.fill_(float("nan"))
            dist.barrier()
            graph.replay()
            torch.cuda.synchronize()
            equal &= torch.equal(out, layer(hidden, ids, weights))
    return f"{routing} symmetric_memory: CUDA graph replays with new routing", equal, f"{REPEATS_OF_GRAPH} replays"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=300, help="tokens of rank 0 (rank r: + 37 * r)")
    parser.add_argument("--routings", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    parser.add_argument("--transports", nargs="+", choices=list(TRANSPORTS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda":
        reason = _ops.kernels_unavailable_reason()
        if reason is not None:
            parser.error(f"--device cuda needs the built kernels: {reason}")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device, dtype, backend = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, "nccl"
    else:
        device, dtype, backend = torch.device("cpu"), torch.float64, "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5), **options)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.transports is None:
        args.transports = [name for name, transport in TRANSPORTS.items() if transport.unavailable_reason(device) is None]
    try:
        checks = []
        for routing in args.routings:
            checks += check_routing(routing, args, device, dtype, rank, world_size)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, checks)
        if rank == 0:
            print(f"# {moe_gemm.build_info()}; {world_size} ranks, {backend}, {dtype}; transports "
                  f"{', '.join(args.transports)}")  # fmt: skip
            for index, (name, _, _) in enumerate(checks):
                results = [rank_checks[index] for rank_checks in gathered]
                passed = all(result[1] for result in results)
                details = "; ".join(f"rank {r}: {result[2]}" for r, result in enumerate(results) if result[2])
                print(f"{'ok  ' if passed else 'FAIL'} {name}" + (f"  ({details})" if details else ""))
        failed = any(not passed for rank_checks in gathered for _, passed, _ in rank_checks)
        if rank == 0:
            print("some checks FAILED" if failed else "all checks passed")
        # No rank tears its group down while another still talks to it: without this, rank 0 (still printing) aborted
        # in about one run in eight on two CPU processes ("terminate called without an active exception").
        dist.barrier()
        return 1 if failed else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_code = main()
    # Leave without the interpreter's finalization: on two CPU processes (gloo) a rank still aborted there now and
    # then ("terminate called without an active exception", SIGABRT), after every check had passed, the ranks had met
    # at the barrier and the group was destroyed, which failed the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
