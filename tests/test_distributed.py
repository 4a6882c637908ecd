"""Expert parallelism on CPU: ``ExpertParallelExperts`` over gloo in 2 and 4 spawned processes, against one process's
``experts_forward`` on the same whole weights: forward and every gradient, float64 (tight) and bfloat16 (within
rounding), uneven routing, ranks without tokens, bad arguments raising on every rank, bitwise determinism.

Each world size runs every case in one group (``ranks_results``, once per module), and the tests read what each rank
saved. The ranks are forked from a forkserver that imported torch and moe_gemm once, not from the test process (whose
thread pools may be running) nor spawned (each spawned process imports them again, and the first op call imports
torch._dynamo: about 10 s per process on 2 cores, 70 s for this file instead of 20). They are joined with a timeout,
and gloo's own timeout is shorter: a rank waiting forever in a collective fails the tests instead of blocking the
suite.
"""

import datetime
import json
import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close_to_reference

import moe_gemm
from moe_gemm.bench import __main__ as bench_cli
from moe_gemm.bench import ep as bench_ep
from moe_gemm.distributed import (
    TRANSPORTS,
    ExpertParallelExperts,
    SymmetricMemoryBuffers,
    SymmetricMemoryTransport,
    expert_parallel,
)

NUM_EXPERTS, HIDDEN, INTERMEDIATE = 8, 16, 8
# The symmetric-memory transport's static size in these ranks: the most tokens of any rank in CASES.
MAX_TOKENS = 9
# Bytes of host memory shared by the ranks, standing in for each rank's symmetric memory (HostSymmetricBuffers).
SHARED_POOL_BYTES = 4 * 1024 * 1024
# The --ep benchmark's config in these ranks: T is unused (--tokens and --ep-layer-tokens set the tokens per rank).
BENCH_CONFIG = {"T": 0, "d": 16, "n": 8, "E": 8, "K": 3}
WORLD_SIZES = (2, 4)
# Seconds for all cases of one world size, the forkserver's start included (about 10 s on 2 cores).
JOIN_TIMEOUT_S = 90


@dataclass(frozen=True)
class Case:
    """One forward and backward on every rank, and its one-process reference.

    ``routing``: ``"random"`` draws distinct experts per token, expert 1 never, a quarter of the ids -1 or E;
    ``"skewed"`` never routes to rank 1's experts (rank 1 receives no rows) and sends rank 0's tokens to rank 0's
    experts only; ``"sentinels_on_rank_0"`` is ``"random"`` with every id of rank 0's tokens -1 or E. ``top_k`` of
    None is ``W + 1``: more slots than ranks.
    """

    name: str
    dtype: torch.dtype = torch.float64
    tokens: tuple[int, ...] = (6, 5, 7, 4)  # per rank, the first W of them
    routing: str = "random"
    top_k: int | None = None
    bias: bool = True
    act: str = "silu"
    seed: int = 0


CASES = [
    Case("float64"),
    Case("bfloat16", dtype=torch.bfloat16, seed=1),
    Case("skewed_rank_1_without_tokens", routing="skewed", tokens=(9, 0, 5, 0), bias=False, seed=2),
    Case("gelu_top_1", top_k=1, act="gelu", seed=3),
    Case("callable_act", act="callable", seed=4),
    Case("all_sentinels_on_rank_0", routing="sentinels_on_rank_0", seed=5),
]
CASE_NAMES = [case.name for case in CASES]


def make_problem(case: Case, world_size: int) -> dict:
    """Every rank's tokens and the whole layer, the same in every process (drawn from ``case.seed``)."""
    generator = torch.Generator().manual_seed(case.seed)
    tokens = case.tokens[:world_size]
    num_tokens = sum(tokens)
    top_k = case.top_k or world_size + 1
    scores = torch.rand(num_tokens, NUM_EXPERTS, generator=generator)
    local = NUM_EXPERTS // world_size
    if case.routing == "random":
        scores[:, 1] = -1  # expert 1 gets no rows
    elif case.routing == "skewed":
        scores[:, local : 2 * local] = -1  # rank 1 receives nothing
        scores[: tokens[0], :local] += 1  # rank 0's tokens choose rank 0's experts first
    ids = scores.argsort(dim=1, descending=True)[:, :top_k]
    if case.routing == "skewed":
        # and nothing else (-1 in their other slots), all of rank 0's experts when top_k exceeds them.
        ids[: tokens[0]] = torch.where(ids[: tokens[0]] < local, ids[: tokens[0]], -1)
    if case.routing in ("random", "sentinels_on_rank_0"):
        drop = torch.rand(num_tokens, top_k, generator=generator) < 0.25
        if case.routing == "sentinels_on_rank_0":
            drop[: tokens[0]] = True
        sentinel = torch.where(torch.rand(num_tokens, top_k, generator=generator) < 0.5, -1, NUM_EXPERTS)
        ids = torch.where(drop, sentinel, ids)
    experts = moe_gemm.MoEExperts(
        num_experts=NUM_EXPERTS, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, bias=case.bias,
        act=torch.nn.SiLU() if case.act == "callable" else case.act,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
    return {
        "tokens": tokens,
        "experts": experts.to(case.dtype),
        "hidden": torch.randn(num_tokens, HIDDEN, generator=generator).to(case.dtype),
        "top_k_index": ids,
        "top_k_weights": torch.rand(num_tokens, top_k, generator=generator),
        "grad_out": torch.randn(num_tokens, HIDDEN, generator=generator).to(case.dtype),
    }


class HostSymmetricBuffers(SymmetricMemoryBuffers):
    """``SymmetricMemoryBuffers`` in host memory shared by the ranks' processes, for the CPU tests: the same regions
    and layout, carved from ``pool`` (``[W, bytes]``, one row per rank, shared before the ranks started) in the order
    the ranks build transports (the same on every rank); the barrier is gloo's, the pull copies the blocks with
    tensor ops. What the CUDA class does otherwise (torch's symmetric memory, its device barrier, the pull kernel)
    runs on GPUs only."""

    pool: torch.Tensor | None = None
    used = 0

    def _allocate(self, num_bytes, group, device):
        start = HostSymmetricBuffers.used
        HostSymmetricBuffers.used += -(-num_bytes // 128) * 128
        assert HostSymmetricBuffers.used <= self.pool.shape[1], "SHARED_POOL_BYTES is too small"
        self.group = group
        self.peers = [self.pool[peer, start : start + num_bytes] for peer in range(self.world_size)]
        return self.peers[self.rank]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def peer_headers(self) -> torch.Tensor:
        return torch.stack([peer[: self.header_length * 8].view(torch.int64) for peer in self.peers])

    def pull(self, out, region, src_start, dst_start, counts, max_rows):
        offset, row_bytes = self.offsets[region], out.shape[1] * out.element_size()
        for peer, src, dst, count in zip(self.peers, src_start.tolist(), dst_start.tolist(), counts.tolist()):
            assert 0 <= count <= max_rows
            rows = peer[offset : offset + (src + count) * row_bytes].view(out.dtype).view(-1, out.shape[1])
            out[dst : dst + count] = rows[src:]
        return out


def forward_backward(experts: torch.nn.Module, hidden, top_k_index, top_k_weights, grad_out) -> dict:
    """The output and the gradients of ``<out, grad_out>`` for hidden, the routing weights and every parameter."""
    hidden = hidden.detach().requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    out = experts(hidden, top_k_index, top_k_weights)
    names, parameters = zip(*experts.named_parameters())
    grads = torch.autograd.grad(out, [hidden, top_k_weights, *parameters], grad_out)
    return {"out": out.detach(), **dict(zip(("hidden", "top_k_weights", *names), grads))}


def rank_slice(tokens: tuple[int, ...], rank: int) -> slice:
    start = sum(tokens[:rank])
    return slice(start, start + tokens[rank])


def error_of(run) -> tuple[str, str] | None:
    try:
        run()
    except Exception as error:  # noqa: BLE001 - every rank's error is recorded and checked by the tests
        return type(error).__name__, str(error)
    return None


def run_cases(rank: int, world_size: int, out_dir: str) -> dict:
    """What this rank records: each case run twice, then the bad arguments, then a good call again, then the
    ``--ep`` benchmark on a tiny config (rank 0 writes its JSON into ``out_dir``)."""
    results = {}
    for case in CASES:
        problem = make_problem(case, world_size)
        mine = rank_slice(problem["tokens"], rank)
        arguments = [problem[name][mine] for name in ("hidden", "top_k_index", "top_k_weights", "grad_out")]
        for transport, options in (("all_to_all", {}), ("symmetric_memory", {"max_tokens": MAX_TOKENS})):
            experts = ExpertParallelExperts.from_experts(problem["experts"], transport=transport, **options)
            key = case.name if transport == "all_to_all" else f"{case.name}/{transport}"
            results[key] = [forward_backward(experts, *arguments) for _ in range(2)]

    problem = make_problem(CASES[0], world_size)
    experts = ExpertParallelExperts.from_experts(problem["experts"])
    mine = rank_slice(problem["tokens"], rank)
    hidden, ids, weights = problem["hidden"][mine], problem["top_k_index"][mine], problem["top_k_weights"][mine]

    def call_with(rank_to_break: int, **broken):
        arguments = {"hidden": hidden, "top_k_index": ids, "top_k_weights": weights}
        if rank == rank_to_break:
            arguments.update(broken)
        return lambda: experts(**arguments)

    last = world_size - 1
    sizes = {"hidden_size": 4, "intermediate_size": 4}
    results["errors"] = {
        "indivisible": error_of(lambda: ExpertParallelExperts(num_experts=6 if world_size == 4 else 5, **sizes)),
        "transport": error_of(lambda: ExpertParallelExperts(num_experts=8, transport="nvshmem", **sizes)),
        "symmetric_memory_without_max_tokens": error_of(
            lambda: ExpertParallelExperts(num_experts=8, transport="symmetric_memory", **sizes)
        ),
        "symmetric_memory_row_size": error_of(lambda: ExpertParallelExperts(
            num_experts=8, hidden_size=12, intermediate_size=4, transport="symmetric_memory", max_tokens=4,
            dtype=torch.bfloat16,
        )),  # fmt: skip
        "hidden_width_on_rank_1": error_of(call_with(1, hidden=hidden[:, :-1])),
        "hidden_dtype_on_last_rank": error_of(call_with(last, hidden=hidden.float())),
        "weights_shape_on_rank_0": error_of(call_with(0, top_k_weights=weights[:, :1])),
    }

    symmetric = ExpertParallelExperts.from_experts(
        problem["experts"], transport="symmetric_memory", max_tokens=MAX_TOKENS
    )

    def symmetric_call_with(rank_to_break: int, **broken):
        arguments = {"hidden": hidden, "top_k_index": ids, "top_k_weights": weights}
        if rank == rank_to_break:
            arguments.update(broken)
        return lambda: symmetric(**arguments)

    too_many = problem["hidden"][:1].expand(MAX_TOKENS + 1, -1)
    results["errors"]["symmetric_memory_tokens_on_rank_0"] = error_of(symmetric_call_with(
        0, hidden=too_many, top_k_index=ids[:1].expand(MAX_TOKENS + 1, -1),
        top_k_weights=weights[:1].expand(MAX_TOKENS + 1, -1),
    ))  # fmt: skip
    results["errors"]["symmetric_memory_top_k_on_rank_1"] = error_of(
        symmetric_call_with(1, top_k_index=ids[:, :1], top_k_weights=weights[:, :1])
    )
    results["symmetric_after_errors"] = forward_backward(symmetric, hidden, ids, weights, problem["grad_out"][mine])
    # A backward that autograd prunes (the down weight's gradient alone skips the dispatch pull's backward): the next
    # forward writes the side the last phase wrote, and must still see every peer done reading it.
    pruned_out = symmetric(hidden, ids, weights)
    torch.autograd.grad(pruned_out, [symmetric.down_proj], problem["grad_out"][mine])
    results["symmetric_after_pruned_backward"] = symmetric(hidden, ids, weights).detach()

    def grad_mode_on_rank_0_only():
        hidden_leaf = hidden.detach().requires_grad_(rank == 0)
        with torch.set_grad_enabled(rank == 0):
            experts(hidden_leaf, ids, weights)

    experts.requires_grad_(False)
    results["errors"]["grad_mode_on_rank_0_only"] = error_of(grad_mode_on_rank_0_only)

    # Only rank 0 needs gradients: every rank still runs the backward's exchanges, and rank 0's are right.
    hidden_leaf = hidden.detach().requires_grad_(rank == 0)
    out = experts(hidden_leaf, ids, weights)
    grad_out = problem["grad_out"][mine]
    torch.autograd.backward(out, grad_out)
    results["grad_on_rank_0_only"] = {"out": out.detach(), "hidden": hidden_leaf.grad}
    experts.requires_grad_(True)
    results["after_errors"] = forward_backward(experts, hidden, ids, weights, grad_out)

    torch.manual_seed(7)  # every rank builds the same whole layer, then keeps its experts
    layer = moe_gemm.MoE(hidden_size=HIDDEN, num_experts=NUM_EXPERTS, intermediate_size=INTERMEDIATE, top_k=3,
                         shared_intermediate_size=12, dtype=torch.float64)  # fmt: skip
    replaced = expert_parallel(layer)
    out = layer(hidden)
    grads = torch.autograd.grad(out, [layer.router.weight, layer.experts.down_proj], torch.ones_like(out))
    results["moe"] = {"replaced": replaced, "out": out.detach(), "router": grads[0], "down_proj": grads[1]}

    direct = ExpertParallelExperts(num_experts=8, hidden_size=4, intermediate_size=3, bias=True)
    results["shapes"] = {name: tuple(p.shape) for name, p in direct.named_parameters()}
    results["first_expert"] = direct.first_expert

    json_path = os.path.join(out_dir, "ep.json")
    args = bench_cli.parse_args(["--ep", "--tokens", "5", "--ep-layer-tokens", "4", "--json", json_path])
    results["bench_status"] = bench_ep.run(args, configs={"tiny": BENCH_CONFIG})
    if rank == 0:
        with open(json_path) as written:
            results["bench_json"] = json.load(written)
    return results


def _rank_main(rank: int, world_size: int, store_path: str, out_dir: str, pool: torch.Tensor) -> None:
    torch.set_num_threads(1)  # ranks share the cores: tiny tensors, no intra-op threads
    HostSymmetricBuffers.pool = pool
    SymmetricMemoryTransport.buffers_class = HostSymmetricBuffers
    store = dist.FileStore(store_path, world_size)
    # gloo's own timeout, shorter than the join's: a collective left waiting raises in the process too.
    timeout = datetime.timedelta(seconds=JOIN_TIMEOUT_S // 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        torch.save(run_cases(rank, world_size, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(world_size: int, directory: str) -> list[dict]:
    """``run_cases`` on ``world_size`` processes; fails (and kills them) after ``JOIN_TIMEOUT_S``."""
    # Imported once, in the forkserver, for every process it forks.
    mp.set_forkserver_preload(["torch", "torch._dynamo", "moe_gemm", "test_distributed"])
    pool = torch.zeros(world_size, SHARED_POOL_BYTES, dtype=torch.uint8).share_memory_()
    context = mp.start_processes(
        _rank_main, args=(world_size, os.path.join(directory, "store"), directory, pool), nprocs=world_size,
        join=False, start_method="forkserver",
    )  # fmt: skip
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world_size} ranks did not finish within {JOIN_TIMEOUT_S} s: a rank waits in a collective")
    return [torch.load(os.path.join(directory, f"rank{rank}.pt")) for rank in range(world_size)]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"world{w}" for w in WORLD_SIZES])
def ranks_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_on_ranks(world_size, str(tmp_path_factory.mktemp(f"world{world_size}")))


def reference(case: Case, world_size: int) -> tuple[dict, dict]:
    problem = make_problem(case, world_size)
    names = ("hidden", "top_k_index", "top_k_weights", "grad_out")
    return problem, forward_backward(problem["experts"], *[problem[name] for name in names])


def result_key(case: Case, transport: str) -> str:
    return case.name if transport == "all_to_all" else f"{case.name}/{transport}"


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_matches_one_process_forward_and_gradients(ranks_results, case, transport):
    # The symmetric-memory transport runs here on HostSymmetricBuffers: its plan, slots, phases and backward.
    world_size, results = ranks_results
    problem, expected = reference(case, world_size)
    local = NUM_EXPERTS // world_size
    for rank, result in enumerate(results):
        got = result[result_key(case, transport)][0]
        mine, experts = rank_slice(problem["tokens"], rank), slice(rank * local, (rank + 1) * local)
        for name, value in got.items():
            # Per-token results are this rank's tokens; parameter gradients are this rank's experts'.
            want = expected[name][mine] if name in ("out", "hidden", "top_k_weights") else expected[name][experts]
            assert value.dtype == want.dtype, name
            # float32 routing-weight gradients of a bfloat16 layer carry its rounding.
            assert_close_to_reference(value, want, dtype=torch.bfloat16 if case.dtype == torch.bfloat16 else None)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_runs_are_bitwise_identical(ranks_results, case, transport):
    _, results = ranks_results
    for result in results:
        first, second = result[result_key(case, transport)]
        assert all(torch.equal(first[name], second[name]) for name in first)


def test_routing_cases_reach_the_edges(ranks_results):
    # What the cases above claim to cover: a rank without tokens (receiving rows when there are 4 ranks), a rank
    # receiving none, experts without rows, more slots than ranks, sentinels only.
    world_size, _ = ranks_results
    skewed = make_problem(CASES[2], world_size)
    ids = skewed["top_k_index"]
    local = NUM_EXPERTS // world_size
    assert skewed["tokens"][1] == 0 and ids.shape[1] > world_size
    assert not ((ids >= local) & (ids < 2 * local)).any()
    assert world_size == 2 or (skewed["tokens"][3] == 0 and (ids >= 3 * local).any())
    sentinels = make_problem(CASES[5], world_size)
    first = sentinels["top_k_index"][: sentinels["tokens"][0]]
    assert ((first < 0) | (first >= NUM_EXPERTS)).all()
    assert not (make_problem(CASES[0], world_size)["top_k_index"] == 1).any()


def test_every_rank_raises_and_none_hangs(ranks_results):
    world_size, results = ranks_results
    last = world_size - 1
    for rank, result in enumerate(results):
        errors = result["errors"]
        assert errors["indivisible"][0] == "ValueError"
        assert "num_experts must be a positive multiple of the group's world size" in errors["indivisible"][1]
        assert errors["transport"] == (
            "ValueError", "transport must be one of ('all_to_all', 'symmetric_memory'), got 'nvshmem'"
        )
        assert errors["symmetric_memory_without_max_tokens"][0] == "ValueError"
        assert "transport='symmetric_memory' needs max_tokens" in errors["symmetric_memory_without_max_tokens"][1]
        assert errors["symmetric_memory_row_size"] == ("ValueError", (
            "transport='symmetric_memory' moves rows of a multiple of 16 bytes: hidden_size 12 of torch.bfloat16 is "
            "24 bytes"
        ))  # fmt: skip
        for name, broken_rank, error, message in (
            ("hidden_width_on_rank_1", 1, "ValueError", "hidden: expected shape [T, H] with H = 16"),
            ("hidden_dtype_on_last_rank", last, "TypeError", "are torch.float64 but hidden is torch.float32"),
            ("weights_shape_on_rank_0", 0, "ValueError", "top_k_weights: expected the shape of top_k_index"),
        ):
            if rank == broken_rank:
                assert errors[name][0] == error and message in errors[name][1], (name, errors[name])
            else:
                assert errors[name][0] == "RuntimeError", (name, errors[name])
                assert f"rank(s) [{broken_rank}] of the expert-parallel group rejected" in errors[name][1]
        for name, broken_rank, message in (
            ("symmetric_memory_tokens_on_rank_0", 0, "10 tokens, more than the symmetric-memory transport's"),
            ("symmetric_memory_top_k_on_rank_1", 1, "1 slots per token and max_tokens 9 on rank 1"),
        ):
            if rank == broken_rank:
                assert errors[name][0] == "ValueError" and message in errors[name][1], (name, errors[name])
            else:
                assert errors[name][0] == "RuntimeError", (name, errors[name])
                assert f"rank(s) [{broken_rank}] of the expert-parallel group rejected" in errors[name][1]
        assert errors["grad_mode_on_rank_0_only"][0] == "RuntimeError"
        assert "run without grad mode" in errors["grad_mode_on_rank_0_only"][1]


def test_the_group_works_after_the_errors(ranks_results):
    world_size, results = ranks_results
    problem, expected = reference(CASES[0], world_size)
    for rank, result in enumerate(results):
        mine = rank_slice(problem["tokens"], rank)
        assert_close_to_reference(result["after_errors"]["out"], expected["out"][mine])
        assert_close_to_reference(result["symmetric_after_errors"]["hidden"], expected["hidden"][mine])
        assert_close_to_reference(result["symmetric_after_pruned_backward"], expected["out"][mine])
        # Rank 0 alone asked for gradients; the others still ran the backward's exchanges.
        assert_close_to_reference(result["grad_on_rank_0_only"]["out"], expected["out"][mine])
        grad = result["grad_on_rank_0_only"]["hidden"]
        if rank == 0:
            assert_close_to_reference(grad, expected["hidden"][mine])
        else:
            assert grad is None


def test_expert_parallel_moe_matches_the_whole_layer(ranks_results):
    world_size, results = ranks_results
    problem = make_problem(CASES[0], world_size)
    torch.manual_seed(7)
    layer = moe_gemm.MoE(hidden_size=HIDDEN, num_experts=NUM_EXPERTS, intermediate_size=INTERMEDIATE, top_k=3,
                         shared_intermediate_size=12, dtype=torch.float64)  # fmt: skip
    out = layer(problem["hidden"])
    parameters = [layer.router.weight, layer.experts.down_proj]
    router_grad, down_grad = torch.autograd.grad(out, parameters, torch.ones_like(out))
    local = NUM_EXPERTS // world_size
    # The router runs in float32 on fewer tokens per call, its last bits bound the agreement.
    close = {"rtol": 1e-6, "atol": 1e-6}
    for rank, result in enumerate(results):
        moe = result["moe"]
        assert moe["replaced"] == ["experts"]
        torch.testing.assert_close(moe["out"], out[rank_slice(problem["tokens"], rank)], **close)
        torch.testing.assert_close(moe["down_proj"], down_grad[rank * local : (rank + 1) * local], **close)
    # The router is replicated: its gradient is the sum of every rank's (the data-parallel all-reduce).
    torch.testing.assert_close(sum(result["moe"]["router"] for result in results), router_grad, **close)


def test_parameters_are_this_ranks_experts_in_hugging_face_layout(ranks_results):
    world_size, results = ranks_results
    local = 8 // world_size
    for rank, result in enumerate(results):
        assert result["first_expert"] == rank * local
        assert result["shapes"] == {
            "gate_up_proj": (local, 6, 4), "down_proj": (local, 4, 3), "gate_up_proj_bias": (local, 6),
            "down_proj_bias": (local, 4),
        }  # fmt: skip


def test_construction_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        ExpertParallelExperts(num_experts=8, hidden_size=4, intermediate_size=4)


def test_ep_benchmark_measures_every_transport_on_every_rank(ranks_results):
    # `python -m moe_gemm.bench --ep` inside the ranks (gloo): every rank measured and returned 0; rank 0 wrote one
    # dispatch and one combine row per transport, and a layer row whose output matches experts_forward over the whole
    # layer (bf16: within rounding, not bitwise, the GEMMs' rows grouped otherwise).
    world_size, results = ranks_results
    assert [result["bench_status"] for result in results] == [0] * world_size
    report = results[0]["bench_json"]
    assert report["mode"] == "ep" and report["world_size"] == world_size
    assert [(row["transport"], row["step"]) for row in report["rows"]] == [
        (name, step) for name in TRANSPORTS for step in ("dispatch", "combine")
    ]
    row_mb = 16 * 2 / 1e6
    for row in report["rows"]:
        assert row["world"] == world_size and row["tokens"] == 5 and row["check"] == "ok"
        assert row["ep_ms"] > 0 and row["ep_gbs"] > 0
        # It dispatches its own 5 * 3 pairs (all_to_all: a row each; symmetric memory: a row per token and rank, at
        # least one per token, at most one per pair), and combines (sends back) the rows it received.
        if row["step"] == "dispatch" and row["transport"] == "all_to_all":
            assert row["ep_mb"] == pytest.approx(5 * 3 * row_mb)
        elif row["step"] == "dispatch":
            assert 5 * row_mb - 1e-12 <= row["ep_mb"] <= 5 * min(3, world_size) * row_mb + 1e-12
        else:
            assert 0 < row["ep_mb"] <= world_size * 5 * 3 * row_mb
    assert [layer["transport"] for layer in report["layer_rows"]] == list(TRANSPORTS)
    for layer in report["layer_rows"]:
        assert layer["check"] == "ok" and 0 <= layer["rel_error"] < 1e-2
    assert layer["fwd_tflops"] > 0 and layer["fwd_bwd_tflops"] > 0
