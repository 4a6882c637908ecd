"""``python -m moe_gemm.bench --ep`` as a group of one: on the CPU (gloo), or through NCCL on the GPU where the kernels
run; and its command line. Several ranks run it in tests/test_distributed.py."""

import json

import pytest
import torch
import torch.distributed as dist

from moe_gemm import _ops
from moe_gemm.bench import __main__ as cli
from moe_gemm.bench import ep
from moe_gemm.distributed import TRANSPORTS

TINY = {"T": 0, "d": 32, "n": 16, "E": 4, "K": 2}


def test_ep_options_parse_and_go_with_ep_only():
    args = cli.parse_args(["--ep", "--configs", "deepseek-v3", "--tokens", "1", "8", "--ep-layer-tokens", "64"])
    assert cli.mode_of(args) is ep and args.configs == ["deepseek-v3"] and args.tokens == [1, 8]
    assert args.ep_layer_tokens == 64
    assert cli.parse_args(["--ep"]).tokens is None  # ep's own defaults, per rank, not the suite's


@pytest.mark.parametrize("argv", [["--ep-layer-tokens", "8"], ["--ep", "--layer"], ["--ep", "--liger-autotune"]])
def test_ep_options_elsewhere_are_refused(argv):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_ep_benchmark_as_a_group_of_one(tmp_path, capsys):
    path = tmp_path / "ep.json"
    args = cli.parse_args(["--ep", "--tokens", "0", "7", "--ep-layer-tokens", "6", "--json", str(path)])
    assert ep.run(args, configs={"tiny": TINY}) == 0
    assert not dist.is_initialized()  # the group it made is gone
    report = json.loads(path.read_text())
    # With the kernels (a GPU machine), the same run goes through NCCL on the one GPU.
    on_gpu = _ops.kernels_unavailable_reason() is None and torch.cuda.is_available()
    assert report["world_size"] == 1 and report["device"] == (torch.cuda.get_device_name() if on_gpu else "CPU")
    rows = report["rows"]
    # Symmetric memory runs on the GPU only (there, through torch's symmetric memory at world size 1).
    transports = list(TRANSPORTS) if on_gpu else ["all_to_all"]
    assert [(r["tokens"], r["transport"], r["step"]) for r in rows] == [
        (tokens, name, step) for tokens in (0, 7) for name in transports for step in ("dispatch", "combine")
    ]
    for row in rows:  # every pair's row once: tokens * K rows of d bf16 values; symmetric memory's dispatch sends each
        # token once per rank, here tokens rows
        rows_sent = row["tokens"] * (1 if (row["transport"], row["step"]) == ("symmetric_memory", "dispatch") else 2)
        assert row["ep_mb"] == pytest.approx(rows_sent * 32 * 2 / 1e6)
        assert row["ep_ms"] > 0 and row["check"] == "ok"
    assert [layer["transport"] for layer in report["layer_rows"]] == transports
    for layer in report["layer_rows"]:
        # One rank: the layer's output is checked against experts_forward on the same weights.
        assert layer["tokens"] == 6 and layer["check"] == "ok" and layer["rel_error"] < 1e-2
        assert layer["fwd_tflops"] == pytest.approx(6 * 6 * 2 * 32 * 16 / (layer["fwd_ms"] * 1e9))
    out = capsys.readouterr().out
    if on_gpu:
        assert f"1 rank(s) of {report['device']}" in out and "smoke test" not in out
    else:
        assert "1 rank(s) of CPU" in out and "smoke test" in out
        assert "not run: symmetric_memory (symmetric memory is CUDA only)" in out
