"""The pure parts of the backward benchmark: its floor, table and geometric means."""

import math

import pytest
import torch

from moe_gemm.bench import backward, report, timing


def test_wgrad_floor_counts_every_expert_gradient_written():
    # 1 TB/s moves 1e9 bytes per ms. 4 experts of [8, 16] bf16 gradients = 1024 bytes, inputs 2 * (10 * 16 + 10 * 8).
    num_bytes = 2 * (10 * 16 + 10 * 8 + 4 * 8 * 16)
    assert backward.wgrad_floor_ms(10, 8, 16, 4, (1e9, 1.0)) == pytest.approx(num_bytes / 1e9)
    # Compute-bound: 2 * M * N * K FLOPs at 1 TFLOP/s = 1e9 FLOPs per ms.
    assert backward.wgrad_floor_ms(10**6, 8, 16, 4, (1.0, 1e9)) == pytest.approx(2 * 10**6 * 8 * 16 / 1e9)


def test_summary_geometric_means_per_selection():
    rows = [
        {"tokens": 1, "wgrad_speedup": 4.0, "dgrad_speedup": 1.0, "train_speedup": None},
        {"tokens": 256, "wgrad_speedup": 1.0, "dgrad_speedup": 2.0, "train_speedup": 2.0},
        {"tokens": 256, "wgrad_speedup": 4.0, "dgrad_speedup": 8.0, "train_speedup": 0.5},
    ]
    summary = backward.summarize(rows)
    assert summary["all"]["shapes"] == 3
    assert summary["all"]["wgrad_speedup"] == pytest.approx((4.0 * 1.0 * 4.0) ** (1 / 3))
    assert summary["tokens>=256"]["dgrad_speedup"] == pytest.approx(4.0)
    assert summary["tokens>=256"]["train_speedup"] == pytest.approx(1.0)
    assert math.isnan(summary["tokens=1"]["train_speedup"])  # no measurement, no mean
    assert "tokens>=256" in backward.format_summary(summary)


def test_table_row_has_a_cell_per_column_and_dashes_for_missing_values():
    row = {"model": "m", "tokens": 256, "gemm": "up", "M": 2048, "N": 64, "K": 32, "wgrad_ms": 0.5, "check": "ok"}
    cells = report.format_row(row, backward.TABLE).split()
    assert len(cells) == len(backward.TABLE) == len(report.format_header(backward.TABLE).split())
    assert cells[6] == "0.500" and cells[7] == "-"


def test_measure_shape_on_cpu_times_each_pair_together(monkeypatch):
    # Every pair (ours, torch's) goes to the timer in one call, ours first; each function runs (0.5 ms each).
    calls = []

    def fake_interleaved(fns):
        calls.append(len(fns))
        for fn in fns:
            fn()
        return [0.5, 1.0][: len(fns)]

    monkeypatch.setattr(timing, "bench_interleaved_ms", fake_interleaved)
    weight = torch.randn(4, 16, 32).bfloat16()
    row = backward.measure_shape("tiny", 5, "up", weight, torch.tensor([3, 0, 5, 2]), (791.0, 3.02))
    assert row["check"] == "ok" and row["problem"] is None and row["rel_error"] < 1e-2
    assert calls == [2, 2, 2]
    for kind in ("wgrad", "dgrad", "train"):
        assert row[f"{kind}_ms"] == 0.5 and row[f"{kind}_torch_ms"] == 1.0 and row[f"{kind}_speedup"] == 2.0
    assert row["wgrad_x_floor"] > 0
