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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_gemm.dispatch import DispatchInfo, cached_arange, combine, dispatch
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


# The transports by name; ``ExpertParallelExperts(transport=...)`` picks one.
TRANSPORTS = {"all_to_all": AllToAllTransport}


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
    once per forward for the split sizes. Every rank calls ``forward`` (and, when gradients are needed,
    ``backward``) together, each with its own tokens, possibly none.

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
        self.transport = transport
        self._transport = TRANSPORTS[transport](group, num_experts)

    @classmethod
    def from_experts(
        cls, experts: MoEExperts, *, group: dist.ProcessGroup | None = None, transport: str = "all_to_all"
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
    model: nn.Module, group: dist.ProcessGroup | None = None, *, transport: str = "all_to_all"
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
        experts = ExpertParallelExperts.from_experts(getattr(parent, child), group=group, transport=transport)
        setattr(parent, child, experts)
    return names


__all__ = ["TRANSPORTS", "AllToAllTransport", "ExpertParallelExperts", "expert_parallel"]
