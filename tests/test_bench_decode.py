"""The decode benchmark's CPU-testable parts: token counts, problems, ratios, summary, table, and its exit status
without a GPU."""

import math

import pytest

from moe_gemm import _ops
from moe_gemm.bench import __main__ as cli
from moe_gemm.bench import decode, report
from moe_gemm.bench.suite import load_suite

CEILINGS = (791.0, 3.02)


def test_decode_flag_and_token_counts():
    suite = load_suite()
    assert cli.parse_args([]).decode is False
    args = cli.parse_args(["--decode"])
    assert args.decode is True
    assert decode.decode_tokens(args.tokens, suite) == [1, 2, 4, 8, 16, 32, 64]
    assert decode.decode_tokens(cli.parse_args(["--decode", "--quick"]).tokens, suite) == [1, 32]
    assert decode.decode_tokens(cli.parse_args(["--decode", "--tokens", "3", "5"]).tokens, suite) == [3, 5]


def test_decode_problems():
    suite = load_suite()
    problems = decode.decode_problems(suite, list(suite["models"]), [1, 2, 64], ["up", "down"])
    assert len(problems) == 5 * 3 * 2
    mixtral_down = [p for p in problems if p["model"] == "mixtral-8x7b" and p["tokens"] == 1 and p["gemm"] == "down"]
    assert mixtral_down == [
        {"model": "mixtral-8x7b", "tokens": 1, "gemm": "down", "E": 8, "N": 4096, "K": 14336, "top_k": 2, "M": 2}
    ]
    qwen_up = next(p for p in problems if p["model"] == "qwen3-30b-a3b" and p["tokens"] == 64 and p["gemm"] == "up")
    assert (qwen_up["M"], qwen_up["N"], qwen_up["K"]) == (512, 1536, 2048)


def make_row(tokens=1, active=2, moe_graph_us=20.0, gmm_graph_us=30.0, moe_us=25.0, gmm_us=35.0, floor_us=10.0):
    row = {
        "model": "mixtral-8x7b",
        "tokens": tokens,
        "gemm": "down",
        "M": 2 * tokens,
        "N": 4096,
        "K": 14336,
        "active": active,
        "bytes": 3.02e12 * 10e-6,  # 10 us at the copy bandwidth
        "floor_us": floor_us,
        "moe_us": moe_us,
        "moe_graph_us": moe_graph_us,
        "gmm_us": gmm_us,
        "gmm_graph_us": gmm_graph_us,
        "host_us": 12.0,
        "check": "ok",
    }
    return decode.finish_row(row, CEILINGS[1])


def test_finish_row_ratios():
    row = make_row()
    assert row["x_floor"] == pytest.approx(2.0) and row["x_floor_eager"] == pytest.approx(2.5)
    assert row["speedup_graph"] == pytest.approx(1.5) and row["speedup"] == pytest.approx(1.4)
    assert row["bw_fraction"] == pytest.approx(0.5) and row["bw_percent"] == pytest.approx(50.0)
    failed = decode.finish_row({"floor_us": 10.0, "bytes": 1.0, "check": "FAIL"}, CEILINGS[1])
    assert "x_floor" not in failed and "speedup" not in failed and "speedup_graph" not in failed
    assert decode.weight_bandwidth_fraction({"bytes": 1.0}, CEILINGS[1]) is None


def test_summary_groups_and_bandwidth():
    rows = [
        make_row(tokens=1, moe_graph_us=12.0, gmm_graph_us=24.0, moe_us=12.0, gmm_us=24.0),
        make_row(tokens=32, active=100, moe_graph_us=12.5, gmm_graph_us=25.0, moe_us=12.5, gmm_us=25.0),
        make_row(tokens=64, active=128, moe_graph_us=40.0, gmm_graph_us=20.0),  # slow, outside tokens<=32
    ]
    summary = decode.summarize_decode(rows)
    assert set(summary) == {"groups", "bandwidth_fraction_min", "bandwidth_shapes"}
    groups = summary["groups"]
    assert list(groups) == ["tokens=1", "tokens=32", "tokens=64", f"tokens<={decode.DECODE_MAX_TOKENS}", "all"]
    decode_group = groups["tokens<=32"]
    assert decode_group["shapes"] == 2 and groups["all"]["shapes"] == 3 and groups["tokens=64"]["shapes"] == 1
    assert decode_group["x_floor"] == pytest.approx(math.sqrt(1.2 * 1.25))
    assert decode_group["x_floor_eager"] == pytest.approx(math.sqrt(1.2 * 1.25))
    assert decode_group["speedup_graph"] == pytest.approx(2.0) and decode_group["speedup"] == pytest.approx(2.0)
    assert decode_group["min_speedup_graph"] == pytest.approx(2.0) and decode_group["host_us"] == pytest.approx(12.0)
    assert groups["all"]["min_speedup_graph"] == pytest.approx(0.5)
    assert groups["all"]["speedup_graph"] == pytest.approx((2.0 * 2.0 * 0.5) ** (1 / 3))
    assert summary["bandwidth_shapes"] == 2  # the rows with >= BANDWIDTH_MIN_EXPERTS experts hit
    assert summary["bandwidth_fraction_min"] == pytest.approx(10.0 / 40.0)
    text = decode.format_summary(summary)
    assert "tokens<=32" in text and "slowest  0.50" in text
    assert "at least 25% of the copy bandwidth (in a CUDA graph) on the 2 shapes with >= 64 experts hit" in text
    assert "target" not in text and " met" not in text  # statistics, no verdicts


def test_summary_slowest_shape_and_no_wide_shape():
    rows = [make_row(tokens=1), make_row(tokens=2, moe_graph_us=20.0, gmm_graph_us=18.0)]
    summary = decode.summarize_decode(rows)
    assert summary["groups"]["tokens<=32"]["min_speedup_graph"] == pytest.approx(0.9)
    assert summary["groups"]["tokens<=32"]["min_speedup"] == pytest.approx(1.4)
    assert summary["bandwidth_shapes"] == 0 and math.isnan(summary["bandwidth_fraction_min"])
    assert "no shape with >= 64 experts hit has a graph time" in decode.format_summary(summary)


def test_table_columns_line_up():
    row = make_row()
    header, line = report.format_header(decode.TABLE), report.format_row(row, decode.TABLE)
    assert len(header) == len(line)
    cells = line.split()
    assert cells[:7] == ["mixtral-8x7b", "1", "down", "2", "4096", "14336", "2"]
    assert cells[-1] == "ok"
    failed = report.format_row({"model": "m", "tokens": 1, "gemm": "up", "check": "FAIL"}, decode.TABLE)
    assert len(failed) == len(header) and "FAIL" in failed


@pytest.mark.skipif(_ops.kernels_unavailable_reason() is None, reason="a GPU with the kernels is present")
def test_main_decode_without_gpu_exits_2(capsys):
    assert cli.main(["--decode"]) == 2
    assert "needs a CUDA GPU and the built moe_gemm kernels" in capsys.readouterr().err
