"""Benchmark of the whole MoE layer and of the routing kernel: ``python -m moe_gemm.bench --layer``.

Run on a Hopper GPU with the kernels built::

    python -m moe_gemm.bench --layer [--configs NAME ...] [--quick] [--liger-autotune] [--router-dtype model]
        [--json PATH]

The configs are those of ``layer_configs.json`` beside this module (``--quick``: ``QUICK_CONFIGS`` at T /
``QUICK_TOKEN_DIVISOR``). Each config is T tokens, hidden size d, expert intermediate size n, E experts, top_k K,
SwiGLU experts with the weights in Hugging Face's layout, ``gate_up_proj [E, 2n, d]`` ([gate; up] halves) and
``down_proj [E, d, n]``, a router weight ``[E, d]``, all in the run's dtype, random at scale 0.02, and hidden
states ``[T, d]``.

What is timed is the whole layer: the router ``Linear`` in float32 (``F.linear(h.float(), router.float())``; with
``--router-dtype model``, in the run's dtype, as SonicMoE's layer runs it), the softmax top-k renormalised, and the
experts. The implementations share the very same parameter tensors:

- ``moe_gemm``: ``moe_gemm.route(logits, K, scoring="softmax", renormalize=True)`` and ``moe_gemm.experts_forward``;
- ``moe_gemm_unfused``: the same with ``experts_forward(..., fused=False)``: the composed ops under autograd, the
  A/B of the fused layer;
- ``grouped_mm``: Qwen3-MoE's routing in torch ops (softmax in float32, top-k, renormalised, cast to the dtype of
  the hidden states), then transformers' ``Qwen3MoeExperts`` with ``experts_implementation="grouped_mm"``;
- ``liger``: the same routing, then Liger-Kernel's Triton fused MoE (``LigerFusedMoEFunction``, same weight layout),
  when ``liger_kernel`` imports. Its autotuning takes minutes per shape: ``LIGER_FUSED_MOE_AUTOTUNE=0`` is set
  before the import unless ``--liger-autotune`` is given (or the variable is already set).

FLOP convention (SonicMoE's): forward ``6*T*K*d*n``, backward ``12*T*K*d*n``, forward+backward ``18*T*K*d*n``,
over the time of the whole layer. The forward is timed with autograd recording (the forward of training); a
forward+backward step sets the gradients to None, runs the forward and the backward of a fixed random output
gradient, giving gradients to the hidden states, the router weight and both expert weights; the backward's time is
the step's minus the forward's. Peak memory: ``torch.cuda.max_memory_allocated`` during one step minus what was
allocated before it (weights, inputs, gradients set to None), so the weight gradients count. Before timing, each
implementation's forward output is compared with ``grouped_mm``'s (relative Frobenius error <= ``MAX_REL_ERROR``);
one that fails is not timed, one that runs out of memory is marked OOM, and the run goes on. Times are medians with
L2 flushed (``timing.bench_ms``).

Two small sections follow. Decode sizes: ``DECODE_CONFIG``'s shape at T in ``DECODE_TOKENS``, timed in ms against
transformers' ``grouped_mm`` and ``batched_mm`` (which transformers picks for small batches); the ``--decode``
table covers single GEMMs, not the layer. Routing: DeepSeek-V3's router (256 experts, 8 groups, top-4 groups,
top-8, bias, renormalised, scaled by 2.5) on float32 logits, ``torch.ops.moe_gemm.route`` (the fused kernel)
against ``route_torch_ops`` (PyTorch ops), ids checked equal.
"""

import argparse
import functools
import importlib.metadata
import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

import moe_gemm
from moe_gemm.bench import report
from moe_gemm.bench.suite import MAX_REL_ERROR, WEIGHT_SCALE
from moe_gemm.bench.timing import bench_ms
from moe_gemm.routing import route_torch_ops

CONFIGS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layer_configs.json")
# The coarsest and the finest experts of SonicMoE's configs, at an eighth of their tokens.
QUICK_CONFIGS = ("sonic-1", "sonic-4")
QUICK_TOKEN_DIVISOR = 8
REFERENCE = "grouped_mm"
TRANSFORMERS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
DECODE_CONFIG = "qwen3-30b-a3b"
DECODE_TOKENS = (1, 8, 32)
ROUTING_TOKENS = (1, 8, 32, 128, 512, 2048, 4096)
# DeepSeek-V3's router, as moe_gemm.route arguments.
DEEPSEEK_V3_ROUTER = {"experts": 256, "top_k": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}
# do_bench runs a function rep_ms / (its time) times for the median. At 32k tokens a forward+backward takes 20-70 ms
# with moe_gemm (18*T*K*d*n at 150-450 TFLOP/s) and up to about 150 ms with transformers or untuned Liger: 600 ms gives
# these at least four runs and moe_gemm ten or more, and the whole run a few minutes.
WARMUP_MS, REP_MS = 50, 600
# Who published the figures of layer_configs.json's "published_h100" (keys "<system>_<fwd|bwd|fwd_bwd>").
PUBLISHED_SYSTEMS = {"sonicmoe": "SonicMoE", "liger_fused_moe": "Liger fused MoE"}
METRICS = ("fwd", "bwd", "fwd_bwd")

TABLE = ("config", "T", "d", "n", "E", "K", "impl", "fwd_tflops", "bwd_tflops", "fwd_bwd_tflops", "peak_gb",
         "x_grouped_mm_fwd", "x_grouped_mm_fwd_bwd", "sonicmoe_fwd", "sonicmoe_bwd", "rel_error", "check")  # fmt: skip
DECODE_TABLE = ("config", "T", "impl", "fwd_ms", "fwd_bwd_ms", "x_grouped_mm_fwd", "x_grouped_mm_fwd_bwd",
                "x_transformers_fwd", "x_transformers_fwd_bwd", "rel_error", "check")  # fmt: skip
ROUTING_TABLE = ("tokens", "kernel_ms", "torch_ms", "speedup", "check")
LEGEND = (
    "TFLOP/s over the whole layer's time (router, routing, experts): fwd 6*T*K*d*n, bwd 12*T*K*d*n (time of fwd+bwd "
    "minus fwd), fwd+bwd 18*T*K*d*n; peak_GB: allocated above the weights and inputs during one fwd+bwd (weight "
    "gradients included); x_gmm: grouped_mm's time / the row's; sonic_*: SonicMoE's published TFLOP/s (H100)"
)


def layer_timer(fn: Callable[[], object]) -> float:
    """``bench_ms`` with the repetitions of this benchmark."""
    return bench_ms(fn, warmup_ms=WARMUP_MS, rep_ms=REP_MS)


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: configs, FLOPs, rows, summary.
# ---------------------------------------------------------------------------------------------------------------


def load_layer_configs(path: str = CONFIGS_PATH) -> dict:
    """``{"configs": {name: {T, d, n, E, K}}, "published_h100": {name: {"<system>_<metric>": TFLOP/s}}, ...}``."""
    with open(path) as configs_file:
        return json.load(configs_file)


def selected_configs(layer_configs: dict, names: list[str] | None, quick: bool) -> dict[str, dict]:
    """The configs to run: ``names`` (all when None, ``QUICK_CONFIGS`` with ``quick``); ``quick`` also divides T by
    ``QUICK_TOKEN_DIVISOR``."""
    names = names or (QUICK_CONFIGS if quick else list(layer_configs["configs"]))
    divisor = QUICK_TOKEN_DIVISOR if quick else 1
    return {name: layer_configs["configs"][name] | {"T": layer_configs["configs"][name]["T"] // divisor}
            for name in names}  # fmt: skip


def layer_flops(config: dict) -> dict[str, float]:
    """FLOPs of the SwiGLU experts of ``config`` per metric: fwd ``6TKdn``, bwd ``12TKdn``, fwd_bwd ``18TKdn``."""
    pair_flops = config["T"] * config["K"] * config["d"] * config["n"]
    return {"fwd": 6.0 * pair_flops, "bwd": 12.0 * pair_flops, "fwd_bwd": 18.0 * pair_flops}


def add_rates(row: dict, config: dict) -> dict:
    """``bwd_ms`` (fwd+bwd minus fwd) and TFLOP/s per metric from the row's ``fwd_ms`` and ``fwd_bwd_ms``; a backward
    that comes out not positive (noise on a tiny layer) gets no rate."""
    if row.get("fwd_ms") and row.get("fwd_bwd_ms"):
        row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
    for metric, flops in layer_flops(config).items():
        ms = row.get(f"{metric}_ms")
        if ms is not None and ms > 0:
            row[f"{metric}_tflops"] = flops / (ms * 1e9)  # 1 TFLOP/s does 1e9 FLOPs per ms
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """On the rows of one config: ``x_grouped_mm_<fwd|fwd_bwd>`` = grouped_mm's time / the row's, and
    ``x_transformers_<fwd|fwd_bwd>`` = the fastest of transformers' implementations' time / the row's."""
    by_impl = {row["impl"]: row for row in rows}
    for mode in ("fwd", "fwd_bwd"):
        key = f"{mode}_ms"
        grouped_mm_ms = by_impl.get(REFERENCE, {}).get(key)
        theirs = [by_impl[impl][key] for impl in TRANSFORMERS_IMPLEMENTATIONS if by_impl.get(impl, {}).get(key)]
        for row in rows:
            if row["impl"] in TRANSFORMERS_IMPLEMENTATIONS or not row.get(key):
                continue
            if grouped_mm_ms:
                row[f"x_grouped_mm_{mode}"] = grouped_mm_ms / row[key]
            if theirs:
                row[f"x_transformers_{mode}"] = min(theirs) / row[key]
    return rows


def published_metric(key: str) -> tuple[str, str]:
    """``(who, metric)`` of a key of ``published_h100``: "sonicmoe_bwd" -> ("SonicMoE", "bwd")."""
    for metric in ("fwd_bwd", "bwd", "fwd"):  # longest suffix first: "_fwd_bwd" also ends in "_bwd"
        system = key.removesuffix(f"_{metric}")
        if system != key:
            return PUBLISHED_SYSTEMS.get(system, system), metric
    raise ValueError(f"published figure {key!r}: expected a name ending in _fwd, _bwd or _fwd_bwd")


def summarize_config(rows: list[dict], published: dict) -> dict:
    """For one config's rows: moe_gemm's speedup over each other implementation per metric (their time / moe_gemm's,
    from TFLOP/s) and its memory (moe_gemm's peak / theirs), and moe_gemm's rate over each published figure."""
    by_impl = {row["impl"]: row for row in rows}
    ours = by_impl.get("moe_gemm", {})
    versus = {}
    for impl, row in by_impl.items():
        if impl == "moe_gemm":
            continue
        ratios = {metric: _ratio(ours.get(f"{metric}_tflops"), row.get(f"{metric}_tflops")) for metric in METRICS}
        ratios["peak"] = _ratio(ours.get("peak_gb"), row.get("peak_gb"))
        versus[impl] = ratios
    of_published = {key: _ratio(ours.get(f"{published_metric(key)[1]}_tflops"), value)
                    for key, value in published.items()}  # fmt: skip
    return {"moe_gemm_vs": versus, "published_h100": published, "moe_gemm_of_published": of_published}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def summarize(rows: list[dict], decode_rows: list[dict], routing_rows: list[dict], published: dict) -> dict:
    """Per config (``summarize_config``); geometric means over the configs of moe_gemm's speedup over each other
    implementation; over the decode rows, of moe_gemm's speedup over the faster of transformers' implementations;
    and of the routing kernel's speedup."""
    configs = {}
    for row in rows:
        configs.setdefault(row["config"], []).append(row)
    per_config = {name: summarize_config(group, published.get(name, {})) for name, group in configs.items()}
    others = dict.fromkeys(impl for summary in per_config.values() for impl in summary["moe_gemm_vs"])
    geomeans = {
        impl: {metric: report.geomean(s["moe_gemm_vs"].get(impl, {}).get(metric) for s in per_config.values())
               for metric in ("fwd", "fwd_bwd")}
        for impl in others
    }  # fmt: skip
    ours_decode = [row for row in decode_rows if row["impl"] == "moe_gemm"]
    decode = {mode: report.geomean(row.get(f"x_transformers_{mode}") for row in ours_decode)
              for mode in ("fwd", "fwd_bwd")}  # fmt: skip
    return {
        "configs": per_config,
        "moe_gemm_vs_geomean": geomeans,
        "decode_moe_gemm_vs_transformers": decode,
        "routing_speedup": report.geomean(row.get("speedup") for row in routing_rows),
    }


def _times(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def format_summary(summary: dict) -> str:
    lines = ["per config, moe_gemm against the others (their time / moe_gemm's: fwd, fwd+bwd; peak memory moe_gemm / "
             "theirs) and the published figures (moe_gemm's TFLOP/s / theirs):"]  # fmt: skip
    for name, stats in summary["configs"].items():
        parts = [f"vs {impl} {_times(v['fwd'])} / {_times(v['fwd_bwd'])}, memory {_times(v['peak'])}"
                 for impl, v in stats["moe_gemm_vs"].items()]  # fmt: skip
        figures = {}  # who -> [(metric, TFLOP/s, moe_gemm's rate / it)]
        for key, value in stats["published_h100"].items():
            who, metric = published_metric(key)
            figures.setdefault(who, []).append((metric.replace("_", "+"), value, stats["moe_gemm_of_published"][key]))
        for who, entries in figures.items():
            values = ", ".join(f"{metric} {value:.0f}" for metric, value, _ in entries)
            parts.append(f"{who} (H100, published) {values}: moe_gemm at {', '.join(_times(r) for *_, r in entries)}")
        lines.append(f"  {name:<14} " + "; ".join(parts))
    lines.append("geometric means over the configs, moe_gemm's speedup (fwd, fwd+bwd):")
    for impl, means in summary["moe_gemm_vs_geomean"].items():
        lines.append(f"  vs {impl:<16} {_times(means['fwd'])} / {_times(means['fwd_bwd'])}")
    decode = summary["decode_moe_gemm_vs_transformers"]
    lines.append(f"decode sizes ({DECODE_CONFIG}, T in {', '.join(map(str, DECODE_TOKENS))}), moe_gemm vs the faster "
                 f"of {' and '.join(TRANSFORMERS_IMPLEMENTATIONS)}: fwd {_times(decode['fwd'])}, "
                 f"fwd+bwd {_times(decode['fwd_bwd'])}")  # fmt: skip
    lines.append(f"routing kernel vs PyTorch ops (DeepSeek-V3 router): {_times(summary['routing_speedup'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The layer and its implementations.
# ---------------------------------------------------------------------------------------------------------------


class Layer(NamedTuple):
    """The parameters that every implementation shares: the router weight ``[E, d]``, and a transformers experts
    module holding ``gate_up_proj [E, 2n, d]`` and ``down_proj [E, d, n]``."""

    router: torch.nn.Parameter
    experts: torch.nn.Module
    top_k: int

    def parameters(self) -> tuple[torch.nn.Parameter, ...]:
        return self.router, self.experts.gate_up_proj, self.experts.down_proj


def make_layer(config: dict, device: torch.device | str, dtype: torch.dtype, generator=None) -> Layer:
    """Random parameters of ``config``'s layer (scaled like trained ones) in a transformers ``Qwen3MoeExperts``."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    hf_config = Qwen3MoeConfig(
        num_experts=config["E"],
        num_experts_per_tok=config["K"],
        hidden_size=config["d"],
        moe_intermediate_size=config["n"],
        hidden_act="silu",
    )
    hf_config._experts_implementation = REFERENCE
    with torch.device("meta"):
        experts = Qwen3MoeExperts(hf_config)
    # Cast on meta, then allocate: only the run's dtype ever exists on the device.
    experts = experts.to(dtype).to_empty(device=device)
    router = torch.nn.Parameter(torch.empty(config["E"], config["d"], device=device, dtype=dtype))
    with torch.no_grad():
        for parameter in (router, *experts.parameters()):
            # Drawn in chunks of experts: a float32 copy of DeepSeek-V3's 22 GB of weights would not fit beside them.
            for chunk in parameter.split(8):
                chunk.copy_(torch.randn(chunk.shape, device=device, generator=generator).mul_(WEIGHT_SCALE))
    return Layer(router, experts, config["K"])


# The router's precision (``--router-dtype``): the float32 ``Linear`` of the anchors' convention (on CUDA cores: at
# sonic-4, 32768 x 4096 x 256, it is most of what the layer spends outside its experts), or the run's dtype on the
# tensor cores, as SonicMoE's layer computes its logits (``F.linear(x, router_w)``), rounded to float32 for the
# routing that follows.
ROUTER_DTYPES = ("float32", "model")


def router_logits(hidden: torch.Tensor, router: torch.Tensor, router_dtype: str = "float32") -> torch.Tensor:
    """``[T, E]`` float32 logits: the router ``Linear`` in float32 (as ``moe_gemm.MoE`` and DeepSeek-V3's gate run
    it), or in the dtype of ``hidden`` (``router_dtype="model"``)."""
    if router_dtype == "model":
        return F.linear(hidden, router).float()
    return F.linear(hidden.float(), router.float())


def route_like_transformers(logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE's routing after the router (transformers' ``Qwen3MoeTopKRouter``): softmax in float32, top-k,
    renormalised, the weights cast to the model dtype; ``(weights [T, K], ids int64 [T, K])``."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def load_liger(autotune: bool) -> tuple[type | None, str]:
    """Liger-Kernel's ``LigerFusedMoEFunction`` (None when it does not import) and a line that says which."""
    if autotune:
        os.environ["LIGER_FUSED_MOE_AUTOTUNE"] = "1"
    else:
        # Read once, when liger_kernel is imported: each kernel then runs one fixed config instead of being tuned.
        os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as error:  # not installed, or no triton or GPU for it: the table goes on without it
        return None, f"liger not run ({report.error_line(error)})"
    # Parsed as liger_kernel/ops/fused_moe_kernels.py does.
    tuned = os.environ["LIGER_FUSED_MOE_AUTOTUNE"].lower() not in ("0", "false", "no")
    setting = f"LIGER_FUSED_MOE_AUTOTUNE={os.environ['LIGER_FUSED_MOE_AUTOTUNE']}"
    autotuning = "autotuned" if tuned else "not autotuned"
    return LigerFusedMoEFunction, f"liger-kernel {importlib.metadata.version('liger-kernel')} ({autotuning}, {setting})"


def implementation_names(liger_available: bool) -> tuple[str, ...]:
    """The implementations of the main table, in the order of the table."""
    names = ["moe_gemm", "moe_gemm_unfused", REFERENCE]
    if liger_available:
        names.append("liger")
    return tuple(names)


def layer_function(
    implementation: str, layer: Layer, liger: type | None = None, router_dtype: str = "float32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(hidden [T, d]) -> [T, d]``: the whole layer (router, routing, experts) of one implementation on ``layer``'s
    parameters. ``liger`` is ``LigerFusedMoEFunction`` for ``"liger"``; ``router_dtype`` one of ``ROUTER_DTYPES``,
    the same for every implementation."""
    experts, top_k = layer.experts, layer.top_k
    if implementation in ("moe_gemm", "moe_gemm_unfused"):
        options = {"fused": False} if implementation == "moe_gemm_unfused" else {}

        def moe_gemm_layer(hidden):
            logits = router_logits(hidden, layer.router, router_dtype)
            weights, ids = moe_gemm.route(logits, top_k, scoring="softmax", renormalize=True)
            return moe_gemm.experts_forward(hidden, ids, weights, experts.gate_up_proj, experts.down_proj, **options)

        return moe_gemm_layer
    if implementation == "liger":

        def liger_layer(hidden):
            weights, ids = route_like_transformers(router_logits(hidden, layer.router, router_dtype), top_k, hidden.dtype)
            # Liger's routing kernels read the ids as int32.
            return liger.apply(hidden, experts.gate_up_proj, experts.down_proj, ids.to(torch.int32), weights)

        return liger_layer
    if implementation not in TRANSFORMERS_IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}")

    def transformers_layer(hidden):
        weights, ids = route_like_transformers(router_logits(hidden, layer.router, router_dtype), top_k, hidden.dtype)
        experts.config._experts_implementation = implementation
        return experts(hidden, ids, weights)

    return transformers_layer


# ---------------------------------------------------------------------------------------------------------------
# Measurements (GPU in the benchmark; the CPU tests run them with a trivial timer on tiny shapes).
# ---------------------------------------------------------------------------------------------------------------


class Setup(NamedTuple):
    """What every config of a table is measured with."""

    implementations: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    generator: torch.Generator | None = None
    timer: Callable[[Callable[[], object]], float] = layer_timer
    liger: type | None = None
    router_dtype: str = "float32"


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref_norm = torch.linalg.vector_norm(ref.float()).item()
    return torch.linalg.vector_norm(out.float() - ref.float()).item() / max(ref_norm, 1e-30)


def peak_gb(step: Callable[[], object], tensors: tuple[torch.Tensor, ...], device: torch.device) -> float | None:
    """GB (1e9 bytes) allocated at the peak of one ``step()`` above what was allocated before it, the gradients of
    ``tensors`` set to None first so that they count; None off CUDA."""
    if device.type != "cuda":
        return None
    for tensor in tensors:
        tensor.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e9


def measure_implementation(
    row: dict, forward: Callable, hidden: torch.Tensor, grad_out: torch.Tensor, layer: Layer,
    reference: torch.Tensor | None, setup: Setup,
) -> torch.Tensor:
    """Fill ``row``: the check of the forward output against ``reference`` (none for the reference itself), then,
    when it passes, the forward's time, the forward+backward step's time and its peak memory. Returns the output."""
    out = forward(hidden).detach()  # the forward that is timed, its autograd graph dropped with the attached output
    if reference is not None:
        row["rel_error"] = _relative_error(out, reference)
        if not row["rel_error"] <= MAX_REL_ERROR:  # NaN fails too
            row["check"], row["problem"] = "FAIL", f"differs from {REFERENCE}: rel. error {row['rel_error']:.2e}"
            return out
    differentiable = (hidden, *layer.parameters())

    def step():
        for tensor in differentiable:
            tensor.grad = None
        forward(hidden).backward(grad_out)

    row["fwd_ms"] = setup.timer(lambda: forward(hidden))
    row["fwd_bwd_ms"] = setup.timer(step)
    row["peak_gb"] = peak_gb(step, differentiable, setup.device)
    return out


def measure_case(name: str, config: dict, published: dict, setup: Setup) -> list[dict]:
    """Check and time each implementation of ``setup`` on one config: one row per implementation, in their order;
    ``published`` (SonicMoE's and others' figures for this config) goes on moe_gemm's row."""
    layer = make_layer(config, setup.device, setup.dtype, setup.generator)
    shape = (config["T"], config["d"])
    hidden = torch.randn(shape, device=setup.device, generator=setup.generator).to(setup.dtype).requires_grad_()
    grad_out = torch.randn(shape, device=setup.device, generator=setup.generator).to(setup.dtype)
    rows = {impl: {"config": name, **config, "impl": impl, "check": "ok", "problem": None}
            for impl in setup.implementations}  # fmt: skip
    reference = None
    # The reference first: the others are checked against its output.
    for impl in sorted(setup.implementations, key=lambda impl: impl != REFERENCE):
        row = rows[impl]
        if reference is None and impl != REFERENCE:
            row["check"], row["problem"] = "FAIL", f"not checked: {REFERENCE} gave no output"
            continue
        try:
            out = measure_implementation(row, layer_function(impl, layer, setup.liger, setup.router_dtype), hidden, grad_out, layer,
                                         reference, setup)  # fmt: skip
            if impl == REFERENCE:
                reference = out
            del out
        except torch.cuda.OutOfMemoryError:
            row["check"], row["problem"] = "OOM", f"{impl} ran out of memory"
        except Exception as error:  # one implementation's failure (a kernel error, a Triton compile error) is a row
            row["check"], row["problem"] = "FAIL", f"{impl} failed: {report.error_line(error)}"
        for tensor in (hidden, *layer.parameters()):
            tensor.grad = None
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
        add_rates(row, config)
    if "moe_gemm" in rows:
        rows["moe_gemm"].update(published)
    return add_ratios(list(rows.values()))


def measure_routing(tokens: int, device, generator=None, timer: Callable = bench_ms) -> dict:
    """The fused routing op against ``route_torch_ops`` on DeepSeek-V3's router at ``tokens`` tokens."""
    spec = DEEPSEEK_V3_ROUTER
    logits = torch.randn(tokens, spec["experts"], device=device, generator=generator)
    bias = torch.randn(spec["experts"], device=device, generator=generator) / 10
    options = {
        "scoring": "sigmoid",
        "renormalize": True,
        "n_group": spec["n_group"],
        "topk_group": spec["topk_group"],
        "e_score_correction_bias": bias,
        "routed_scaling_factor": spec["routed_scaling_factor"],
    }
    op_args = (logits, spec["top_k"], *options.values())  # the dict is in the order of the op's arguments

    def kernel():
        return torch.ops.moe_gemm.route(*op_args)

    def torch_ops():
        return route_torch_ops(logits, spec["top_k"], **options)

    (weights, ids), (ref_weights, ref_ids) = kernel(), torch_ops()
    ok = torch.equal(ids, ref_ids) and torch.allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
    row = {"tokens": tokens, "check": "ok" if ok else "FAIL", "kernel_ms": timer(kernel), "torch_ms": timer(torch_ops)}
    row["speedup"] = row["torch_ms"] / row["kernel_ms"]
    return row


def run(args: argparse.Namespace, suite: dict, device: str = "cuda", timer: Callable = layer_timer) -> int:
    """The ``--layer`` benchmark for the arguments of ``python -m moe_gemm.bench`` (configs, quick, liger_autotune,
    dtype, seed, json); exit status 1 when a row fails its check (a row that ran out of memory does not)."""
    import transformers

    if args.plot:
        print(f"--plot {args.plot}: no plot for the layer table")
    layer_configs = load_layer_configs()
    configs = selected_configs(layer_configs, args.configs, args.quick)
    published = layer_configs.get("published_h100", {})
    liger, liger_line = load_liger(args.liger_autotune)
    device = torch.device(device)
    torch.manual_seed(args.seed)
    setup = Setup(implementation_names(liger is not None), getattr(torch, args.dtype), device,
                  torch.Generator(device=device).manual_seed(args.seed), timer, liger, args.router_dtype)  # fmt: skip
    router = "float32" if args.router_dtype == "float32" else f"{args.dtype} (the run's dtype)"
    report.print_preamble(f"layer; transformers {transformers.__version__}; {liger_line}; dtype {args.dtype}, "
                          f"seed {args.seed}; router Linear in {router}, softmax top-k renormalised")  # fmt: skip
    print(f"# {LEGEND}")
    cases = ((name, config, published.get(name, {})) for name, config in configs.items())
    rows = report.measure_table(TABLE, cases, len(configs), functools.partial(measure_case, setup=setup))

    print(f"\ndecode sizes, {DECODE_CONFIG}'s shape, times in ms; x_hf: the faster of "
          f"{' and '.join(TRANSFORMERS_IMPLEMENTATIONS)} / the row's")  # fmt: skip
    decode_setup = setup._replace(
        implementations=(*(impl for impl in setup.implementations if impl.startswith("moe_gemm")),
                         *TRANSFORMERS_IMPLEMENTATIONS)
    )  # fmt: skip
    decode_config = layer_configs["configs"][DECODE_CONFIG]
    decode_cases = ((DECODE_CONFIG, decode_config | {"T": tokens}, {}) for tokens in DECODE_TOKENS)
    decode_measure = functools.partial(measure_case, setup=decode_setup)
    decode_rows = report.measure_table(DECODE_TABLE, decode_cases, len(DECODE_TOKENS), decode_measure)

    print("\nrouting, DeepSeek-V3 router (256 experts, 8 groups, top-4 groups, top-8), float32 logits")
    routing_cases = ((tokens, device, setup.generator) for tokens in ROUTING_TOKENS)
    routing_measure = functools.partial(measure_routing, timer=timer)
    routing_rows = report.measure_table(ROUTING_TABLE, routing_cases, len(ROUTING_TOKENS), routing_measure)
    summary = summarize(rows, decode_rows, routing_rows, published)
    return report.finish(
        args, format_summary(summary), rows, also_checked=[*decode_rows, *routing_rows], mode="layer",
        router_dtype=args.router_dtype,
        transformers=transformers.__version__, liger=liger_line, configs=configs, summary=summary,
        decode_rows=decode_rows, routing_rows=routing_rows,
    )  # fmt: skip
