"""``python -m moe_gemm``: print the one-line build info."""

from moe_gemm import build_info

print(build_info())
