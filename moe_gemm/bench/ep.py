"""Benchmark of expert parallelism: ``python -m moe_gemm.bench --ep``, one process per GPU under ``torchrun``::

    torchrun --nproc-per-node 8 -m moe_gemm.bench --ep [--configs NAME ...] [--tokens T ...]
        [--ep-layer-tokens T] [--quick] [--json PATH]

Without ``torchrun`` it runs as a group of one. Every transport of ``moe_gemm.distributed.TRANSPORTS`` that runs on the
device (``symmetric_memory``: CUDA, sized for the step's tokens) runs in the same process group, one after the other
on the same data, so their figures compare within the run.

Two tables, for each config of ``bench/layer_configs.json`` named by ``--configs`` (default ``CONFIGS``: Qwen3-30B-A3B
and DeepSeek-V3), with its hidden size d, E experts and top_k K:

- transport: ``dispatch`` (the rows of this rank's ``(token, slot)`` pairs to the ranks of their experts, the counts
  with them) and ``combine`` (the rows back), at ``--tokens`` tokens per rank (default ``TRANSPORT_TOKENS``: decode
  and prefill sizes), routing uniform over the experts. GB/s per GPU: the bytes of every row this rank sends, its
  own share included (a group of one copies them all locally), over the time of the step; for a transport that a
  CUDA graph can capture (``symmetric_memory``), the step replayed from one too (``graph ms``, ``graph GB/s``): a
  single eager step also waits for its host work, about 80 small launches for the symmetric-memory dispatch, which
  a graph removes and which a layer's GEMMs hide in a model (no host sync).
- layer: ``ExpertParallelExperts`` (SwiGLU, the config's n) at ``--ep-layer-tokens`` (``LAYER_TOKENS``) tokens per
  rank, forward and forward+backward TFLOP/s per GPU in the layer benchmark's convention (forward ``6*T*K*d*n``
  with T this rank's tokens; ``bench/layer.py``), the forward timed as in training (autograd recording).

Times: each step is run by every rank together, after a barrier, synchronised with the device before and after, and
timed on the host (``timed_ms``); the table shows the median of the slowest rank. Each transport's layer output is
checked against ``experts_forward`` over the whole layer's weights (built on every rank from one seed) on the rank's
tokens (relative Frobenius error at most ``MAX_REL_ERROR``). Only rank 0 prints and writes the JSON.

On CPU (gloo) it runs too, for a smoke test of the harness; its figures say nothing about GPUs.
"""

import argparse
import datetime
import os
import statistics
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist

import moe_gemm
from moe_gemm import _ops
from moe_gemm.bench import report, timing
from moe_gemm.bench.layer import layer_flops, load_layer_configs
from moe_gemm.bench.suite import MAX_REL_ERROR
from moe_gemm.distributed import TRANSPORTS, ExpertParallelExperts, RankFlags, release_shared_buffers

CONFIGS = ("qwen3-30b-a3b", "deepseek-v3")
# Tokens per rank: decode sizes, then prefill.
TRANSPORT_TOKENS = (1, 8, 32, 128, 4096, 8192, 16384)
QUICK_TRANSPORT_TOKENS = (1, 128, 4096)
LAYER_TOKENS = 8192
QUICK_LAYER_TOKENS = 1024
WARMUP, REPS = 3, 20

TRANSPORT_TABLE = ("config", "transport", "world", "tokens", "step", "ep_mb", "ep_ms", "ep_gbs", "ep_graph_ms",
                   "ep_graph_gbs", "check")  # fmt: skip
LAYER_TABLE = ("config", "transport", "world", "tokens", "fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops",
               "rel_error", "check")  # fmt: skip


def init_group(device: torch.device) -> bool:
    """Initialise the default process group unless it is: from ``torchrun``'s environment (NCCL on GPUs, gloo on
    CPU), else as a group of one. Returns whether this call initialised it (and so should destroy it)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Bound to this rank's GPU (NCCL's barrier would otherwise guess it, with a warning).
    options = {"device_id": device} if device.type == "cuda" else {}
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **options)
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="moe_gemm_ep_"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **options)
    return True


def timed_ms(fn: Callable[[], object], device: torch.device, warmup: int = WARMUP, reps: int = REPS) -> float:
    """The median time of ``fn`` over ``reps`` runs (after ``warmup``), each started by every rank together, of the
    slowest rank: in ms."""
    times = []
    for _ in range(warmup + reps):
        dist.barrier()
        times.append(timing.time_once_ms(fn, device))
    times = times[warmup:]
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.item()


def uniform_routing(tokens: int, num_experts: int, top_k: int, device, generator) -> torch.Tensor:
    """``[tokens, top_k]`` distinct experts per token, uniform."""
    scores = torch.rand(tokens, num_experts, device=device, generator=generator)
    return scores.topk(top_k, dim=1).indices


def available_transports(device: torch.device) -> list[str]:
    """The transports of ``TRANSPORTS`` that run on ``device`` (symmetric memory: CUDA only)."""
    return [name for name, transport in TRANSPORTS.items() if transport.unavailable_reason(device) is None]


def transport_options(name: str, tokens: int) -> dict:
    """What the transport ``name`` needs beyond the group and E: the symmetric-memory one, its static size."""
    return {"max_tokens": max(tokens, 1)} if name == "symmetric_memory" else {}


def measure_transport(name: str, config: dict, tokens: int, setup: dict) -> list[dict]:
    """The dispatch and combine rows of every transport at ``tokens`` tokens per rank."""
    device, dtype, generator = setup["device"], setup["dtype"], setup["generator"]
    hidden = torch.randn(tokens, config["d"], device=device, dtype=dtype, generator=generator)
    ids = uniform_routing(tokens, config["E"], config["K"], device, generator)
    flags = RankFlags(rejected=False, needs_grad=False, grad_enabled=False)
    rows = []
    for transport_name in available_transports(device):
        transport = TRANSPORTS[transport_name](None, config["E"], **transport_options(transport_name, tokens))
        received, _, exchange = transport.dispatch(hidden, ids, flags, None, device)
        element_bytes = hidden.element_size() * config["d"]
        rows_sent, rows_received = transport.rows_moved(exchange)
        steps = {
            "dispatch": (lambda: transport.dispatch(hidden, ids, flags, None, device), rows_sent),
            "combine": (lambda: transport.combine(received, exchange), rows_received),
        }
        for step, (fn, rows_sent) in steps.items():
            ms = timed_ms(fn, device)
            megabytes = rows_sent * element_bytes / 1e6
            row = {"config": name, "transport": transport_name, "world": setup["world"], "tokens": tokens,
                   "step": step, "ep_mb": megabytes, "ep_ms": ms, "ep_gbs": megabytes / ms, "check": "ok"}  # fmt: skip
            if TRANSPORTS[transport_name].graph_safe and device.type == "cuda":
                # The step replayed from a CUDA graph, as a server captures its decode step: no host work.
                graph, _ = timing.capture(fn)
                row["ep_graph_ms"] = timed_ms(graph.replay, device)
                row["ep_graph_gbs"] = megabytes / row["ep_graph_ms"]
                del graph
            rows.append(row)
    # Each token count sized its own buffers: free them (every rank, after timed_ms's closing all-reduce).
    release_shared_buffers()
    return rows


def measure_layer(name: str, config: dict, tokens: int, setup: dict) -> list[dict]:
    """The forward and forward+backward of ``ExpertParallelExperts`` with every transport at ``tokens`` per rank."""
    device, dtype, generator = setup["device"], setup["dtype"], setup["generator"]
    sizes = {"num_experts": config["E"], "hidden_size": config["d"], "intermediate_size": config["n"]}
    hidden = torch.randn(tokens, config["d"], device=device, dtype=dtype, generator=generator).requires_grad_()
    ids = uniform_routing(tokens, config["E"], config["K"], device, generator)
    weights = torch.rand(tokens, config["K"], device=device, generator=generator).requires_grad_()
    grad_out = torch.randn(tokens, config["d"], device=device, dtype=dtype, generator=generator)
    # The whole layer, the same on every rank (one seed): each transport's module keeps this rank's slice of it, and
    # its output on this rank's tokens is checked against experts_forward over all the experts.
    torch.manual_seed(setup["seed"])
    whole = moe_gemm.MoEExperts(**sizes, device=device, dtype=dtype)
    with torch.no_grad():
        reference = moe_gemm.experts_forward(hidden, ids, weights, whole.gate_up_proj, whole.down_proj)
    layers = {
        name: ExpertParallelExperts.from_experts(whole, transport=name, **transport_options(name, tokens))
        for name in available_transports(device)
    }
    del whole
    rows = []
    for transport_name, layer in layers.items():

        def step():
            layer.zero_grad(set_to_none=True)
            hidden.grad = weights.grad = None
            layer(hidden, ids, weights).backward(grad_out)

        out = layer(hidden, ids, weights).detach()
        error = (out.float() - reference.float()).norm().item() / max(reference.float().norm().item(), 1e-30)
        row = {"config": name, "transport": transport_name, "world": setup["world"], "tokens": tokens,
               "rel_error": error, "check": "ok" if error <= MAX_REL_ERROR else "FAIL"}  # fmt: skip
        row["fwd_ms"] = timed_ms(lambda: layer(hidden, ids, weights), device)
        row["fwd_bwd_ms"] = timed_ms(step, device)
        flops = layer_flops(config | {"T": tokens})
        for metric in ("fwd", "fwd_bwd"):
            row[f"{metric}_tflops"] = flops[metric] / (row[f"{metric}_ms"] * 1e9)
        rows.append(row)
    del layers
    release_shared_buffers()
    return rows


def run(args: argparse.Namespace, configs: dict[str, dict] | None = None) -> int:
    """The ``--ep`` benchmark for the arguments of ``python -m moe_gemm.bench`` (configs, tokens, quick, dtype, seed,
    json); ``configs`` replaces those of ``layer_configs.json`` (tests). Exit status 1 when a row fails its check."""
    use_cuda = torch.cuda.is_available() and _ops.kernels_unavailable_reason() is None
    if use_cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    owns_group = init_group(device)
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if configs is None:
            all_configs = load_layer_configs()["configs"]
            configs = {name: all_configs[name] for name in (args.configs or CONFIGS)}
        transport_tokens = args.tokens or (QUICK_TRANSPORT_TOKENS if args.quick else TRANSPORT_TOKENS)
        layer_tokens = args.ep_layer_tokens or (QUICK_LAYER_TOKENS if args.quick else LAYER_TOKENS)
        setup = {"device": device, "dtype": getattr(torch, args.dtype), "world": world, "seed": args.seed,
                 "generator": torch.Generator(device=device).manual_seed(args.seed + rank)}  # fmt: skip
        printing = rank == 0
        if printing:
            smoke = "" if use_cuda else " (gloo: a smoke test of the harness, no GPU figures)"
            skipped = [f"{name} ({TRANSPORTS[name].unavailable_reason(device)})" for name in TRANSPORTS
                       if name not in available_transports(device)]  # fmt: skip
            not_run = f"; not run: {', '.join(skipped)}" if skipped else ""
            print(f"# {moe_gemm.build_info()}; {world} rank(s) of {report.device_name()}{smoke}; transports "
                  f"{', '.join(available_transports(device))}{not_run}")
            print(f"# dtype {args.dtype}, seed {args.seed}; routing uniform; GB/s per GPU: the rows each rank sends "
                  "(its own share included) over the step's time, slowest rank's median; TFLOP/s per GPU: fwd "
                  f"6*T*K*d*n, fwd+bwd 18*T*K*d*n with T the tokens per rank")  # fmt: skip
        transport_cases = [(name, config, tokens) for name, config in configs.items() for tokens in transport_tokens]
        transport_rows = _table(TRANSPORT_TABLE, transport_cases, measure_transport, setup, printing)
        layer_cases = [(name, config, layer_tokens) for name, config in configs.items()]
        if printing:
            print()
        layer_rows = _table(LAYER_TABLE, layer_cases, measure_layer, setup, printing)
        failures = [row for row in [*transport_rows, *layer_rows] if row["check"] != "ok"]
        if printing and failures:
            print(f"{len(failures)} rows FAILED their check")
        if printing and args.json:
            report.write_json(args.json, args, mode="ep", world_size=world, configs=configs, rows=transport_rows,
                              layer_rows=layer_rows)  # fmt: skip
        if owns_group:
            # No rank tears the group down while rank 0 still writes: scripts/ep_check.py, which did, aborted now and
            # then at exit on two CPU processes.
            dist.barrier()
        return 1 if printing and failures else 0
    finally:
        if owns_group:
            dist.destroy_process_group()


def _table(table: tuple[str, ...], cases: list[tuple], measure: Callable, setup: dict, printing: bool) -> list[dict]:
    """The rows of ``measure(*case, setup)`` for every case (every rank measures; rank 0 prints)."""
    if printing:
        print(report.format_header(table), flush=True)
    rows = []
    for case in cases:
        for row in measure(*case, setup):
            rows.append(row)
            if printing:
                print(report.format_row(row, table), flush=True)
    return rows
