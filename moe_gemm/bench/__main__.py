"""``python -m moe_gemm.bench``: the command line of the benchmark; ``--backward``, ``--decode``, ``--fp8``, ``--layer``
or ``--ep`` picks another table than the forward one (see each module's docstring)."""

import argparse
import sys

from moe_gemm import _ops
from moe_gemm.bench import backward, decode, ep, forward, fp8, layer
from moe_gemm.bench.suite import GEMMS, QUICK_TOKENS, load_suite


def parse_args(argv: list[str] | None = None, suite: dict | None = None) -> argparse.Namespace:
    suite = suite or load_suite()
    layer_configs = layer.load_layer_configs()
    parser = argparse.ArgumentParser(
        prog="python -m moe_gemm.bench",
        description="Time moe_gemm against torch._grouped_mm and a per-expert loop on real MoE expert GEMMs.",
    )
    parser.add_argument("--models", nargs="+", choices=list(suite["models"]), default=list(suite["models"]))
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--tokens", nargs="+", type=int, help="token counts T (default: the suite's; with --ep, per rank, default "
        f"{' '.join(map(str, ep.TRANSPORT_TOKENS))})"
    )
    tokens.add_argument(
        "--quick",
        action="store_true",
        help=f"only T in {list(QUICK_TOKENS)}; with --layer, the configs {' '.join(layer.QUICK_CONFIGS)} at T / "
        f"{layer.QUICK_TOKEN_DIVISOR}",
    )
    parser.add_argument("--gemms", nargs="+", choices=GEMMS, default=list(GEMMS))
    parser.add_argument("--routing", choices=("uniform", "skewed"), default="uniform")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default=suite.get("dtype", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the rows, ceilings and summary as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speedup per shape (needs matplotlib)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--backward", action="store_true", help="time wgrad, dgrad and forward+backward instead (bench/backward.py)"
    )
    mode.add_argument("--decode", action="store_true", help="the decode table, 1 to 64 tokens (bench/decode.py)")
    mode.add_argument(
        "--fp8", action="store_true",
        help="FP8 GEMMs (rowwise; blockwise beside) vs torch._scaled_grouped_mm rowwise, moe_gemm bf16 (bench/fp8.py)",
    )  # fmt: skip
    mode.add_argument(
        "--layer", action="store_true", help="the whole MoE layer vs transformers and Liger, and the routing kernel"
    )
    mode.add_argument(
        "--ep", action="store_true",
        help="expert parallelism, under torchrun: the transports' GB/s and the layer's TFLOP/s per GPU (bench/ep.py)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="+", choices=list(layer_configs["configs"]), metavar="NAME",
        help=f"--layer, --ep: these configs of bench/layer_configs.json ({' '.join(layer_configs['configs'])}; "
        f"default: all with --layer, {' '.join(ep.CONFIGS)} with --ep)",
    )  # fmt: skip
    parser.add_argument(
        "--ep-layer-tokens", type=int, metavar="T",
        help=f"--ep: tokens per rank of the layer table (default {ep.LAYER_TOKENS}, {ep.QUICK_LAYER_TOKENS} with "
        "--quick)",
    )  # fmt: skip
    parser.add_argument(
        "--liger-autotune", action="store_true",
        help="--layer: let Liger's fused MoE autotune (minutes per shape) rather than set LIGER_FUSED_MOE_AUTOTUNE=0",
    )  # fmt: skip
    parser.add_argument(
        "--router-dtype", choices=layer.ROUTER_DTYPES, default="float32",
        help="--layer: the router Linear in float32 (default) or in the run's dtype, as SonicMoE's layer runs it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.liger_autotune and not args.layer:
        parser.error("--liger-autotune goes with --layer")
    if args.router_dtype != "float32" and not args.layer:
        parser.error("--router-dtype goes with --layer")
    if args.configs and not (args.layer or args.ep):
        parser.error("--configs goes with --layer or --ep")
    if args.ep_layer_tokens is not None and not args.ep:
        parser.error("--ep-layer-tokens goes with --ep")
    if args.tokens is None and not args.ep:
        args.tokens = list(QUICK_TOKENS if args.quick else suite["tokens"])
    return args


def mode_of(args: argparse.Namespace):
    """The module of the table that the arguments ask for."""
    modes = {"ep": ep, "layer": layer, "decode": decode, "backward": backward, "fp8": fp8}
    return next((module for flag, module in modes.items() if getattr(args, flag)), forward)


def main(argv: list[str] | None = None) -> int:
    suite = load_suite()
    args = parse_args(argv, suite)
    if args.ep:  # runs on CPU too (gloo), as a smoke test of the harness
        return ep.run(args)
    reason = _ops.kernels_unavailable_reason()
    if reason is not None:
        print(f"moe_gemm.bench needs a CUDA GPU and the built moe_gemm kernels: {reason}", file=sys.stderr)
        return 2
    return mode_of(args).run(args, suite)


if __name__ == "__main__":
    sys.exit(main())
