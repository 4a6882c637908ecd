"""``python -m moe_gemm.bench --layer`` (``moe_gemm/bench/layer.py``) on CPU: the shipped configs, FLOPs, rates and
ratios, summary, table and command line; the implementations on tiny shapes (the same layer: outputs and the
gradients of all four inputs); the measurements and a whole run with a one-call timer. One GPU test runs a config on
the device, Liger included where it imports."""

import ast
import json
import math
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_cuda_op

import moe_gemm
from moe_gemm.bench import __main__ as cli
from moe_gemm.bench import layer, report

PACKAGE = pathlib.Path(moe_gemm.__file__).parent
SETUP_PY = PACKAGE.parent / "setup.py"
TINY = {"T": 10, "d": 32, "n": 16, "E": 6, "K": 2}
PAIR_FLOPS = 32768 * 4 * 4096 * 2048  # sonic-1: T * K * d * n


def one_call(fn):
    """A timer for the CPU: runs the function once and says 1 ms."""
    fn()
    return 1.0


def cpu_setup(implementations=("moe_gemm", "grouped_mm", "batched_mm"), liger=None) -> layer.Setup:
    return layer.Setup(implementations, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0),
                       one_call, liger)  # fmt: skip


class LigerStandIn:
    """``LigerFusedMoEFunction.apply``'s interface in differentiable torch ops, for the CPU: ``(x [T, d],
    gate_up_proj [E, 2n, d], down_proj [E, d, n], top_k_index int32 [T, K], top_k_weights [T, K])``."""

    @staticmethod
    def apply(x, gate_up_proj, down_proj, top_k_index, top_k_weights):
        assert top_k_index.dtype == torch.int32  # Liger's routing kernels read int32 ids
        ids = top_k_index.long()
        gate, up = torch.einsum("tkod,td->tko", gate_up_proj[ids], x).chunk(2, dim=-1)
        y = torch.einsum("tkdn,tkn->tkd", down_proj[ids], F.silu(gate) * up)
        return (top_k_weights.unsqueeze(-1).to(y.dtype) * y).sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Configs, FLOPs, rates, ratios.
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_configs_have_the_structure_the_benchmark_reads():
    shipped = layer.load_layer_configs()
    assert set(shipped) == {"about", "configs", "published_h100"}
    for config in shipped["configs"].values():
        assert set(config) == {"T", "d", "n", "E", "K"}
        assert all(isinstance(value, int) and value > 0 for value in config.values())
        assert config["K"] <= config["E"]
    assert shipped["configs"]["sonic-1"] == {"T": 32768, "d": 4096, "n": 2048, "E": 64, "K": 4}
    assert set(shipped["published_h100"]) <= set(shipped["configs"])
    assert shipped["published_h100"]["sonic-1"] == {"sonicmoe_fwd": 598, "sonicmoe_bwd": 588}
    for figures in shipped["published_h100"].values():
        assert all(layer.published_metric(key)[1] in layer.METRICS for key in figures)
    assert set(layer.QUICK_CONFIGS) | {layer.DECODE_CONFIG} <= set(shipped["configs"])


def test_every_json_file_of_the_package_ships_as_package_data():
    call = next(node for node in ast.walk(ast.parse(SETUP_PY.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")  # fmt: skip
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    shipped = {PACKAGE / pattern for pattern in package_data["moe_gemm"]}
    assert {path for path in PACKAGE.rglob("*.json")} <= shipped
    assert PACKAGE / "bench" / "layer_configs.json" in shipped


def test_selected_configs():
    shipped = layer.load_layer_configs()
    assert list(layer.selected_configs(shipped, None, quick=False)) == list(shipped["configs"])
    picked = layer.selected_configs(shipped, ["deepseek-v3", "sonic-2"], quick=False)
    assert picked == {"deepseek-v3": shipped["configs"]["deepseek-v3"], "sonic-2": shipped["configs"]["sonic-2"]}
    quick = layer.selected_configs(shipped, None, quick=True)
    assert list(quick) == ["sonic-1", "sonic-4"]
    assert quick["sonic-4"] == {"T": 4096, "d": 4096, "n": 256, "E": 256, "K": 16}
    assert shipped["configs"]["sonic-4"]["T"] == 32768  # the loaded configs are left as they were


def test_flops_follow_sonicmoes_convention():
    flops = layer.layer_flops({"T": 32768, "d": 4096, "n": 2048, "E": 64, "K": 4})
    assert flops == {"fwd": 6 * PAIR_FLOPS, "bwd": 12 * PAIR_FLOPS, "fwd_bwd": 18 * PAIR_FLOPS}


def test_rates_from_times():
    config = {"T": 32768, "d": 4096, "n": 2048, "E": 64, "K": 4}
    row = layer.add_rates({"fwd_ms": 2.0, "fwd_bwd_ms": 6.0}, config)
    assert row["bwd_ms"] == 4.0
    assert row["fwd_tflops"] == pytest.approx(6 * PAIR_FLOPS / 2e9)  # 494.7
    assert row["bwd_tflops"] == pytest.approx(12 * PAIR_FLOPS / 4e9)
    assert row["fwd_bwd_tflops"] == pytest.approx(18 * PAIR_FLOPS / 6e9)
    noisy = layer.add_rates({"fwd_ms": 0.2, "fwd_bwd_ms": 0.19}, TINY)
    assert noisy["bwd_ms"] < 0 and "bwd_tflops" not in noisy and noisy["fwd_bwd_tflops"] > 0
    assert layer.add_rates({"fwd_ms": 1.0}, TINY).keys() == {"fwd_ms", "fwd_tflops"}


def test_ratios_against_grouped_mm_and_the_fastest_of_transformers():
    rows = layer.add_ratios([
        {"impl": "moe_gemm", "fwd_ms": 1.0, "fwd_bwd_ms": 4.0},
        {"impl": "grouped_mm", "fwd_ms": 2.0, "fwd_bwd_ms": 6.0},
        {"impl": "batched_mm", "fwd_ms": 1.5, "fwd_bwd_ms": 8.0},
        {"impl": "liger", "fwd_ms": 4.0},
    ])  # fmt: skip
    ours, grouped_mm, batched_mm, liger = rows
    assert (ours["x_grouped_mm_fwd"], ours["x_grouped_mm_fwd_bwd"]) == (2.0, 1.5)
    assert (ours["x_transformers_fwd"], ours["x_transformers_fwd_bwd"]) == (1.5, 1.5)
    assert liger["x_grouped_mm_fwd"] == 0.5 and "x_grouped_mm_fwd_bwd" not in liger
    assert not any(key.startswith("x_") for key in (*grouped_mm, *batched_mm))


def test_published_metric():
    assert layer.published_metric("sonicmoe_fwd") == ("SonicMoE", "fwd")
    assert layer.published_metric("sonicmoe_bwd") == ("SonicMoE", "bwd")
    assert layer.published_metric("liger_fused_moe_fwd_bwd") == ("Liger fused MoE", "fwd_bwd")
    assert layer.published_metric("other_fwd") == ("other", "fwd")
    with pytest.raises(ValueError, match="_fwd, _bwd or _fwd_bwd"):
        layer.published_metric("sonicmoe_latency")


# ---------------------------------------------------------------------------------------------------------------
# Summary, table, command line.
# ---------------------------------------------------------------------------------------------------------------


def summary_rows() -> list[dict]:
    def row(config, impl, fwd, bwd, fwd_bwd, peak):
        return {"config": config, "impl": impl, "fwd_tflops": fwd, "bwd_tflops": bwd, "fwd_bwd_tflops": fwd_bwd,
                "peak_gb": peak, "check": "ok"}  # fmt: skip

    return [
        row("sonic-1", "moe_gemm", 600.0, 400.0, 450.0, 20.0),
        row("sonic-1", "grouped_mm", 300.0, 400.0, 300.0, 8.0),
        row("sonic-1", "liger", 400.0, None, None, None) | {"check": "OOM", "problem": "liger ran out of memory"},
        row("qwen3-30b-a3b", "moe_gemm", 400.0, 250.0, 280.0, 16.0),
        row("qwen3-30b-a3b", "grouped_mm", 200.0, 125.0, 140.0, 8.0),
    ]


def test_summary_per_config_and_over_the_configs():
    published = {"sonic-1": {"sonicmoe_fwd": 600, "sonicmoe_bwd": 500},
                 "qwen3-30b-a3b": {"liger_fused_moe_fwd": 500, "liger_fused_moe_fwd_bwd": 400}}  # fmt: skip
    decode_rows = [{"impl": "moe_gemm", "x_transformers_fwd": 2.0, "x_transformers_fwd_bwd": 1.0},
                   {"impl": "grouped_mm"}, {"impl": "moe_gemm", "x_transformers_fwd": 8.0}]  # fmt: skip
    summary = layer.summarize(summary_rows(), decode_rows, [{"speedup": 4.0}, {"speedup": 9.0}], published)

    sonic = summary["configs"]["sonic-1"]
    assert sonic["moe_gemm_vs"]["grouped_mm"] == {"fwd": 2.0, "bwd": 1.0, "fwd_bwd": 1.5, "peak": 2.5}
    assert sonic["moe_gemm_vs"]["liger"] == {"fwd": 1.5, "bwd": None, "fwd_bwd": None, "peak": None}
    assert sonic["moe_gemm_of_published"] == {"sonicmoe_fwd": 1.0, "sonicmoe_bwd": 0.8}
    qwen = summary["configs"]["qwen3-30b-a3b"]
    assert qwen["moe_gemm_of_published"] == {"liger_fused_moe_fwd": 0.8, "liger_fused_moe_fwd_bwd": 0.7}
    assert summary["moe_gemm_vs_geomean"]["grouped_mm"] == {"fwd": 2.0, "fwd_bwd": pytest.approx(math.sqrt(3.0))}
    assert summary["moe_gemm_vs_geomean"]["liger"]["fwd"] == 1.5  # over the configs that ran it
    assert math.isnan(summary["moe_gemm_vs_geomean"]["liger"]["fwd_bwd"])
    assert summary["decode_moe_gemm_vs_transformers"] == {"fwd": 4.0, "fwd_bwd": 1.0}
    assert summary["routing_speedup"] == pytest.approx(6.0)

    lines = layer.format_summary(summary).splitlines()
    sonic_line = next(line for line in lines if line.startswith("  sonic-1"))
    assert "vs grouped_mm 2.00x / 1.50x, memory 2.50x; vs liger 1.50x / -, memory -" in sonic_line
    assert sonic_line.endswith("SonicMoE (H100, published) fwd 600, bwd 500: moe_gemm at 1.00x, 0.80x")
    qwen_line = next(line for line in lines if line.startswith("  qwen3-30b-a3b"))
    assert qwen_line.endswith("Liger fused MoE (H100, published) fwd 500, fwd+bwd 400: moe_gemm at 0.80x, 0.70x")
    assert "  vs grouped_mm       2.00x / 1.73x" in lines and "  vs liger            1.50x / -" in lines
    assert lines[-2].startswith("decode sizes (qwen3-30b-a3b, T in 1, 8, 32)") and lines[-2].endswith("fwd 4.00x, "
                                                                                                     "fwd+bwd 1.00x")
    assert lines[-1] == "routing kernel vs PyTorch ops (DeepSeek-V3 router): 6.00x"


def test_table_lines():
    header = report.format_header(layer.TABLE)
    assert header.split() == ["config", "T", "d", "n", "E", "K", "impl", "fwd", "bwd", "fwd+bwd", "peak_GB",
                              "x_gmm_fwd", "x_gmm_f+b", "sonic_fwd", "sonic_bwd", "rel_err", "check"]  # fmt: skip
    assert len(report.format_header(layer.DECODE_TABLE).split()) == len(layer.DECODE_TABLE)
    ours = {"config": "sonic-1", **layer.load_layer_configs()["configs"]["sonic-1"], "impl": "moe_gemm",
            "fwd_tflops": 571.4, "bwd_tflops": 409.2, "fwd_bwd_tflops": 449.0, "peak_gb": 19.94,
            "x_grouped_mm_fwd": 1.73, "x_grouped_mm_fwd_bwd": 1.27, "sonicmoe_fwd": 598, "sonicmoe_bwd": 588,
            "rel_error": 3.1e-3, "check": "ok", "problem": None}  # fmt: skip
    assert report.format_row(ours, layer.TABLE).split() == [
        "sonic-1", "32768", "4096", "2048", "64", "4", "moe_gemm", "571", "409", "449", "19.9", "1.73", "1.27", "598",
        "588", "3.1e-03", "ok",
    ]  # fmt: skip
    oom = {"config": "sonic-1", "impl": "liger", "check": "OOM", "problem": "liger ran out of memory"}
    line = report.format_row(oom, layer.TABLE)
    assert line.split()[:3] == ["sonic-1", "-", "-"] and line.endswith("OOM    liger ran out of memory")


def test_the_router_in_the_model_dtype_rounds_its_products_as_that_dtype():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 64, generator=generator).bfloat16()
    router = torch.randn(8, 64, generator=generator).bfloat16()
    exact = layer.router_logits(hidden, router)  # float32 products of the bf16 values
    assert exact.dtype == torch.float32 and torch.equal(exact, hidden.float() @ router.float().T)
    model = layer.router_logits(hidden, router, "model")
    # The same logits up to the bf16 output's rounding (2**-8 relative), in float32 for the routing.
    assert model.dtype == torch.float32 and torch.equal(model, (hidden @ router.T).float())
    assert 0 < (model - exact).abs().max() <= 2**-8 * exact.abs().max()


def test_command_line_of_the_layer_mode():
    args = cli.parse_args(["--layer"])
    assert cli.mode_of(args) is layer
    assert args.configs is None and args.quick is False and args.liger_autotune is False
    assert args.router_dtype == "float32"
    args = cli.parse_args(["--layer", "--configs", "sonic-2", "deepseek-v3", "--quick", "--liger-autotune",
                           "--router-dtype", "model"])  # fmt: skip
    assert args.configs == ["sonic-2", "deepseek-v3"] and args.quick and args.liger_autotune
    assert args.router_dtype == "model"
    assert args.tokens == [32, 4096]  # --quick still means the quick token counts for the other tables


@pytest.mark.parametrize(
    "argv",
    [["--layer", "--configs", "mixtral"], ["--configs", "sonic-1"], ["--liger-autotune"], ["--router-dtype", "model"],
     ["--layer", "--router-dtype", "float16"]],
)  # fmt: skip
def test_command_line_rejects(argv, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The implementations and the measurements, on CPU.
# ---------------------------------------------------------------------------------------------------------------


def test_every_implementation_computes_the_same_layer():
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    tiny = layer.make_layer(TINY, "cpu", torch.float32, torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for p in tiny.parameters()] == [(6, 32), (6, 32, 32), (6, 32, 16)]
    hidden = torch.randn(TINY["T"], TINY["d"]).requires_grad_()
    grad_out = torch.randn(TINY["T"], TINY["d"])
    results = {}
    for impl in ("moe_gemm", "grouped_mm", "batched_mm", "liger"):
        inputs = (hidden, *tiny.parameters())
        for tensor in inputs:
            tensor.grad = None
        out = layer.layer_function(impl, tiny, LigerStandIn)(hidden)
        out.backward(grad_out)
        results[impl] = (out.detach(), *(tensor.grad for tensor in inputs))
    # hidden, router, gate_up_proj and down_proj all get a gradient, and the same one in every implementation.
    assert all(grad is not None and grad.abs().max() > 0 for grad in results["grouped_mm"][1:])
    for impl, result in results.items():
        for mine, theirs in zip(result, results["grouped_mm"]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=impl)


def test_transformers_routing_is_qwen3s():
    logits = torch.randn(5, 8)
    weights, ids = layer.route_like_transformers(logits, 3, torch.bfloat16)
    probs = logits.softmax(dim=-1)
    assert weights.dtype == torch.bfloat16 and torch.equal(ids, probs.topk(3).indices)
    top = probs.topk(3).values
    torch.testing.assert_close(weights, (top / top.sum(-1, keepdim=True)).bfloat16())


def test_moe_gemm_unfused_passes_fused_false(monkeypatch):
    assert layer.implementation_names(liger_available=False) == ("moe_gemm", "moe_gemm_unfused", "grouped_mm")
    assert layer.implementation_names(True) == ("moe_gemm", "moe_gemm_unfused", "grouped_mm", "liger")
    experts_forward, calls = moe_gemm.experts_forward, []

    def with_fused(*args, fused=True, **kwargs):
        calls.append(fused)
        return experts_forward(*args, fused=fused, **kwargs)

    monkeypatch.setattr(moe_gemm, "experts_forward", with_fused)
    tiny = layer.make_layer(TINY, "cpu", torch.float32)
    hidden = torch.randn(TINY["T"], TINY["d"])
    torch.testing.assert_close(layer.layer_function("moe_gemm", tiny)(hidden),
                               layer.layer_function("moe_gemm_unfused", tiny)(hidden))  # fmt: skip
    assert calls == [True, False]


def test_measure_case_on_cpu():
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    published = {"sonicmoe_fwd": 598, "sonicmoe_bwd": 588}
    setup = cpu_setup(("moe_gemm", "grouped_mm", "batched_mm", "liger"), LigerStandIn)
    rows = layer.measure_case("tiny", TINY, published, setup)

    assert [row["impl"] for row in rows] == ["moe_gemm", "grouped_mm", "batched_mm", "liger"]
    for row in rows:
        assert row["check"] == "ok" and row["problem"] is None, row
        assert (row["config"], row["T"], row["K"]) == ("tiny", 10, 2)
        assert row["fwd_ms"] == row["fwd_bwd_ms"] == 1.0 and row["peak_gb"] is None  # no peak off CUDA
        assert row["fwd_tflops"] == pytest.approx(6 * 10 * 2 * 32 * 16 / 1e9)
    # Float32 everywhere: far below the benchmark's 1e-2; no error for the reference itself.
    assert "rel_error" not in rows[1] and all(row["rel_error"] < 1e-5 for row in rows[2:])
    assert rows[0]["sonicmoe_fwd"] == 598 and "sonicmoe_fwd" not in rows[3]
    assert rows[0]["x_grouped_mm_fwd"] == rows[3]["x_grouped_mm_fwd_bwd"] == 1.0


def test_a_wrong_or_out_of_memory_implementation_is_a_row_and_the_case_goes_on(monkeypatch):
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    layer_function = layer.layer_function

    def broken(implementation, tiny, liger=None, router_dtype="float32"):
        forward = layer_function(implementation, tiny, liger, router_dtype)
        if implementation == "batched_mm":
            return lambda hidden: 2 * forward(hidden)
        if implementation == "liger":

            def out_of_memory(hidden):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

            return out_of_memory
        return forward

    monkeypatch.setattr(layer, "layer_function", broken)
    timed = []
    setup = cpu_setup(("moe_gemm", "grouped_mm", "batched_mm", "liger"))
    setup = setup._replace(timer=lambda fn: timed.append(fn) or 1.0)
    rows = {row["impl"]: row for row in layer.measure_case("tiny", TINY, {}, setup)}
    assert rows["moe_gemm"]["check"] == rows["grouped_mm"]["check"] == "ok"
    wrong = rows["batched_mm"]
    assert wrong["check"] == "FAIL"
    assert wrong["problem"] == f"differs from grouped_mm: rel. error {wrong['rel_error']:.2e}"
    assert wrong["rel_error"] == pytest.approx(1.0) and "fwd_ms" not in wrong  # a wrong layer is not timed
    assert rows["liger"]["check"] == "OOM" and rows["liger"]["problem"] == "liger ran out of memory"
    assert len(timed) == 4  # fwd and fwd+bwd of moe_gemm and grouped_mm
    # An OOM row is reported, not failed; a wrong one fails the run.
    args = cli.parse_args(["--layer"])
    assert report.finish(args, "", [rows["moe_gemm"], rows["liger"]]) == 0
    assert report.finish(args, "", list(rows.values())) == 1


def test_load_liger_sets_the_autotune_switch_before_importing(monkeypatch):
    monkeypatch.setenv("LIGER_FUSED_MOE_AUTOTUNE", "restored at teardown")
    monkeypatch.delenv("LIGER_FUSED_MOE_AUTOTUNE")
    function, line = layer.load_liger(autotune=False)
    assert os.environ["LIGER_FUSED_MOE_AUTOTUNE"] == "0"
    if function is None:  # no liger_kernel, or no triton for it
        assert line.startswith("liger not run (")
    else:
        assert line.startswith("liger-kernel ") and line.endswith("(not autotuned, LIGER_FUSED_MOE_AUTOTUNE=0)")
    layer.load_liger(autotune=True)
    assert os.environ["LIGER_FUSED_MOE_AUTOTUNE"] == "1"


@pytest.fixture
def tiny_configs(monkeypatch):
    """The shipped configs replaced by tiny ones (the decode section's config among them), liger off."""
    configs = {
        "about": "tiny",
        "configs": {"tiny-a": {"T": 16, "d": 32, "n": 16, "E": 6, "K": 2},
                    "qwen3-30b-a3b": {"T": 24, "d": 48, "n": 16, "E": 8, "K": 4}},
        "published_h100": {"tiny-a": {"sonicmoe_fwd": 598, "sonicmoe_bwd": 588}},
    }  # fmt: skip
    monkeypatch.setattr(layer, "load_layer_configs", lambda: configs)
    monkeypatch.setattr(layer, "QUICK_CONFIGS", ("tiny-a",))
    monkeypatch.setattr(layer, "load_liger", lambda autotune: (None, "liger not run (stand-in)"))
    monkeypatch.setattr(report.torch.cuda, "get_device_name", lambda *args: "cpu stand-in")
    return configs


@pytest.mark.parametrize("quick", [False, True])
def test_a_whole_run_on_cpu_writes_its_tables_and_json(quick, tiny_configs, tmp_path, capsys):
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    argv = ["--layer", "--json", str(tmp_path / "layer.json")] + (["--quick"] if quick else [])
    args = cli.parse_args(argv)
    assert layer.run(args, {}, device="cpu", timer=one_call) == 0

    out = capsys.readouterr().out
    assert "liger not run (stand-in)" in out and out.count("\nconfig ") == 2  # the layer and decode tables
    result = json.loads((tmp_path / "layer.json").read_text())
    assert result["mode"] == "layer" and result["device"] == "cpu stand-in"
    expected = {"tiny-a": {"T": 2, "d": 32, "n": 16, "E": 6, "K": 2}} if quick else tiny_configs["configs"]
    assert result["configs"] == expected
    assert [(r["config"], r["impl"]) for r in result["rows"]] == [
        (name, impl) for name in expected for impl in ("moe_gemm", "moe_gemm_unfused", "grouped_mm")
    ]
    assert [(r["T"], r["impl"]) for r in result["decode_rows"]] == [
        (tokens, impl)
        for tokens in layer.DECODE_TOKENS
        for impl in ("moe_gemm", "moe_gemm_unfused", "grouped_mm", "batched_mm")
    ]
    assert len(result["routing_rows"]) == len(layer.ROUTING_TOKENS)
    assert all(r["check"] == "ok" for r in result["rows"] + result["decode_rows"] + result["routing_rows"])
    assert result["summary"]["configs"]["tiny-a"]["moe_gemm_vs"]["grouped_mm"]["fwd"] == 1.0
    assert sum(line.startswith("tiny-a ") for line in out.splitlines()) == 3  # one row per implementation


# ---------------------------------------------------------------------------------------------------------------
# On the GPU.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda_op
def test_measure_case_on_the_gpu():
    pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    liger, _ = layer.load_liger(autotune=False)
    config = {"T": 512, "d": 256, "n": 128, "E": 16, "K": 4}
    device = torch.device("cuda")
    setup = layer.Setup(layer.implementation_names(liger is not None), torch.bfloat16, device,
                        torch.Generator(device=device).manual_seed(0), one_call, liger)  # fmt: skip
    rows = layer.measure_case("small", config, {}, setup)
    weight_grad_gb = 2 * (16 * 256 + 16 * 3 * 128 * 256) / 1e9  # router and experts, bf16
    for row in rows:
        assert row["check"] == "ok", row
        assert row["peak_gb"] >= weight_grad_gb
