"""The benchmark's CPU-testable parts (``moe_gemm/bench/``): suite, routing, floor math, geometric means, table,
arguments, and one forward shape measured on CPU with a stand-in timer; plus its exit status without a GPU."""

import importlib.util
import math

import pytest
import torch

import moe_gemm
from moe_gemm import _ops
from moe_gemm.bench import __main__ as cli
from moe_gemm.bench import forward, report, timing
from moe_gemm.bench.suite import floor_ms, gemm_bytes, gemm_shape, load_suite, routing_counts

# Ceilings measured on an H100: dense bf16 matmul 791 TFLOP/s, copy 3.02 TB/s.
ANCHOR_CEILINGS = (791.0, 3.02)


def test_load_suite():
    suite = load_suite()
    assert set(suite["models"]) == {"qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b", "gpt-oss-120b", "qwen1.5-moe-a2.7b"}
    assert suite["tokens"] == [1, 32, 256, 2048, 16384]
    assert suite["models"]["deepseek-v3"] == {"experts": 256, "hidden": 7168, "moe_intermediate": 2048, "top_k": 8}


def test_gemm_shapes():
    suite = load_suite()
    assert gemm_shape(suite["models"]["qwen3-30b-a3b"], "up") == (1536, 2048)
    assert gemm_shape(suite["models"]["qwen3-30b-a3b"], "down") == (2048, 768)
    assert gemm_shape(suite["models"]["mixtral-8x7b"], "up") == (28672, 4096)


@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_routing_counts_route_each_token_to_top_k_distinct_experts(routing):
    tokens, experts, top_k = 300, 16, 4
    counts = routing_counts(tokens, experts, top_k, routing, torch.Generator().manual_seed(1))
    assert counts.shape == (experts,) and counts.dtype == torch.int64
    assert counts.sum() == tokens * top_k
    assert counts.max() <= tokens  # distinct experts: at most one row per token and expert
    single = routing_counts(1, experts, top_k, routing, torch.Generator().manual_seed(1))
    assert sorted(single.tolist()) == [0] * (experts - top_k) + [1] * top_k


def test_routing_counts_are_reproducible_and_skewed_is_skewed():
    def counts(routing, seed):
        return routing_counts(2048, 128, 8, routing, torch.Generator().manual_seed(seed))

    assert torch.equal(counts("uniform", 3), counts("uniform", 3))
    assert not torch.equal(counts("uniform", 3), counts("uniform", 4))
    uniform, skewed = counts("uniform", 0), counts("skewed", 0)
    assert uniform.max() < 2 * 2048 * 8 / 128  # balanced: close to the mean of 128 rows
    assert skewed.max() > 4 * 2048 * 8 / 128  # a hot expert


def test_routing_counts_rejects_unknown_routing():
    with pytest.raises(ValueError, match="routing"):
        routing_counts(4, 8, 2, "round_robin")


def test_floor_matches_the_anchor_table():
    # qwen3-30b-a3b, 1 token, up: memory bound, 0.017 ms.
    num_bytes = gemm_bytes(8, 1536, 2048, 8)
    assert num_bytes == (8 * 1536 * 2048 + 8 * 2048 + 8 * 1536) * 2
    assert floor_ms(2.0 * 8 * 1536 * 2048, num_bytes, *ANCHOR_CEILINGS) == pytest.approx(0.01669, rel=1e-3)
    # deepseek-v3, 16384 tokens, up: compute bound, 9.733 ms.
    m, n, k = 131072, 4096, 7168
    floor = floor_ms(2.0 * m * n * k, gemm_bytes(m, n, k, 256), *ANCHOR_CEILINGS)
    assert floor == pytest.approx(9.733, rel=1e-3)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_interleaved_order_reverses_every_round(count):
    rounds = [timing.interleaved_order(count, r) for r in range(4)]
    assert rounds[0] == rounds[2] == list(range(count))
    assert rounds[1] == rounds[3] == list(range(count))[::-1]


def test_interleaved_order_gives_two_functions_each_predecessor_equally_often():
    sequence = [i for r in range(10) for i in timing.interleaved_order(2, r)]
    follows = [(before, after) for before, after in zip(sequence, sequence[1:])]
    for fn in (0, 1):
        after_self, after_other = follows.count((fn, fn)), follows.count((1 - fn, fn))
        assert abs(after_self - after_other) <= 1 and after_self >= 4


def test_geomean():
    assert report.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert report.geomean([2.0, None, math.nan, 0.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(report.geomean([None]))


def test_summarize():
    rows = [
        {"tokens": 1, "speedup": 1.0, "x_floor": 2.0},
        {"tokens": 1, "speedup": 4.0, "x_floor": 2.0},
        {"tokens": 256, "speedup": 2.0, "x_floor": 1.0},
        {"tokens": 2048, "speedup": 8.0, "x_floor": 1.0},
        {"tokens": 2048, "speedup": None, "x_floor": None},  # a failed shape
    ]
    summary = forward.summarize(rows)
    assert list(summary["groups"]) == ["tokens=1", "tokens=256", "tokens=2048", "all"]
    assert summary["groups"]["tokens=1"] == {"shapes": 2, "speedup": pytest.approx(2.0), "x_floor": pytest.approx(2.0)}
    assert summary["groups"]["tokens=2048"]["shapes"] == 2
    assert summary["groups"]["all"]["speedup"] == pytest.approx(64 ** (1 / 4))
    assert summary["speedup_tokens_ge_256"] == pytest.approx(4.0)
    text = forward.format_summary(summary)
    assert "tokens=256" in text and ">= 256 tokens: 4.00" in text


def test_table_columns_line_up():
    row = {
        "model": "qwen3-30b-a3b",
        "tokens": 32,
        "gemm": "up",
        "M": 256,
        "N": 1536,
        "K": 2048,
        "active": 108,
        "moe_gemm_ms": 0.2,
        "tflops": 6.04,
        "tbs": 2.9,
        "x_floor": 1.07,
        "grouped_mm_ms": 0.266,
        "speedup": 1.33,
        "loop_ms": None,
        "check": "ok",
    }
    header, line = report.format_header(forward.TABLE), report.format_row(row, forward.TABLE)
    assert len(header) == len(line)
    assert " ".join(line.split()) == "qwen3-30b-a3b 32 up 256 1536 2048 108 0.200 6.0 2.90 1.07 0.266 1.33 - ok"


def test_parse_args():
    args = cli.parse_args([])
    assert args.tokens == [1, 32, 256, 2048, 16384] and args.gemms == ["up", "down"] and len(args.models) == 5
    assert args.routing == "uniform" and args.dtype == "bfloat16"
    assert cli.parse_args(["--quick"]).tokens == [32, 4096]
    assert cli.parse_args(["--tokens", "8", "64", "--models", "mixtral-8x7b"]).tokens == [8, 64]


@pytest.mark.parametrize("argv", [["--quick", "--tokens", "8"], ["--models", "llama"], ["--routing", "zipf"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2


@pytest.mark.skipif(_ops.kernels_unavailable_reason() is None, reason="a GPU with the kernels is present")
def test_main_without_gpu_exits_2(capsys):
    assert cli.main(["--quick"]) == 2
    assert "needs a CUDA GPU and the built moe_gemm kernels" in capsys.readouterr().err


@pytest.fixture
def fake_timer(monkeypatch):
    """bench_ms and bench_interleaved_ms that run each function once and report 0.5 ms."""

    def fake_bench_ms(fn):
        fn()
        return 0.5

    monkeypatch.setattr(timing, "bench_ms", fake_bench_ms)
    monkeypatch.setattr(timing, "bench_interleaved_ms", lambda fns: [fake_bench_ms(fn) for fn in fns])


def test_measure_shape_on_cpu(fake_timer):
    weight = torch.randn(4, 16, 32).bfloat16()
    row = forward.measure_shape("tiny", 5, "up", weight, torch.tensor([3, 0, 5, 2]), ANCHOR_CEILINGS)
    assert row["check"] == "ok" and row["problem"] is None and row["rel_error"] < 1e-2
    assert (row["M"], row["N"], row["K"], row["active"]) == (10, 16, 32, 3)
    assert row["moe_gemm_ms"] == row["grouped_mm_ms"] == row["loop_ms"] == 0.5
    assert row["speedup"] == 1.0
    assert row["x_floor"] == pytest.approx(0.5 / row["floor_ms"])
    assert row["tflops"] == pytest.approx(2 * 10 * 16 * 32 / 0.5 / 1e9)


def test_measure_shape_skips_a_slow_loop(fake_timer, monkeypatch):
    monkeypatch.setattr(forward, "LOOP_MAX_MS", -1.0)
    weight = torch.randn(3, 16, 32).bfloat16()
    row = forward.measure_shape("tiny", 4, "up", weight, torch.tensor([1, 4, 3]), ANCHOR_CEILINGS)
    assert row["check"] == "ok" and row["loop_ms"] is None and row["moe_gemm_ms"] == 0.5


def test_measure_shape_marks_a_wrong_result(fake_timer, monkeypatch):
    monkeypatch.setattr(moe_gemm, "grouped_forward", lambda x, w, m_sizes: torch.zeros(x.shape[0], w.shape[1]))
    weight = torch.randn(2, 16, 32).bfloat16()
    row = forward.measure_shape("tiny", 4, "down", weight, torch.tensor([3, 5]), ANCHOR_CEILINGS)
    assert row["check"] == "FAIL" and "relative error" in row["problem"]
    assert row.get("moe_gemm_ms") is None and row.get("speedup") is None
    assert "FAIL" in report.format_row(row, forward.TABLE)


def test_plot_speedups(tmp_path, capsys):
    rows = [{"model": "m", "tokens": t, "gemm": g, "speedup": 1.5} for t in (1, 32) for g in ("up", "down")]
    path = tmp_path / "speedup.png"
    report.plot_speedups(rows, str(path))
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in capsys.readouterr().out and not path.exists()
    else:
        assert path.stat().st_size > 0
