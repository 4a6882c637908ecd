"""The decode path of the CUDA kernel (1 to 64 tokens, split-K) against the float64 reference.

Split-K is forced through moe_gemm.testing.plan_override; "auto" leaves it to the heuristic, which splits the
few-tile shapes used here. Inputs are drawn on the GPU (a weight per dtype and
layout, shared by the tests) and every output lands in memory poisoned with NaN, workspace included, so an element
or a partial sum nobody wrote shows up.
"""

import functools

import pytest
import torch

from helpers import Problem, assert_close_to_reference, requires_cuda_op
from moe_gemm.testing import SPLIT_K_TILE_CONFIGS, PlanOverride, plan_override, resolved_plan, tile_configs

pytestmark = [pytest.mark.gpu, requires_cuda_op]

DTYPES = [torch.bfloat16, torch.float16]
LAYOUTS = [False, True]  # weight_transposed
TOKENS = [1, 2, 3, 8, 17, 32, 64]
# Few experts' worth of 128-column tiles and K = 2504 (40 k-blocks of 64, 20 of 128, the last one partial, and at
# least 1024 per split): the heuristic splits these, and N = 264 leaves an 8-column last tile.
EXPERTS, N, K = 64, 264, 2504
SPLITS = ["auto", "1", "2", "3", "7", "64"]  # 64 is more than the k-blocks: clamped to them
PATTERNS = ["one_expert", "distinct_experts", "many_empty", "routed"]


def decode_sizes(pattern: str, rows: int, experts: int = EXPERTS, seed: int = 0) -> list[int]:
    """Rows per expert for `rows` routed rows (tokens x top_k)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [0] * experts
    if pattern == "one_expert":  # every token to the same expert
        sizes[experts // 2] = rows
    elif pattern == "distinct_experts":  # one row per expert, experts chosen at random
        for expert in torch.randperm(experts, generator=generator)[:rows].tolist():
            sizes[expert] = 1
    elif pattern == "many_empty":  # rows in 3 experts at most, far apart, the rest empty
        chosen = sorted(torch.randperm(experts, generator=generator)[:3].tolist())
        for i in range(rows):
            sizes[chosen[i % len(chosen)]] += 1
    elif pattern == "routed":  # top-2 of uniform scores per token
        tokens = max(1, rows // 2)
        ids = torch.rand(tokens, experts, generator=generator).topk(2, dim=-1).indices.flatten()
        sizes = torch.bincount(ids, minlength=experts).tolist()
    else:
        raise ValueError(pattern)
    return sizes


@functools.lru_cache(maxsize=None)
def shared_weight(dtype: torch.dtype, transposed: bool, experts: int = EXPERTS, n: int = N, k: int = K):
    generator = torch.Generator(device="cuda").manual_seed(1)
    shape = (experts, k, n) if transposed else (experts, n, k)
    return (torch.randn(shape, device="cuda", generator=generator) / k**0.5).to(dtype)


def decode_problem(sizes, dtype=torch.bfloat16, transposed=False, *, num_rows=None, n=N, k=K) -> Problem:
    num_rows = sum(max(s, 0) for s in sizes) if num_rows is None else num_rows
    x = torch.randn(num_rows, k, device="cuda").to(dtype)
    weight = shared_weight(dtype, transposed, len(sizes), n, k)
    return Problem(x, weight, torch.tensor(sizes, dtype=torch.int64, device="cuda"), transposed)


def poison_allocator(dtype):
    """Fill freed blocks of both pools of the caching allocator with NaN: the op's output and workspace reuse them."""
    large = torch.full((1 << 24,), float("nan"), device="cuda", dtype=dtype)
    small = [torch.full((1 << 18,), float("nan"), device="cuda", dtype=dtype) for _ in range(8)]  # 512 KB each
    del large, small


def run_poisoned(problem: Problem) -> torch.Tensor:
    poison_allocator(problem.x.dtype)
    out = problem.run()
    torch.cuda.synchronize()
    return out


@pytest.fixture(params=SPLITS)
def split_k(request):
    """The heuristic's tile configuration and schedule, with each split (0: the heuristic's)."""
    with plan_override(split_k=0 if request.param == "auto" else int(request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_decode_against_reference(tokens, pattern, transposed, dtype, split_k):
    problem = decode_problem(decode_sizes(pattern, tokens), dtype, transposed)
    out = run_poisoned(problem)
    assert out.dtype == dtype
    assert_close_to_reference(out, problem.reference())


@pytest.mark.parametrize("transposed", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_split_k_is_deterministic(tokens, transposed, split_k):
    problem = decode_problem(decode_sizes("routed", 2 * tokens), torch.bfloat16, transposed)
    first = run_poisoned(problem)
    for _ in range(3):
        assert torch.equal(run_poisoned(problem), first), "two runs differ bitwise"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_rows_past_the_last_expert_are_zero(pattern, split_k):
    sizes = decode_sizes(pattern, 12)
    problem = decode_problem(sizes, num_rows=12 + 9)
    out = run_poisoned(problem)
    assert_close_to_reference(out, problem.reference())
    assert (out[12:] == 0).all()


def test_no_rows_at_all(split_k):
    problem = decode_problem([0] * EXPERTS, num_rows=5)
    out = run_poisoned(problem)
    assert (out == 0).all()


def test_sizes_past_m_and_negative_sizes(split_k):
    sizes = [0] * EXPERTS
    sizes[3], sizes[10], sizes[40] = 6, -4, 20  # 26 rows routed into 16: the last expert is cut short
    problem = decode_problem(sizes, num_rows=16)
    assert_close_to_reference(run_poisoned(problem), problem.reference())


@pytest.mark.parametrize("sizes", [[300, 0, 129, 0], [0, 0, 0, 1000], [128, 1, 256, 7]])
def test_split_k_with_full_tiles(sizes, split_k):
    # Whole 128-row m-blocks (partials of 128 rows, the TMA-store path of split_k = 1) and partial ones.
    problem = decode_problem(sizes, torch.bfloat16, False)
    assert_close_to_reference(run_poisoned(problem), problem.reference())


@pytest.mark.parametrize("config", [config for config in tile_configs() if config != "auto"])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("split", [1, 4])
def test_split_k_with_every_config_and_schedule(config, dynamic, split):
    # Split-K runs with static and dynamic scheduling; the configurations without a split-K kernel refuse a split.
    if split > 1 and config not in SPLIT_K_TILE_CONFIGS:
        with pytest.raises(ValueError, match="no split-K kernel"):
            with plan_override(tile_config=config, dynamic_schedule=dynamic, split_k=split):
                pass
        return
    with plan_override(tile_config=config, dynamic_schedule=dynamic, split_k=split):
        # The override reaches the plan (K = 4096 has enough k-blocks for 4 splits in every configuration).
        assert resolved_plan(16, 4096, 4096, EXPERTS) == (config, split, dynamic)
        for sizes in (decode_sizes("routed", 16), [200, 0, 3] + [0] * (EXPERTS - 3)):
            problem = decode_problem(sizes, torch.bfloat16, True)
            out = run_poisoned(problem)
            assert_close_to_reference(out, problem.reference())
            assert torch.equal(run_poisoned(problem), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 4, 32, 64])
def test_cuda_graph_replay_with_changed_sizes(tokens, transposed, dtype, split_k):
    rows = 2 * tokens
    problem = decode_problem(decode_sizes("routed", rows), dtype, transposed)
    static_sizes = problem.m_sizes
    problem.run()  # warm-up outside the graph: loads the kernel, sets its shared-memory attribute
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = problem.run()
    eager = {}
    for pattern in PATTERNS + ["routed_again", "empty"]:
        if pattern == "empty":
            sizes = [0] * EXPERTS
        elif pattern == "routed_again":
            sizes = decode_sizes("routed", rows, seed=7)
        else:
            sizes = decode_sizes(pattern, rows)
        static_sizes.copy_(torch.tensor(sizes))
        problem.x.copy_(torch.randn_like(problem.x))
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(static_out, problem.reference())
        eager[pattern] = (problem.run(), static_out.clone())
        graph.replay()  # again: the counters were zeroed again, the result is the same
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager[pattern][1])
        assert torch.equal(eager[pattern][0], static_out), "eager and graph runs differ bitwise"


def test_heuristic_split_shape_matches_unsplit():
    # Mixtral-8x7B down at 1 token scaled to 4 experts: the shape the heuristic splits; same values as split_k = 1
    # up to fp32 rounding of the reordered sum.
    sizes = [0, 1, 0, 1]
    problem = decode_problem(sizes, torch.bfloat16, False, n=4096, k=14336)
    auto = run_poisoned(problem)
    with plan_override(split_k=1):
        unsplit = run_poisoned(problem)
    assert_close_to_reference(auto, problem.reference())
    assert (auto.float() - unsplit.float()).abs().max().item() <= 2e-2 * unsplit.float().abs().max().item()


def sm_count():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


# The worked examples of docs/design.md and csrc/moe_gemm.cpp, one per branch of choose_tile_config: (what, M (rows
# = tokens x top_k), N, K, E, the configuration, the split on 132 SMs, the schedule). The heuristic's choice of
# configuration depends on the shapes only; the split and the schedule on the SM count too.
WORKED_EXAMPLES = [
    ("Mixtral-8x7B down, 1 token", 2, 4096, 14336, 8, "16x128s", 2, False),
    ("Qwen1.5-MoE down, 1 token", 4, 2048, 1408, 60, "16x128s", 1, False),
    ("DeepSeek-V3 up, 640 tokens (20 rows)", 5120, 4096, 7168, 256, "32x128s", 1, True),
    ("DeepSeek-V3 up, 2048 tokens (64 rows)", 16384, 4096, 7168, 256, "128x128", 1, True),
    ("Qwen1.5-MoE up, 2048 tokens (136 rows)", 8192, 2816, 2048, 60, "128x256", 1, True),
    ("DeepSeek-V3 up, 16k tokens (512 rows, 16 n-blocks)", 131072, 4096, 7168, 256, "128x256c1x2", 1, True),
    ("GPT-OSS up, 16k tokens (512 rows, 23 n-blocks)", 65536, 5760, 2880, 128, "128x256c2x1", 1, True),
    ("512 rows, one 256-column block", 4096, 256, 1024, 8, "128x256", 1, False),
    ("Qwen3-30B-A3B up, 16k tokens (1024 rows)", 131072, 1536, 2048, 128, "128x256", 1, True),
    ("Mixtral-8x7B up, 2048 tokens (512 rows)", 4096, 28672, 4096, 8, "128x256c1x2", 1, True),
    ("Mixtral-8x7B up, 16k tokens (4096 rows)", 32768, 28672, 4096, 8, "128x256", 1, True),
    ("sonic-4 down, 32k tokens (2048 rows)", 524288, 4096, 256, 256, "128x256", 1, True),
]


@pytest.mark.parametrize("what, M, N, K, E, config, split, dynamic", WORKED_EXAMPLES,
                         ids=[example[0] for example in WORKED_EXAMPLES])
def test_the_worked_examples_of_the_heuristics(what, M, N, K, E, config, split, dynamic):
    with plan_override(PlanOverride()):  # the heuristics, whatever an outer block forced
        planned = resolved_plan(M, N, K, E)
    assert planned[0] == config, what
    if sm_count() != 132:
        pytest.skip(f"the split and the schedule of the examples are for 132 SMs; this GPU has {sm_count()}")
    assert planned == (config, split, dynamic), what


def test_an_override_reaches_the_plan():
    shape = (2, 4096, 14336, 8)  # Mixtral down at 1 token: the heuristic picks 16x128s and splits
    for config in (c for c in tile_configs() if c != "auto"):
        with plan_override(tile_config=config, split_k=1, dynamic_schedule=True):
            assert resolved_plan(*shape) == (config, 1, True)
        with plan_override(tile_config=config, dynamic_schedule=False):
            assert resolved_plan(*shape)[::2] == (config, False)
    for config in SPLIT_K_TILE_CONFIGS:
        with plan_override(tile_config=config, split_k=3):
            assert resolved_plan(*shape)[:2] == (config, 3)
        with plan_override(tile_config=config, split_k=1000):  # clamped to the k-blocks
            assert resolved_plan(*shape)[1] == -(-14336 // (128 if config.endswith("s") else 64))
    with plan_override(tile_config="auto", split_k=1):
        assert resolved_plan(*shape)[:2] == ("16x128s", 1)
    with plan_override(tile_config="128x256"):  # a heuristic split of another configuration does not apply
        assert resolved_plan(*shape)[:2] == ("128x256", 1)
    assert resolved_plan(0, 4096, 14336, 8) == ("auto", 1, False)  # nothing to multiply


def test_the_extension_refuses_what_the_kernels_cannot_do():
    from moe_gemm import _C

    for args in (("128x256", 2, -1), ("128x256c1x2", 4, 0), ("16x128s", -1, -1), ("16x128s", 0, 2),
                 ("16x128s", 0, -2), ("64x64", 0, -1)):
        with pytest.raises(ValueError):
            _C.set_plan_override(*args)
    with pytest.raises(ValueError, match="non-negative"):
        _C.plan_grouped_gemm(-1, 8, 8, 1)
