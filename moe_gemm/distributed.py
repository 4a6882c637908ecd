"""Expert parallelism: ``ExpertParallelExperts`` spreads the ``E`` experts of a layer over the ranks of a process group.

Rank ``r`` of ``W`` holds experts ``[r * E / W, (r + 1) * E / W)`` and the tokens of its own batch. A forward:

1. each rank sorts its ``(token, slot)`` pairs by global expert (``dispatch``: rows of one destination rank are then
   contiguous, in expert order) and drops the pairs whose id lies outside ``[0, E)``;
2. the transport carries the rows to the ranks that hold their experts, with each rank's count per expert;
3. each rank runs its experts on the rows it received, each row once, with weight 1 (``experts_forward``, the
   layer's fastest kernels): the unweighted expert output ``y`` of each row;
4. the transport carries the ``y`` rows back, and the home rank sums each token's rows with its routing weights in
   float32, in slot order (``combine``): what one process's ``experts_forward`` over all ``E`` experts returns for
   these tokens, up to the GEMMs' summation order, and bitwise the same from run to run.

The routing weights are applied at home, so their gradient (``<grad_out[t], y>`` per pair) is computed there too, and
the backward runs the same exchanges in reverse: the gradients of ``y`` go to the experts' ranks, those of the rows
come home and are summed per token in slot order (no atomics). Every rank must backpropagate through the layer's
output when any rank does, as with every collective under autograd.

A transport (``TRANSPORTS``, by name) owns steps 2 and 4: ``dispatch(hidden, top_k_index, flags, local_error,
device)`` returns the rows this rank received, their experts among its own and an ``Exchange``; ``combine(y_rows,
exchange)`` returns each of this rank's pairs' ``y`` in the row order of ``exchange.info``. It shares each rank's
``RankFlags`` before any row moves and calls ``raise_for_other_ranks``. ``AllToAllTransport`` is the portable one.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_gemm import _ops
from moe_gemm.dispatch import DispatchInfo, cached_arange, combine, dispatch, sort_pairs
from moe_gemm.layer import MoEExperts, _check_experts_arguments, _check_module_input, _StackedExperts


class _AllToAll(torch.autograd.Function):
    """``all_to_all_rows`` under autograd; the gradient travels back by the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group, num_rows_out):
        ctx.exchange = (send_splits, recv_splits, group)
        return all_to_all_rows(rows, send_splits, recv_splits, group, num_rows_out)

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits, group = ctx.exchange
        grad_rows = all_to_all_rows(grad_out[: sum(recv_splits)], recv_splits, send_splits, group, sum(send_splits))
        return grad_rows, None, None, None, None


def all_to_all_rows(
    rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group, num_rows_out: int
) -> torch.Tensor:
    """``rows [sum(send_splits), N]``: its first ``send_splits[0]`` rows to rank 0, the next ``send_splits[1]`` to
    rank 1, ...; returns ``[num_rows_out, N]``, the rows from rank 0, then rank 1, ... (``recv_splits[s]`` from rank
    ``s``), and zeros past ``sum(recv_splits)``."""
    received = sum(recv_splits)
    out = rows.new_empty(num_rows_out, rows.shape[1])
    out[received:].zero_()
    # The leading rows of a contiguous tensor are contiguous, as the collective needs its output.
    dist.all_to_all_single(out[:received], rows.contiguous(), recv_splits, send_splits, group=group)
    return out


@dataclass
class RankFlags:
    """What each rank says about its call, exchanged with the counts so that every rank decides alike.

    Attributes:
        rejected: the rank's arguments failed its own checks (it raises that error; the others raise too).
        needs_grad: grad mode is on and its input, routing weights or experts' parameters require gradients.
        grad_enabled: grad mode is on.
    """

    rejected: bool
    needs_grad: bool
    grad_enabled: bool

    def as_list(self) -> list[int]:
        return [int(self.rejected), int(self.needs_grad), int(self.grad_enabled)]


def raise_for_other_ranks(flags: list[RankFlags], local_error: Exception | None, rank: int) -> bool:
    """Raise on every rank if any rank rejected its arguments, or if the ranks disagree on building the backward;
    return whether the exchanges are differentiable (some rank needs gradients).

    A rank that raises alone would leave the others waiting in the next collective: the check that only one rank can
    make (its ``hidden`` has another width, say) becomes everyone's error. The rank that saw it raises its own
    error; the others raise a ``RuntimeError`` naming it.
    """
    rejected = [r for r, f in enumerate(flags) if f.rejected]
    if local_error is not None:
        raise local_error
    if rejected:
        raise RuntimeError(
            f"ExpertParallelExperts: rank(s) {rejected} of the expert-parallel group rejected their arguments (the "
            f"error is raised there); rank {rank} raises too, so that no rank waits in a collective"
        )
    differentiable = any(f.needs_grad for f in flags)
    without_grad = [r for r, f in enumerate(flags) if not f.grad_enabled]
    if differentiable and without_grad:
        needing = [r for r, f in enumerate(flags) if f.needs_grad]
        raise RuntimeError(
            f"ExpertParallelExperts: rank(s) {needing} need gradients but rank(s) {without_grad} run without grad "
            "mode: their backward would wait forever on the others' exchanges. Run every rank of the group in the "
            "same grad mode (torch.no_grad() on all of them, or on none)"
        )
    return differentiable


@dataclass
class Exchange:
    """One forward's exchange, kept for its ``combine`` (and, through autograd, the backward).

    Attributes:
        info: the home rank's ``DispatchInfo`` over its own pairs; ``combine`` returns rows in its order.
        send_splits: rows sent to each rank (host integers, as the collective takes them).
        recv_splits: rows received from each rank.
        differentiable: whether the exchanges are recorded by autograd (the same on every rank).
    """

    info: DispatchInfo
    send_splits: list[int]
    recv_splits: list[int]
    differentiable: bool
    plan: "PullPlan | None" = None  # the symmetric-memory transport's (no host splits)
    buffers: "SymmetricMemoryBuffers | None" = None


class AllToAllTransport:
    """The portable transport: ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPU).

    ``dispatch``: one ``all_to_all_single`` of a ``[W, E / W + 3]`` int64 header, row ``d`` what this rank sends to
    rank ``d``: its count of rows for each of ``d``'s experts, then its ``RankFlags``. Then the host reads the
    headers sent and received, the one host sync of the forward (``all_to_all_single`` takes its split sizes as
    host integers): on a GPU it waits for the routing, the sort and the header exchange to finish, so the layer is
    neither CUDA-graph capturable nor ``torch.compile(fullgraph=True)``-traceable (the received row count is a
    data-dependent shape). The backward reuses the splits: no sync. Then one ``all_to_all_single`` of the rows,
    grouped by expert within each destination, so that the receiver knows each row's expert from the counts alone,
    without a per-row id. ``combine``: one ``all_to_all_single`` of the expert outputs, back the same way.

    Each pair travels as its own row, even when a token has several experts on one rank. Sending each token once
    per destination rank would save dispatch bytes only: the ``y`` rows still come back one per pair, since the
    home rank applies the routing weights (and computes their gradient) on each expert's output. For DeepSeek-V3 on
    8 ranks (top-8 of 256 experts, 32 per rank) a token reaches ``8 * (1 - C(224, 8) / C(256, 8)) = 5.3`` ranks on
    average under uniform routing: per-rank rows would send 5.3 / 8 = 0.66 of the dispatch bytes, 0.83 of the round
    trip, for a receiver that expands rows into pairs through a second index. That is for a transport whose bytes
    dominate (``docs/design.md``, "Expert parallelism"); here the rows stay pairs, the layout of ``dispatch``.
    """

    # Whether a CUDA graph can capture dispatch and combine: no, the split sizes go to the host.
    graph_safe = False

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        """Why this transport cannot run on ``device``, or None: it runs wherever torch.distributed does."""
        return None

    def __init__(self, group, num_experts: int):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size

    def dispatch(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, flags: RankFlags, local_error: Exception | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor, Exchange]:  # fmt: skip
        """``(rows, local_expert_of_row, exchange)``: the rows received, ``[R, H]``, and each one's expert among this
        rank's, ``[R]`` int64. Raises on every rank as ``raise_for_other_ranks`` says, before any row moves."""
        world_size, num_local = self.world_size, self.num_local_experts
        header = torch.empty(world_size, num_local + 3, dtype=torch.int64, device=device)
        info = None
        if local_error is None:
            info = dispatch(hidden, top_k_index, self.num_experts)
            header[:, :num_local] = info.m_sizes.view(world_size, num_local)
        else:
            header[:, :num_local] = 0
        header[:, num_local:] = torch.tensor(flags.as_list(), dtype=torch.int64, device=device)
        received = torch.empty_like(header)
        dist.all_to_all_single(received, header, group=self.group)
        sent_host, received_host = torch.stack([header, received]).tolist()  # the host sync
        all_flags = [RankFlags(*map(bool, row[num_local:])) for row in received_host]
        differentiable = raise_for_other_ranks(all_flags, local_error, self.rank)

        send_splits = [sum(row[:num_local]) for row in sent_host]
        recv_splits = [sum(row[:num_local]) for row in received_host]
        rows = info.x_sorted[: sum(send_splits)]
        if differentiable and not rows.requires_grad:
            # Every rank records the exchanges when any rank needs gradients, so that the backward's collectives
            # run on all ranks (this rank's rows then get a gradient that nobody reads).
            rows = rows.detach().requires_grad_()
        num_received = sum(recv_splits)
        exchange = Exchange(info, send_splits, recv_splits, differentiable)
        received_rows = self._all_to_all(rows, send_splits, recv_splits, num_received, differentiable)
        # Rows arrive by source rank, each source's rows in expert order: source s sent received[s, e] rows of
        # this rank's expert e. E.g. 2 local experts, counts [[1, 0], [2, 1]]: experts 0 | 0, 0, 1.
        local_expert_of_row = torch.repeat_interleave(
            cached_arange(num_local, device).repeat(world_size),
            received[:, :num_local].reshape(-1),
            output_size=num_received,
        )
        return received_rows, local_expert_of_row, exchange

    @staticmethod
    def rows_moved(exchange: Exchange) -> tuple[int, int]:
        """The rows this rank sends in the exchange's dispatch (one per pair) and combine (one per pair received)."""
        return sum(exchange.send_splits), sum(exchange.recv_splits)

    def combine(self, y_rows: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        """The expert outputs of the rows received, sent home: ``[T * top_k, H]`` in the row order of
        ``exchange.info``, zeros in the rows of dropped pairs."""
        num_pairs = exchange.info.row_of_pair.shape[0]
        return self._all_to_all(
            y_rows, exchange.recv_splits, exchange.send_splits, num_pairs, exchange.differentiable
        )

    def _all_to_all(self, rows, send_splits, recv_splits, num_rows_out, differentiable):
        if differentiable:
            return _AllToAll.apply(rows, send_splits, recv_splits, self.group, num_rows_out)
        return all_to_all_rows(rows, send_splits, recv_splits, self.group, num_rows_out)


# How long a rank waits in the symmetric-memory barrier for the others before the device traps (a peer that raised
# between phases would otherwise leave it spinning for good).
BARRIER_TIMEOUT_MS = 120_000


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class SymmetricMemoryBuffers:
    """The symmetric-memory transport's regions on one rank, in one buffer of torch's symmetric memory (peer pointers
    over NVLink; CUDA, one node), built collectively at the first forward on every rank of ``group``:

    - ``header``: ``[E + W]`` int64, this rank's pair count per global expert, then its token count per rank;
    - ``send``: ``[capacity, H]`` rows (the tokens sent, at most ``token_capacity`` of them; in the backward, the
      gradients of the pairs' outputs, up to ``capacity``);
    - ``slots``: ``[capacity, 2]`` int64 per pair sent: its token's row within its destination's block, and its
      place among that token's pairs to the same destination;
    - ``recv``: ``[W * capacity, H]`` rows (the experts' outputs, per pair; in the backward, the tokens' gradients).

    ``pull`` copies blocks of rows out of the peers' regions with one kernel (``moe_gemm::pull_rows_``); ``barrier``
    is torch's device-side barrier: no host sync anywhere.
    """

    def __init__(self, group, *, world_size: int, rank: int, num_experts: int, capacity: int, token_capacity: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):  # fmt: skip
        self.world_size, self.rank, self.num_experts, self.hidden_size, self.dtype = (
            world_size, rank, num_experts, hidden_size, dtype
        )  # fmt: skip
        self.capacity, self.token_capacity = capacity, token_capacity
        self.row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
        self.header_length = num_experts + world_size
        self.offsets = {"send": _round_up(self.header_length * 8, 128)}
        self.offsets["slots"] = self.offsets["send"] + _round_up(capacity * self.row_bytes, 128)
        self.offsets["recv"] = self.offsets["slots"] + _round_up(capacity * 16, 128)
        self.last_side = None
        self.buffer = self._allocate(self.offsets["recv"] + world_size * capacity * self.row_bytes, group, device)

    def _allocate(self, num_bytes: int, group, device: torch.device) -> torch.Tensor:
        """This rank's buffer, ``num_bytes`` of symmetric memory, exchanged with the group's (collective)."""
        from torch.distributed import _symmetric_memory as symm_mem

        group = group if group is not None else dist.group.WORLD
        backend = symm_mem.get_backend(device) if hasattr(symm_mem, "get_backend") else None
        if backend not in (None, "CUDA"):
            # The pull kernel reads peers through the pointers and the barrier of the CUDA backend.
            raise RuntimeError(f"transport='symmetric_memory' needs torch's CUDA symmetric memory, got {backend!r}")
        if torch.torch_version.TorchVersion(torch.__version__) < (2, 11):
            # torch 2.9 and 2.10 register the group's store with symmetric memory here; 2.11 does it itself.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(group.group_name)
        buffer = symm_mem.empty(num_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(buffer, group)
        # The peers' pointers (buffer_ptrs_dev, get_buffer) start at their allocations, the buffer this far in.
        self.base_offset = int(getattr(self.handle, "offset", 0))
        return buffer

    def local(self, region: str) -> torch.Tensor:
        """This rank's ``region``: ``"header"``, ``"send"``, ``"slots"`` or ``"recv"``."""
        if region == "header":
            return self.buffer[: self.header_length * 8].view(torch.int64)
        start = self.offsets[region]
        if region == "slots":
            return self.buffer[start : start + self.capacity * 16].view(torch.int64).view(self.capacity, 2)
        rows = self.capacity * (1 if region == "send" else self.world_size)
        return self.buffer[start : start + rows * self.row_bytes].view(self.dtype).view(rows, self.hidden_size)

    def barrier(self) -> None:
        # A rank that raised between phases would leave the others spinning: after the timeout the device traps.
        self.handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)

    def enter_side(self, side: str) -> None:
        """Before a phase writes ``side`` (``"send"``: header, send and slots; ``"recv"``): phases alternate sides, so
        that a phase's barrier also tells every rank that the peers finished reading what it overwrites; when one
        writes the side the last one wrote (a backward that autograd pruned, a benchmark timing one phase over and
        over), an extra barrier first. Every rank runs the same phases, so every rank decides alike."""
        if self.last_side == side:
            self.barrier()
        self.last_side = side

    def peer_headers(self) -> torch.Tensor:
        """``[W, E + W]``: every rank's header (this rank's included)."""
        return torch.stack([
            self.handle.get_buffer(peer, (self.header_length,), torch.int64, self.base_offset // 8)
            for peer in range(self.world_size)
        ])  # fmt: skip

    def pull(self, out: torch.Tensor, region: str, src_start: torch.Tensor, dst_start: torch.Tensor,
             counts: torch.Tensor, max_rows: int) -> torch.Tensor:  # fmt: skip
        """Rows ``[src_start[s], + counts[s])`` of peer ``s``'s ``region`` (rows of ``out``'s width and dtype) into
        rows ``[dst_start[s], ...)`` of ``out``, for every ``s``."""
        torch.ops.moe_gemm.pull_rows_(
            out, self.handle.buffer_ptrs_dev, self.base_offset + self.offsets[region], src_start, dst_start, counts,
            max_rows,
        )  # fmt: skip
        return out


@dataclass
class Route:
    """One pull: from every peer's ``region`` (written by ``write``, the same region here), rows ``[src[s], +
    counts[s])`` into rows ``[dst[s], ...)`` of an ``[num_out, H]`` result; at most ``max_rows`` per peer."""

    region: str
    src: torch.Tensor
    dst: torch.Tensor
    counts: torch.Tensor
    num_out: int
    max_rows: int


@dataclass
class PullPlan:
    """Where one forward's rows are on every rank, for the symmetric-memory transport's pulls (on the device).

    With ``S`` the capacity in pairs, ``C`` in tokens and this rank ``r``: ``tokens_to_experts`` brings source
    ``s``'s tokens for this rank's experts into rows ``[s * C, ...)``, ``tokens_home`` their gradients back into
    the home's token order; ``pairs_home`` brings this rank's pairs' outputs from each expert rank into ``y_sorted``
    (the pairs sorted by global expert), ``pairs_to_experts`` their gradients to rows ``[s * S, ...)`` of the expert
    ranks, in the slots the forward used.
    """

    tokens_to_experts: Route
    tokens_home: Route
    pairs_home: Route
    pairs_to_experts: Route
    slots_to_experts: Route

    def reverse(self, name: str) -> str:
        return {"tokens_to_experts": "tokens_home", "tokens_home": "tokens_to_experts",
                "pairs_home": "pairs_to_experts", "pairs_to_experts": "pairs_home"}[name]  # fmt: skip


def _write_and_pull(rows: torch.Tensor, buffers, route: Route, write_region: str) -> torch.Tensor:
    """One phase: ``rows`` into this rank's ``write_region``, the barrier, the pull of ``route`` (zeros outside the
    pulled blocks: sentinel slots, dropped pairs)."""
    buffers.enter_side("send" if write_region == "send" else "recv")
    buffers.local(write_region)[: rows.shape[0]].copy_(rows)
    buffers.barrier()
    return _pull_route(rows, buffers, route)


def _pull_route(rows: torch.Tensor, buffers, route: Route) -> torch.Tensor:
    out = torch.zeros(route.num_out, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return buffers.pull(out, route.region, route.src, route.dst, route.counts, route.max_rows)


# The region each route's phase writes its rows into (the one its peers read).
_WRITES = {"tokens_to_experts": "send", "pairs_to_experts": "send", "tokens_home": "recv", "pairs_home": "recv"}


class _Pull(torch.autograd.Function):
    """The phase of route ``name`` under autograd (``prewritten``: its rows already written and the barrier passed,
    as the forward dispatch does to read the headers in between). Backward: the reverse route's phase."""

    @staticmethod
    def forward(ctx, rows, buffers, plan, name, prewritten):
        ctx.buffers, ctx.plan, ctx.name = buffers, plan, name
        route = getattr(plan, name)
        if prewritten:
            return _pull_route(rows, buffers, route)
        return _write_and_pull(rows, buffers, route, _WRITES[name])

    @staticmethod
    def backward(ctx, grad):
        reverse = ctx.plan.reverse(ctx.name)
        grad_rows = _write_and_pull(grad.contiguous(), ctx.buffers, getattr(ctx.plan, reverse), _WRITES[reverse])
        return grad_rows, None, None, None, None


class _ExpandTokens(torch.autograd.Function):
    """``tokens[index]``: each received pair's row from its token's, read once per rank over NVLink and copied here
    per pair. Backward: each token's pairs' gradients summed in a fixed order (``pairs_of_token [U, k]``, -1 for
    none), in float32 (float64 for float64), rounded once: bitwise reproducible, unlike the atomics of
    ``index_select``'s own."""

    @staticmethod
    def forward(ctx, tokens, index, pairs_of_token):
        ctx.save_for_backward(pairs_of_token)
        return tokens.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (pairs_of_token,) = ctx.saved_tensors
        accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
        total = torch.zeros(pairs_of_token.shape[0], grad.shape[1], dtype=accumulate, device=grad.device)
        for k in range(pairs_of_token.shape[1]):
            pair = pairs_of_token[:, k]
            rows = grad.index_select(0, pair.clamp(min=0)).to(accumulate)
            total += torch.where(pair[:, None] >= 0, rows, 0)
        return total.to(grad.dtype), None, None


def _pairs_of_token(token_of_slot: torch.Tensor, occurrence: torch.Tensor, valid: torch.Tensor, num_tokens: int,
                    top_k: int) -> torch.Tensor:  # fmt: skip
    """``[num_tokens, top_k]`` int64: the pair slots of each received token row, the ``j``-th in column ``occurrence
    = j`` (its home's slot order), -1 after its last. One scatter to distinct places: no sort, no host sync."""
    table = torch.full((num_tokens + 1, top_k), -1, dtype=torch.int64, device=token_of_slot.device)
    # The invalid slots all land in the extra row num_tokens (which wins there does not matter: it is dropped).
    row = torch.where(valid, token_of_slot, num_tokens)
    slot = torch.arange(token_of_slot.shape[0], device=token_of_slot.device)
    table.index_put_((row, torch.where(valid, occurrence, 0)), slot)
    return table[:num_tokens]


# One gloo group (the ranks' flags, on the host) per process group, built on first use by its ranks alone. Both
# dicts are keyed by the process group object itself, not its ranks: a group destroyed and initialised again (a
# benchmark, then a test, in one process) has the same ranks, and its predecessor's groups and buffers are dead.
_GLOO_GROUPS: dict[dist.ProcessGroup, dist.ProcessGroup] = {}
# The symmetric-memory buffers, shared by the layers of one shape: no state outlives a phase, and the phases of
# consecutive layers alternate sides like those of one layer (SymmetricMemoryBuffers.enter_side).
_SHARED_BUFFERS: dict[tuple, "SymmetricMemoryBuffers"] = {}


def release_shared_buffers() -> None:
    """Drop this process's symmetric-memory buffers (every shape's), e.g. between the sizes of a benchmark, where
    each ``max_tokens`` keeps its own set (``W * max_tokens * top_k`` rows each). Every rank calls it at the same
    point, after the last phase that used them finished on every rank; the next forward builds them again."""
    _SHARED_BUFFERS.clear()


def _gloo_group(group) -> dist.ProcessGroup:
    group = group if group is not None else dist.group.WORLD
    if group not in _GLOO_GROUPS:
        # Built by this group's ranks only: expert-parallel subgroups (data x expert parallelism) differ by rank.
        ranks = dist.get_process_group_ranks(group)
        _GLOO_GROUPS[group] = dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
    return _GLOO_GROUPS[group]


class SymmetricMemoryTransport:
    """The sync-free transport (CUDA, one node): the rows travel through torch's symmetric memory, each rank pulling
    what it needs from its peers' buffers with ``moe_gemm::pull_rows_`` after a device-side barrier
    (``SymmetricMemoryBuffers``). No host sync: the counts and offsets stay on the device. Static buffers, sized for
    ``max_tokens`` tokens per rank: ``S = max_tokens * top_k`` pairs sent and ``W * S`` received (the worst case,
    every pair of every rank to this one), so that a CUDA graph can capture the layer.

    ``dispatch``: the home rank sorts its pairs by global expert and its tokens by destination rank, and writes each
    token row once per destination rank (not once per expert), the token row of each pair within its destination's
    block, and its counts (per expert, per rank). After the barrier every rank reads the ``W`` headers, pulls from
    each source ``s`` its token rows into rows ``[s * C, ...)`` (``C = max_tokens * min(W, top_k)``) and the pairs'
    token rows, and copies each pair's row from its token's into pair slots ``[s * S, ...)``, in the source's pair
    order: the rows the experts run on (sentinel slots past each source's count are dropped). ``combine``: the
    experts' outputs, per pair, go into ``recv`` in those slots; after the barrier the home rank pulls its blocks back
    into ``y_sorted``. The backward runs the phases in reverse. Each phase writes the other side (``send`` and
    ``slots``, or ``recv``) than the phase before, so one barrier per phase keeps every write after the peers' last
    read of that region. The layers of one shape share one set of buffers.

    The ranks' flags (rejected arguments, grad modes) and buffer sizes go over a gloo group on the host, no device
    sync; not while a CUDA graph is captured, where every rank is taken to pass its checks.
    """

    # What builds the regions: SymmetricMemoryBuffers; the CPU tests substitute shared host memory.
    buffers_class = None
    # A CUDA graph captures dispatch and combine (after one forward of the shape has built the buffers).
    graph_safe = True

    def __init__(self, group, num_experts: int, *, max_tokens: int | None = None):
        if max_tokens is None or max_tokens < 1:
            raise ValueError(
                "transport='symmetric_memory' needs max_tokens, the most tokens any rank passes to one forward (its "
                f"buffers are static, sized for every pair of every rank reaching one rank), got {max_tokens}"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size
        self.max_tokens = max_tokens
        self._flags_group = _gloo_group(group)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        """Why this transport cannot run on ``device``, or None."""
        if cls.buffers_class is not None:
            return None
        if device.type != "cuda":
            return "symmetric memory is CUDA only"
        return _ops.kernels_unavailable_reason(device)

    def _buffers_for(self, hidden: torch.Tensor, top_k: int):
        """The buffers of this shape, shared with every layer of the same shape in the group (built collectively on
        first use: not while a CUDA graph is captured, so a warm-up forward must come first)."""
        buffers_class = self.buffers_class or SymmetricMemoryBuffers
        group = self.group if self.group is not None else dist.group.WORLD
        key = (buffers_class, group, self.num_experts, self.max_tokens, top_k, hidden.shape[1], hidden.dtype,
               hidden.device)  # fmt: skip
        if key not in _SHARED_BUFFERS:
            if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "transport='symmetric_memory' builds its buffers at the first forward of each shape, which a "
                    "CUDA graph cannot capture: run one forward of that shape before capturing"
                )
            _SHARED_BUFFERS[key] = buffers_class(
                self.group, world_size=self.world_size, rank=self.rank, num_experts=self.num_experts,
                capacity=self.max_tokens * top_k, token_capacity=self.max_tokens * min(self.world_size, top_k),
                hidden_size=hidden.shape[1], dtype=hidden.dtype, device=hidden.device,
            )  # fmt: skip
        return _SHARED_BUFFERS[key]

    def _exchange_flags(self, flags: RankFlags, top_k: int) -> tuple[list[RankFlags], list[tuple[int, int]]]:
        """Every rank's flags and buffer sizes ``(top_k, max_tokens)``, over the gloo group (host memory: no device
        sync). While a CUDA graph is captured nothing is exchanged: every rank is taken to pass its checks with this
        rank's sizes."""
        sizes = (top_k, self.max_tokens)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return [flags] * self.world_size, [sizes] * self.world_size
        mine = torch.tensor([*flags.as_list(), *sizes], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self._flags_group)
        return (
            [RankFlags(*map(bool, row[:-2].tolist())) for row in gathered],
            [tuple(row[-2:].tolist()) for row in gathered],
        )

    def _check_ranks(self, flags: RankFlags, local_error: Exception | None, hidden, top_k_index) -> bool:
        """Raise on every rank as ``raise_for_other_ranks`` says, the static sizes included; return whether the
        exchanges are differentiable."""
        if local_error is None and hidden.shape[0] > self.max_tokens:
            local_error = ValueError(
                f"hidden: {hidden.shape[0]} tokens, more than the symmetric-memory transport's max_tokens "
                f"{self.max_tokens} (its buffers are static: build the layer with a larger max_tokens)"
            )
            flags = RankFlags(True, flags.needs_grad, flags.grad_enabled)
        top_k = top_k_index.shape[1] if top_k_index.dim() == 2 else 0
        all_flags, sizes = self._exchange_flags(flags, top_k)
        # The buffers are sized by top_k and max_tokens, the same on every rank: a rank that differs from rank 0 is
        # rejected (it raises the ValueError, the others a RuntimeError naming it).
        if local_error is None and sizes[self.rank] != sizes[0]:
            local_error = ValueError(
                f"top_k_index: {top_k} slots per token and max_tokens {self.max_tokens} on rank {self.rank}, "
                f"{sizes[0][0]} and {sizes[0][1]} on rank 0; the symmetric-memory transport sizes its buffers by "
                "both, which every rank must share"
            )
        for rank, rank_sizes in enumerate(sizes):
            if rank_sizes != sizes[0]:
                all_flags[rank] = RankFlags(True, all_flags[rank].needs_grad, all_flags[rank].grad_enabled)
        return raise_for_other_ranks(all_flags, local_error, self.rank)

    def plan(self, headers: torch.Tensor, num_pairs: int, num_token_rows: int, buffers) -> PullPlan:
        """The ``PullPlan`` of every rank's header ``[W, E + W]`` (tensor ops, on the device)."""
        world_size, num_local, rank = self.world_size, self.num_local_experts, self.rank
        capacity, token_capacity = buffers.capacity, buffers.token_capacity
        device = headers.device
        pairs = headers[:, : self.num_experts].reshape(world_size, world_size, num_local).sum(dim=2)  # [src, dst]
        tokens = headers[:, self.num_experts :]  # [source, destination rank]
        # Each source's pairs are sorted by global expert and its tokens by destination rank: its block for rank d
        # starts after its blocks for ranks < d.
        pair_starts, token_starts = torch.cumsum(pairs, dim=1) - pairs, torch.cumsum(tokens, dim=1) - tokens
        ranks = torch.arange(world_size, device=device, dtype=torch.int64)
        return PullPlan(
            tokens_to_experts=Route("send", token_starts[:, rank].contiguous(), ranks * token_capacity,
                                    tokens[:, rank].contiguous(), world_size * token_capacity, token_capacity),
            tokens_home=Route("recv", torch.full_like(ranks, rank * token_capacity), token_starts[rank].contiguous(),
                              tokens[rank].contiguous(), num_token_rows, token_capacity),
            pairs_home=Route("recv", torch.full_like(ranks, rank * capacity), pair_starts[rank].contiguous(),
                             pairs[rank].contiguous(), num_pairs, capacity),
            pairs_to_experts=Route("send", pair_starts[:, rank].contiguous(), ranks * capacity,
                                   pairs[:, rank].contiguous(), world_size * capacity, capacity),
            slots_to_experts=Route("slots", pair_starts[:, rank].contiguous(), ranks * capacity,
                                   pairs[:, rank].contiguous(), world_size * capacity, capacity),
        )  # fmt: skip

    def dispatch(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, flags: RankFlags, local_error: Exception | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor, Exchange]:  # fmt: skip
        """As ``AllToAllTransport.dispatch``, with ``W * S`` pair rows received: source ``s``'s in slots
        ``[s * S, s * S + n_s)`` in its pair order, the others sentinel rows (local expert ``E / W``)."""
        differentiable = self._check_ranks(flags, local_error, hidden, top_k_index)
        world_size, num_local, top_k = self.world_size, self.num_local_experts, top_k_index.shape[1]
        buffers = self._buffers_for(hidden, top_k)
        num_tokens = hidden.shape[0]
        # The pairs, sorted by global expert (no rows gathered: the tokens travel, once per rank).
        m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair = sort_pairs(top_k_index, self.num_experts)
        info = DispatchInfo(None, m_sizes, expert_of_row, pair_of_row, row_of_pair, valid_pair)
        # The tokens, sorted by destination rank: token t goes to rank d once if any of its experts lives there.
        destination = torch.where(valid_pair, top_k_index.to(torch.int64) // num_local, world_size)
        reached = torch.zeros(num_tokens, world_size + 1, dtype=torch.bool, device=device)
        reached.scatter_(1, destination, True)
        ranks = torch.arange(world_size, device=device, dtype=torch.int64)
        rank_ids = torch.where(reached[:, :world_size], ranks, world_size)
        token_info = dispatch(hidden, rank_ids, world_size)
        token_rows = token_info.x_sorted
        if differentiable and not token_rows.requires_grad:
            # As AllToAllTransport: every rank records the pulls, so that every rank's backward runs its phases.
            token_rows = token_rows.detach().requires_grad_()
        # Each pair's token row within its destination's block: (t, d)'s row among the tokens minus the block start.
        token_starts = torch.cumsum(token_info.m_sizes, dim=0) - token_info.m_sizes
        token_of_row = pair_of_row // max(top_k, 1)
        destination_of_row = expert_of_row.clamp(max=self.num_experts - 1) // num_local
        slot = token_info.row_of_pair.index_select(0, token_of_row * world_size + destination_of_row)
        slot = slot - token_starts.index_select(0, destination_of_row)
        # Each pair's place among its token's pairs to the same rank, in slot order (the receiver's table of the
        # pairs of each token row, for the backward's fixed-order sum): [T, K, K] comparisons, K at most a few dozen.
        earlier = torch.ones(top_k, top_k, dtype=torch.bool, device=device).tril(-1)
        occurrence = ((destination[:, :, None] == destination[:, None, :]) & earlier).sum(dim=2).view(-1)
        occurrence_of_row = occurrence.index_select(0, pair_of_row)

        # The dispatch phase by hand (the headers are read between the barrier and the pulls, to plan them).
        num_sent = min(token_rows.shape[0], buffers.token_capacity)
        buffers.enter_side("send")
        buffers.local("header").copy_(torch.cat([m_sizes, token_info.m_sizes]))
        buffers.local("send")[:num_sent].copy_(token_rows.detach()[:num_sent])
        buffers.local("slots")[: slot.shape[0]].copy_(torch.stack([slot, occurrence_of_row], dim=1))
        buffers.barrier()
        headers = buffers.peer_headers()
        plan = self.plan(headers, top_k_index.numel(), token_rows.shape[0], buffers)
        if differentiable:
            tokens = _Pull.apply(token_rows, buffers, plan, "tokens_to_experts", True)
        else:
            tokens = _pull_route(token_rows, buffers, plan.tokens_to_experts)
        slots_route = plan.slots_to_experts
        slots = buffers.pull(
            torch.zeros(slots_route.num_out, 2, dtype=torch.int64, device=device), "slots", slots_route.src,
            slots_route.dst, slots_route.counts, slots_route.max_rows,
        ).view(world_size, buffers.capacity, 2)  # fmt: skip
        # Pair slot i of source s: its token's row s * C + slots[s, i, 0]; valid for i below the source's count.
        in_block = torch.arange(buffers.capacity, device=device) < slots_route.counts[:, None]
        token_index = (slots[:, :, 0] + ranks[:, None] * buffers.token_capacity).view(-1)
        valid = in_block.view(-1)
        pairs_of_token = _pairs_of_token(token_index, slots[:, :, 1].reshape(-1), valid, tokens.shape[0], top_k)
        rows = _ExpandTokens.apply(tokens, token_index, pairs_of_token) if differentiable else tokens[token_index]
        # The local expert of pair slot i of source s: the number of the source's cumulative counts for this rank's
        # experts at or below i (E / W past its count: a sentinel, dropped).
        local_counts = headers[:, : self.num_experts].reshape(world_size, world_size, num_local)[:, self.rank]
        slot_index = torch.arange(buffers.capacity, device=device, dtype=torch.int64).expand(world_size, -1)
        local_expert_of_row = torch.searchsorted(
            torch.cumsum(local_counts, dim=1), slot_index.contiguous(), right=True
        ).view(-1)
        return rows, local_expert_of_row, Exchange(info, [], [], differentiable, plan, buffers)

    @staticmethod
    def rows_moved(exchange: Exchange) -> tuple[int, int]:
        """The rows this rank sends in the exchange's dispatch (its tokens, once per destination rank) and combine
        (the outputs of the pairs it received), read on the host."""
        plan = exchange.plan
        return int(plan.tokens_home.counts.sum()), int(plan.pairs_to_experts.counts.sum())

    def combine(self, y_rows: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        if exchange.differentiable:
            return _Pull.apply(y_rows, exchange.buffers, exchange.plan, "pairs_home", False)
        return _write_and_pull(y_rows, exchange.buffers, exchange.plan.pairs_home, "recv")


# The transports by name; ``ExpertParallelExperts(transport=...)`` picks one.
TRANSPORTS = {"all_to_all": AllToAllTransport, "symmetric_memory": SymmetricMemoryTransport}


def _group_size_and_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ExpertParallelExperts needs torch.distributed initialised: call torch.distributed.init_process_group "
            "first (torchrun sets up its environment)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


class ExpertParallelExperts(_StackedExperts):
    """The experts of an MoE layer spread over the ranks of ``group``; ``forward(hidden, top_k_index,
    top_k_weights)`` as ``MoEExperts``'s, for this rank's tokens, with global expert ids.

    Rank ``r`` of the ``W`` ranks of ``group`` (the default group when None) holds experts ``[r * E / W, (r + 1) *
    E / W)``, ``first_expert = r * E / W`` on, in Hugging Face's names and layouts: ``gate_up_proj [E / W, 2I, H]``,
    ``down_proj [E / W, H, I]``, and with ``bias=True`` ``gate_up_proj_bias [E / W, 2I]`` and ``down_proj_bias
    [E / W, H]``. The sizes are keyword-only, as in ``MoEExperts``; ``num_experts`` is the layer's ``E``, all ranks
    together. Initialised as ``nn.Linear`` per expert from this rank's generator; ``from_experts`` takes this rank's
    slice of a whole layer's weights instead.

    ``transport`` (one of ``TRANSPORTS``) moves the rows: ``"all_to_all"`` (``AllToAllTransport``) syncs with the host
    once per forward for the split sizes; ``"symmetric_memory"`` (``SymmetricMemoryTransport``, CUDA, one node) does
    not, with static buffers for ``max_tokens`` tokens per rank and forward. Every rank calls ``forward`` (and, when
    gradients are needed, ``backward``) together, each with its own tokens, possibly none.

    ``forward`` returns ``[T, H]``: ``out[t] = sum_j w[t, j] * expert_{id[t, j]}(hidden[t])``, ids outside ``[0, E)``
    adding nothing, the sum over ``j`` in float32 in slot order: what ``experts_forward`` over all ``E`` experts
    returns for these tokens, up to the GEMMs' summation order, and bitwise the same from run to run. Differentiable
    in ``hidden``, ``top_k_weights`` and this rank's weights and biases (whose gradients hold every rank's tokens'
    contributions: expert parameters need no all-reduce across the group).

    Raises:
        ValueError: at construction, when ``E`` is not a multiple of ``W`` or ``transport`` is unknown (every rank
            sees this alone).
        TypeError, ValueError: in ``forward``, on the rank whose arguments do not fit (as ``MoEExperts``), and then
            ``RuntimeError`` on the other ranks: no rank is left waiting in a collective.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        group: dist.ProcessGroup | None = None,
        transport: str = "all_to_all",
        max_tokens: int | None = None,
        act: str | Callable[[torch.Tensor], torch.Tensor] = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        world_size, rank = _group_size_and_rank(group)
        if num_experts <= 0 or num_experts % world_size:
            raise ValueError(
                f"num_experts must be a positive multiple of the group's world size {world_size} (each rank holds "
                f"num_experts / {world_size} experts), got {num_experts}"
            )
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {tuple(TRANSPORTS)}, got {transport!r}")
        num_local_experts = num_experts // world_size
        super().__init__(num_local_experts, hidden_size, intermediate_size, act, bias, device, dtype)
        self.num_experts, self.num_local_experts = num_experts, num_local_experts
        self.group, self.world_size, self.rank = group, world_size, rank
        self.first_expert = rank * num_local_experts
        if transport == "symmetric_memory":
            element_size = torch.empty((), dtype=dtype or torch.get_default_dtype()).element_size()
            if hidden_size * element_size % 16:
                raise ValueError(
                    f"transport='symmetric_memory' moves rows of a multiple of 16 bytes: hidden_size {hidden_size} "
                    f"of {dtype or torch.get_default_dtype()} is {hidden_size * element_size} bytes"
                )
        self.transport, self.max_tokens = transport, max_tokens
        options = {"max_tokens": max_tokens} if transport == "symmetric_memory" else {}
        self._transport = TRANSPORTS[transport](group, num_experts, **options)

    @classmethod
    def from_experts(
        cls, experts: MoEExperts, *, group: dist.ProcessGroup | None = None, transport: str = "all_to_all",
        max_tokens: int | None = None,
    ) -> "ExpertParallelExperts":
        """This rank's slice of a whole layer's ``experts`` (copies, with their device, dtype and ``requires_grad``;
        ``experts`` is left as it is). Every rank passes the same weights, e.g. built from one seed or loaded from
        one checkpoint."""
        if not isinstance(experts, MoEExperts):
            raise TypeError(f"experts: expected a moe_gemm.MoEExperts, got {type(experts).__name__}")
        weight = experts.gate_up_proj
        module = cls(
            num_experts=experts.num_experts,
            hidden_size=experts.hidden_size,
            intermediate_size=experts.intermediate_size,
            group=group,
            transport=transport,
            max_tokens=max_tokens,
            act=experts.act,
            bias=experts.down_proj_bias is not None,
            device="meta",  # replaced by the slices below
            dtype=weight.dtype,
        )
        local = slice(module.first_expert, module.first_expert + module.num_local_experts)
        with torch.no_grad():
            for name, parameter in experts.named_parameters(recurse=False):
                setattr(module, name, nn.Parameter(parameter[local].clone(), requires_grad=parameter.requires_grad))
        return module

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        local_error = self._argument_error(hidden, top_k_index, top_k_weights)
        grad_enabled = torch.is_grad_enabled()
        needs_grad = grad_enabled and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, top_k_weights, *self.parameters())
        )
        flags = RankFlags(local_error is not None, needs_grad, grad_enabled)
        device = self.gate_up_proj.device
        rows, local_expert_of_row, exchange = self._transport.dispatch(
            hidden, top_k_index, flags, local_error, device
        )
        # Each row once, weight 1: the unweighted expert output, which the home rank weighs.
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=device)
        y_rows = self._experts_forward(rows, local_expert_of_row[:, None], ones)
        y_sorted = self._transport.combine(y_rows, exchange)
        return combine(y_sorted, exchange.info, top_k_weights)

    def _argument_error(self, hidden, top_k_index, top_k_weights) -> Exception | None:
        """The error this rank's arguments raise alone (as ``MoEExperts``'s), returned rather than raised: the
        transport shares it with the other ranks first."""
        try:
            _check_module_input(self, hidden, self.gate_up_proj)
            if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
                raise ValueError(
                    f"hidden: expected shape [T, H] with H = {self.hidden_size} (ExpertParallelExperts hidden_size), "
                    f"got {tuple(hidden.shape)}"
                )
            _check_experts_arguments(
                hidden, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.gate_up_proj_bias,
                self.down_proj_bias, False, isinstance(self.act, str),
            )  # fmt: skip
        except (TypeError, ValueError) as error:
            return error
        return None

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, {self._sizes_repr()}, rank={self.rank}, world_size={self.world_size}, "
            f"local experts [{self.first_expert}, {self.first_expert + self.num_local_experts}), "
            f"transport={self.transport!r}"
        )


def expert_parallel(
    model: nn.Module, group: dist.ProcessGroup | None = None, *, transport: str = "all_to_all",
    max_tokens: int | None = None,
) -> list[str]:
    """Replace every ``MoEExperts`` inside ``model`` (``moe_gemm.MoE``'s ``experts``, or the blocks of
    ``fuse_experts``) by ``ExpertParallelExperts.from_experts``: this rank keeps its slice of the experts, and the
    layer's forward and backward exchange rows with the other ranks of ``group``. The rest of the model (routers,
    shared experts) stays whole on every rank, to be trained data-parallel; the expert parameters must then be kept
    out of the data-parallel all-reduce. Every rank must call this on the same model.

    Returns the names of the modules replaced. Raises ``ValueError`` when ``model`` holds none (a ``MoEExperts``
    itself is converted with ``ExpertParallelExperts.from_experts``).
    """
    names = [name for name, module in model.named_modules() if name and isinstance(module, MoEExperts)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} holds no moe_gemm.MoEExperts submodule (a MoEExperts itself: use "
            "ExpertParallelExperts.from_experts)"
        )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        experts = ExpertParallelExperts.from_experts(
            getattr(parent, child), group=group, transport=transport, max_tokens=max_tokens
        )
        setattr(parent, child, experts)
    return names


__all__ = ["TRANSPORTS", "AllToAllTransport", "ExpertParallelExperts", "SymmetricMemoryTransport", "expert_parallel"]
