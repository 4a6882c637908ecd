"""The pure parts of ``scripts/ab.py`` (imported by path): variants, arguments, the summary and its lines."""

import importlib.util
import math
import pathlib

import pytest

from moe_gemm.bench.decode import DECODE_TOKENS

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "ab.py"
_spec = importlib.util.spec_from_file_location("ab", SCRIPT)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def test_named_variants():
    assert ab.parse_variant("current") == ab.Variant("current", {}, baseline=False)
    assert ab.parse_variant("baseline") == ab.Variant("baseline", {}, baseline=True)


def test_plan_override_variant_names_the_keywords_of_plan_override():
    variant = ab.parse_variant("tile_config=128x128,split_k=1,dynamic=0")
    assert variant.name == "tile_config=128x128,split_k=1,dynamic=0" and not variant.baseline
    assert variant.override == {"tile_config": "128x128", "split_k": 1, "dynamic_schedule": False}
    assert ab.parse_variant("dynamic=1").override == {"dynamic_schedule": True}
    assert ab.parse_variant("dynamic=auto").override == {"dynamic_schedule": None}
    assert ab.parse_variant("split_k=0").override == {"split_k": 0}


@pytest.mark.parametrize(
    "text",
    ["MOE_GEMM_SPLIT_K=1", "tile_config", "split_k=-1", "split_k=two", "dynamic=yes", "tile_config=",
     "split_k=1,split_k=2", "auto"],
)  # fmt: skip
def test_bad_variants_are_refused(text):
    with pytest.raises(ab.argparse.ArgumentTypeError):
        ab.parse_variant(text)


def test_default_arguments():
    args = ab.parse_args([])
    assert [v.name for v in args.variants] == ["current"]
    assert args.kinds == ["forward", "dgrad", "wgrad"] and args.tokens == [256, 2048, 16384]
    assert len(args.models) == 5 and args.repeats == 1 and args.baseline is None
    with_baseline = ab.parse_args(["--baseline", "/tmp/base.so"])
    assert [v.name for v in with_baseline.variants] == ["baseline", "current"]
    assert [v.baseline for v in with_baseline.variants] == [True, False]


def test_arguments():
    args = ab.parse_args(
        ["baseline", "current", "split_k=1", "--baseline", "b.so", "--kinds", "wgrad", "--decode", "--repeats", "3",
         "--models", "mixtral-8x7b", "--json", "ab.json"]
    )  # fmt: skip
    assert [v.name for v in args.variants] == ["baseline", "current", "split_k=1"]
    assert args.kinds == ["wgrad"] and args.tokens == list(DECODE_TOKENS) and args.repeats == 3
    assert args.models == ["mixtral-8x7b"] and args.json == "ab.json"
    assert ab.parse_args(["--tokens", "8", "64"]).tokens == [8, 64]


@pytest.mark.parametrize(
    "argv",
    [["baseline"], ["current", "current"], ["--repeats", "0"], ["--models", "llama"], ["--decode", "--tokens", "8"],
     ["--kinds", "backward"]],
)  # fmt: skip
def test_arguments_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        ab.parse_args(argv)
    assert exit_info.value.code == 2


def row(tokens, kind, speedups, problems=None):
    return {"model": "m", "tokens": tokens, "gemm": "up", "kind": kind, "torch_ms": 1.0, "speedup": speedups,
            "problems": problems or {}}  # fmt: skip


def test_summary_means_are_over_the_gemms_every_variant_ran():
    names = ["baseline", "current"]
    rows = [
        row(256, "forward", {"baseline": 1.0, "current": 2.0}),
        row(256, "forward", {"baseline": 4.0, "current": 2.0}),
        row(2048, "forward", {"baseline": 2.0}, {"current": "relative error 1e+00 against torch"}),  # left out
        row(2048, "forward", {"baseline": 3.0, "current": 3.0}),
        row(256, "wgrad", {"baseline": 0.5, "current": 2.0}),
    ]
    summary = ab.summarize(rows, names)
    assert list(summary) == ["forward", "wgrad"]
    assert list(summary["forward"]) == ["tokens=256", "tokens=2048", "all"]
    assert summary["forward"]["tokens=256"] == {"shapes": 2, "baseline": pytest.approx(2.0), "current": 2.0}
    assert summary["forward"]["tokens=2048"] == pytest.approx({"shapes": 1, "baseline": 3.0, "current": 3.0})
    assert summary["forward"]["all"]["shapes"] == 3
    assert summary["forward"]["all"]["baseline"] == pytest.approx(12 ** (1 / 3))
    assert summary["wgrad"]["all"] == {"shapes": 1, "baseline": pytest.approx(0.5), "current": pytest.approx(2.0)}
    text = ab.format_summary(summary, names)
    assert "forward tokens=2048   shapes   1  baseline 3.000  current 3.000" in text.splitlines()[2]


def test_summary_of_a_kind_that_no_variant_completed():
    summary = ab.summarize([row(1, "dgrad", {}, {"current": "boom"})], ["current"])
    assert summary["dgrad"]["all"]["shapes"] == 0 and math.isnan(summary["dgrad"]["all"]["current"])
    assert "current -" in ab.format_summary(summary, ["current"])


def test_row_line_names_each_variant_and_its_problem():
    line = ab.format_row(row(256, "dgrad", {"baseline": 1.25}, {"current": "boom"}), ["baseline", "current"])
    assert line.split()[:4] == ["m", "256", "up", "dgrad"]
    assert "baseline 1.250x" in line and "current -x" in line and line.endswith("current: boom")


def test_no_override_runs_the_function_itself():
    def fn():
        return 1

    assert ab.with_override({}, fn) is fn
