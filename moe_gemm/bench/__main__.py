"""``python -m moe_gemm.bench``: the command line of the benchmark; ``--backward``, ``--decode`` or ``--layer`` picks
another table than the forward one (see each module's docstring)."""

import argparse
import sys

from moe_gemm import _ops
from moe_gemm.bench import backward, decode, forward, layer
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
    tokens.add_argument("--tokens", nargs="+", type=int, help="token counts T (default: the suite's)")
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
        "--layer", action="store_true", help="the whole MoE layer vs transformers and Liger, and the routing kernel"
    )
    parser.add_argument(
        "--configs", nargs="+", choices=list(layer_configs["configs"]), metavar="NAME",
        help=f"--layer: these configs of bench/layer_configs.json (default: all; {' '.join(layer_configs['configs'])})",
    )  # fmt: skip
    parser.add_argument(
        "--liger-autotune", action="store_true",
        help="--layer: let Liger's fused MoE autotune (minutes per shape) rather than set LIGER_FUSED_MOE_AUTOTUNE=0",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.layer and (args.configs or args.liger_autotune):
        parser.error("--configs and --liger-autotune go with --layer")
    if args.tokens is None:
        args.tokens = list(QUICK_TOKENS if args.quick else suite["tokens"])
    return args


def mode_of(args: argparse.Namespace):
    """The module of the table that the arguments ask for."""
    return layer if args.layer else decode if args.decode else backward if args.backward else forward


def main(argv: list[str] | None = None) -> int:
    suite = load_suite()
    args = parse_args(argv, suite)
    reason = _ops.kernels_unavailable_reason()
    if reason is not None:
        print(f"moe_gemm.bench needs a CUDA GPU and the built moe_gemm kernels: {reason}", file=sys.stderr)
        return 2
    return mode_of(args).run(args, suite)


if __name__ == "__main__":
    sys.exit(main())
