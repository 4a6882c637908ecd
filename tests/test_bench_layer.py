"""``python -m moe_gemm.bench --layer`` (``moe_gemm/bench/layer.py``) on CPU: memory estimates, speedups, table and
summary, and the measurements themselves on tiny shapes with a one-call timer (every implementation checked against
transformers' ``grouped_mm``, forward and backward)."""

import math

import pytest
import torch

from moe_gemm.bench import layer, report

TINY_MODEL = {"experts": 6, "hidden": 32, "moe_intermediate": 16, "top_k": 2}


def test_batched_mm_estimate_counts_two_weight_copies_per_pair():
    model = {"experts": 256, "hidden": 7168, "moe_intermediate": 2048, "top_k": 8}
    # DeepSeek-V3 at 256 tokens: 2048 pairs x 3 * 2048 * 7168 bf16 weights = 180 GB, beyond any GPU.
    assert layer.estimated_bytes("batched_mm", "fwd", model, 256) > 180e9
    assert layer.estimated_bytes("grouped_mm", "fwd", model, 256) < 1e9
    assert layer.estimated_bytes("moe_gemm", "fwd+bwd", model, 256) > 256 * 3 * 2048 * 7168 * 2


def test_speedups_table_and_summary():
    rows = [
        layer.add_speedups({"model": "m", "tokens": 1, "mode": "fwd", "moe_gemm_ms": 1.0,
                                  "batched_mm_ms": 2.0, "grouped_mm_ms": 3.0, "check": "ok", "notes": []}),
        layer.add_speedups({"model": "m", "tokens": 256, "mode": "fwd", "moe_gemm_ms": 2.0,
                                  "grouped_mm_ms": 4.0, "check": "ok", "notes": ["batched_mm skipped: needs ~9 GB"]}),
    ]  # fmt: skip
    assert rows[0]["speedup_best"] == 2.0 and rows[0]["speedup_grouped_mm"] == 3.0
    summary = layer.summarize_layer(rows, [{"speedup": 4.0}, {"speedup": 9.0}])
    assert summary["fwd"]["speedup_grouped_mm_tokens_ge_256"] == 2.0
    assert summary["fwd"]["speedup_best_tokens_le_32"] == 2.0
    assert math.isnan(summary["fwd+bwd"]["speedup_best_tokens_le_32"])
    assert summary["routing_speedup"] == pytest.approx(6.0)
    line = report.format_row(rows[1] | {"problem": "; ".join(rows[1]["notes"])}, layer.TABLE)
    assert "batched_mm skipped" in line and line.split()[:3] == ["m", "256", "fwd"]
    assert len(report.format_header(layer.TABLE).split()) == len(layer.TABLE)
    text = layer.format_summary(summary)
    assert text.startswith("geometric means over the suite:") and "target" not in text
    assert "fwd      moe_gemm vs grouped_mm at >= 256 tokens  2.00x" in text
    assert "routing kernel vs PyTorch ops (DeepSeek-V3 router):  6.00x" in text


def test_measure_layer_on_cpu(monkeypatch):
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    monkeypatch.setattr(layer, "EAGER_MAX_MS", math.inf)  # a busy CPU must not switch eager to a single call
    experts = layer.make_experts_module(TINY_MODEL, "cpu", torch.float32)
    timed = []

    def one_call(fn):
        result = fn()
        timed.append(result)
        return 1.0

    rows = layer.measure_layer("tiny", TINY_MODEL, 10, experts, timer=one_call)

    assert [row["mode"] for row in rows] == ["fwd", "fwd+bwd"]
    for row in rows:
        assert row["check"] == "ok", row["notes"]
        assert all(row[f"{name}_ms"] == 1.0 for name in layer.IMPLEMENTATIONS)
    # Forward outputs checked against grouped_mm: float32 everywhere, so far below the 1e-2 of the benchmark.
    assert all(rows[0][f"{name}_rel_error"] < 1e-5 for name in ("moe_gemm", "eager", "batched_mm"))
    # The backward gives every implementation's gradients in hidden states and both weights: compare them.
    grads = timed[4:]
    assert len(grads) == 4 and all(len(g) == 3 for g in grads)
    for other in grads[1:]:
        for mine, theirs in zip(other, grads[0]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert grads[0][1].abs().max() > 0


def test_measure_routing_on_cpu():
    row = layer.measure_routing(17, "cpu", timer=lambda fn: (fn(), 2.0)[1])
    assert row["check"] == "ok" and row["speedup"] == 1.0
