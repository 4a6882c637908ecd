"""Overrides of the grouped GEMM's plan, for tests and A/B measurements.

Every call of the CUDA kernel is planned from host-known shapes (``csrc/moe_gemm.cpp``): a tile configuration,
a split-K factor and a tile schedule. :func:`plan_override` forces some or all of them for the duration of a
``with`` block::

    from moe_gemm.testing import PlanOverride, plan_override

    with plan_override(tile_config="16x128s", split_k=1):
        y = moe_gemm.grouped_forward(x, weight, m_sizes)

The override is process-wide: every thread sees it, autograd's backward threads included. Blocks nest; the
inner override replaces the outer one as a whole (fields it does not set take their defaults, the heuristics),
and the outer one is back when the inner block ends, by an exception too. Because the override is process-wide,
blocks must nest across threads too: they must end in the reverse order of their start. A block that ends while a
later one is still open raises RuntimeError (after removing its own override, so the open ones stay in effect).
Without the CUDA extension the arguments are still checked and the block changes nothing.

The override reaches the forward and data-gradient GEMMs (``grouped_mm``) and the gathering forward
(``grouped_mm_gather``, which refuses a configuration outside :data:`GATHER_TILE_CONFIGS`); the weight gradient has
one configuration and ignores it. :func:`resolved_plan` says what a call of given sizes would run with now.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
from collections.abc import Iterator
from types import ModuleType

# The names of the C++ table (csrc/moe_tile_configs.h), "auto" first: what is accepted without the extension.
# tests/test_testing.py checks that the two agree.
TILE_CONFIGS: tuple[str, ...] = ("auto", "128x256", "128x128", "128x256c2x1", "128x256c1x2", "16x128s", "32x128s")
# The configurations with a split-K kernel (the split_k column of the C++ table): only these take split_k > 1.
# tests/test_testing.py checks this list against the table too.
SPLIT_K_TILE_CONFIGS: tuple[str, ...] = ("128x128", "16x128s", "32x128s")
# The configurations with a kernel that gathers A's rows (the gather_a column): grouped_mm_gather runs only these,
# and refuses an override that names another. tests/test_testing.py checks this list against the table too.
GATHER_TILE_CONFIGS: tuple[str, ...] = ("128x256", "128x128")
# The configurations with gated-epilogue kernels (the gated column): grouped_mm_gated fuses the activation only
# with these. tests/test_testing.py checks this list against the table too.
GATED_TILE_CONFIGS: tuple[str, ...] = ("128x256",)


def _extension() -> ModuleType | None:
    """``moe_gemm._C`` when it is built and loads, else None."""
    try:
        return importlib.import_module("moe_gemm._C")
    except ImportError:
        return None


def tile_configs() -> tuple[str, ...]:
    """The tile configurations the kernel has, ``"auto"`` first: from the extension, else :data:`TILE_CONFIGS`."""
    extension = _extension()
    if extension is None or not hasattr(extension, "tile_config_names"):
        return TILE_CONFIGS
    return ("auto", *extension.tile_config_names())


@dataclasses.dataclass(frozen=True)
class PlanOverride:
    """What to force instead of the heuristics. The defaults leave everything to them.

    tile_config: ``"auto"`` or one of :func:`tile_configs`.
    split_k: 0 for the heuristic, 1 never to split, n for n splits of each tile's K loop (clamped to its k-blocks
        and to 2^30 work units). n > 1 needs ``tile_config`` "auto" (the heuristic's configuration splits if it
        has a split-K kernel) or one of :data:`SPLIT_K_TILE_CONFIGS`; any other configuration is refused.
    dynamic_schedule: None for the heuristic, True for tiles handed out from a counter, False for static striding.
    """

    tile_config: str = "auto"
    split_k: int = 0
    dynamic_schedule: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tile_config, str) or self.tile_config not in tile_configs():
            raise ValueError(f"tile_config must be one of {', '.join(tile_configs())}; got {self.tile_config!r}")
        if isinstance(self.split_k, bool) or not isinstance(self.split_k, int) or self.split_k < 0:
            raise ValueError(f"split_k must be an int >= 0 (0: the heuristic, 1: no split); got {self.split_k!r}")
        if self.split_k > 1 and self.tile_config != "auto" and self.tile_config not in SPLIT_K_TILE_CONFIGS:
            raise ValueError(f"tile_config {self.tile_config!r} has no split-K kernel: split_k must be 0 or 1 "
                             f"(split-K configurations: {', '.join(SPLIT_K_TILE_CONFIGS)}); got {self.split_k}")
        if self.dynamic_schedule is not None and not isinstance(self.dynamic_schedule, bool):
            raise ValueError(f"dynamic_schedule must be None, True or False; got {self.dynamic_schedule!r}")


_DEFAULT = PlanOverride()
_lock = threading.Lock()
_current = _DEFAULT
# The open blocks' entries, oldest first, under _lock: (a token of the block, its override). The top is in effect.
_stack: list[tuple[object, PlanOverride]] = []


def current_plan_override() -> PlanOverride:
    """The override in effect (the default one outside any :func:`plan_override` block)."""
    return _current


def _apply(override: PlanOverride) -> None:
    """Makes `override` the one in effect, in the extension too. Call with the lock held."""
    global _current
    extension = _extension()
    if extension is not None:
        if not hasattr(extension, "set_plan_override"):
            raise RuntimeError("moe_gemm._C predates plan overrides: rebuild the extension")
        dynamic = -1 if override.dynamic_schedule is None else int(override.dynamic_schedule)
        extension.set_plan_override(override.tile_config, override.split_k, dynamic)
    _current = override


@contextlib.contextmanager
def plan_override(override: PlanOverride | None = None, **fields) -> Iterator[PlanOverride]:
    """Forces the plan of every grouped GEMM call (forward and data gradient; the weight gradient ignores it)
    in the block: ``override``, with ``fields`` replaced (or a ``PlanOverride(**fields)``). Yields the override
    in effect. Raises ValueError for an unknown configuration name or an invalid value, before changing
    anything; RuntimeError at the end of a block that ends before one started later (blocks are process-wide
    and must end in the reverse order of their start, across threads too)."""
    if override is None:
        override = PlanOverride(**fields)
    elif fields:
        override = dataclasses.replace(override, **fields)
    elif not isinstance(override, PlanOverride):
        raise TypeError(f"override must be a PlanOverride; got {type(override).__name__}")
    token = object()
    with _lock:
        _apply(override)
        _stack.append((token, override))
    try:
        yield override
    finally:
        with _lock:
            was_top = _stack[-1][0] is token
            _stack[:] = [entry for entry in _stack if entry[0] is not token]
            _apply(_stack[-1][1] if _stack else _DEFAULT)
        if not was_top:
            raise RuntimeError(
                "plan_override blocks ended out of order: the override is process-wide, so blocks (in all "
                "threads) must nest, ending in the reverse order of their start; this block ended while one started "
                "after it was still open (that one stays in effect)")


def resolved_plan(M: int, N: int, K: int, E: int, gather: bool = False) -> tuple[str, int, bool]:
    """The plan a ``grouped_mm`` call with x [M, K], weight [E, N, K] (or [E, K, N]) would run with now, on the
    current CUDA device and under the current override: ``(tile_config, split_k, dynamic_schedule)``; with
    ``gather``, that of a ``grouped_mm_gather`` call of M gathered rows. ``("auto", 1, False)`` when there is
    nothing to multiply. Needs the CUDA extension (RuntimeError without)."""
    extension = _extension()
    if extension is None or not hasattr(extension, "plan_grouped_gemm"):
        raise RuntimeError("resolved_plan needs the CUDA extension moe_gemm._C (built, and recent enough)")
    sizes = (int(M), int(N), int(K), int(E))
    tile_config, split_k, dynamic_schedule = extension.plan_grouped_gemm(*sizes, True) if gather else (
        extension.plan_grouped_gemm(*sizes))
    return tile_config, split_k, bool(dynamic_schedule)


def resolved_gated_plan(
    M: int, N: int, K: int, E: int, concatenated: bool, gather: bool = False
) -> tuple[str, bool]:
    """``(tile_config, fused)`` of a ``grouped_mm_gated`` call with x [M, K] (with ``gather``, M gathered rows) and a
    weight of N = 2I gate and up rows, now and under the current override: ``fused`` when the activation runs in the
    GEMM's epilogue (a configuration of :data:`GATED_TILE_CONFIGS`), else the GEMM runs ``tile_config`` and the
    separate activation kernel follows. ``("auto", False)`` when there is nothing to multiply. Needs the CUDA
    extension (RuntimeError without)."""
    extension = _extension()
    if extension is None or not hasattr(extension, "plan_gated"):
        raise RuntimeError("resolved_gated_plan needs the CUDA extension moe_gemm._C (built, and recent enough)")
    tile_config, fused = extension.plan_gated(int(M), int(N), int(K), int(E), bool(concatenated), bool(gather))
    return tile_config, bool(fused)
