"""Timers: medians with L2 flushed before each run, measured with CUDA events; host time per call; CUDA graphs.

``bench_ms`` times one function (``triton.testing.do_bench`` when triton is installed). ``bench_interleaved_ms`` times
functions that are compared with one another in turn, run by run, so that all of them see the same clock.
"""

import importlib.util
import statistics
import time
from collections.abc import Callable

import torch

# Larger than the L2 of any GPU the kernels run on (50 MB on H100, 60 MB on H200): writing it evicts the inputs.
L2_FLUSH_BYTES = 256 * 1024**2
# Runs timed back to back to turn the warm-up and repetition budgets (ms) into counts, as do_bench does.
ESTIMATE_RUNS = 5
HOST_CALLS = 200


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms with L2 flushed before each run: ``triton.testing.do_bench`` when available."""
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return bench_interleaved_ms([fn], warmup_ms, rep_ms)[0]


def interleaved_order(count: int, round_index: int) -> list[int]:
    """The functions' indices in round ``round_index`` of ``bench_interleaved_ms``: in order on even rounds, reversed
    on odd ones (a, b | b, a | a, b ...), so that each of two functions runs after itself as often as after the
    other."""
    order = list(range(count))
    return order[::-1] if round_index % 2 else order


def bench_interleaved_ms(fns: list[Callable[[], object]], warmup_ms: float = 25, rep_ms: float = 100) -> list[float]:
    """Median times (ms) of functions that are compared with one another, timed in turn with L2 flushed before each
    run, the order reversed every round (a, b, b, a, a, b, ...).

    At boost clocks the large GEMMs are power-bound and the clock settles over tens of milliseconds, so timing one
    function after the other (each with ``bench_ms``) charges whichever runs first, right after the float32
    reference check, with the clock's transient. In turn, every function sees the same clock history; reversing the
    order makes each follow itself as often as the other, so that neither is timed only in the power state the
    other leaves behind. With one function this is ``do_bench`` without triton.
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    estimates = []
    for fn in fns:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ESTIMATE_RUNS):
            flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimates.append(max(start.elapsed_time(end) / ESTIMATE_RUNS, 1e-3))
    round_ms = sum(estimates)
    for _ in range(max(1, int(warmup_ms * len(fns) / round_ms))):
        for fn in fns:
            fn()
    events: list[list] = [[] for _ in fns]
    rounds = max(2, int(rep_ms * len(fns) / round_ms))
    for round_index in range(rounds + rounds % 2):  # an even count: both orders equally often
        for i in interleaved_order(len(fns), round_index):
            fn, fn_events = fns[i], events[i]
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            fn_events.append((start, end))
    torch.cuda.synchronize()
    return [statistics.median(start.elapsed_time(end) for start, end in fn_events) for fn_events in events]


def host_us_per_call(fn: Callable[[], object], calls: int = HOST_CALLS) -> float:
    """CPU time per call in microseconds: ``calls`` calls back to back, no sync in between (the launches queue)."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def time_once_ms(fn: Callable[[], object], device: torch.device | str = "cuda") -> float:
    """Wall time of one call, synchronised before and after: for calls too slow to repeat."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of one call of ``fn`` (warmed up outside first), and its static output."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
