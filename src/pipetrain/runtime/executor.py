"""The executor: runs one rank's lowered action list; every wait is bounded and names its peer."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..schedule.actions import Action, Op, Value, consumer_stage, describe, message_of, received_input
from ..schedule.timeline import Event, Timeline
from .comm import CommError, Transport, Work, abort_others, rank_name, wait_or_raise
from .stage import UNWEIGHTED, LossWeights, Stage
from .values import Packet, Signature

_OPS = list(Op)

# What the step's all-reduce carries (one small float64 vector; see `RankStep.partials`)
LOSS_SUM, LOSS_COUNT, AUX_SUM, PAIR_LOSSES, AUX_LOSSES = range(5)


@dataclass(frozen=True)
class RankStep:
    """What one rank measured in one step: compute events, waits, and its step time (seconds)."""

    rank: int
    loss: float  # the step's loss, the same on every rank (nan until the pipeline has reduced the partials)
    events: tuple[Event, ...]  # compute actions; times in seconds from `t0`
    waits: tuple[Event, ...]
    step_time: float
    t0: float  # time.perf_counter() at the start of the step (one clock for all processes of a host)
    comms: tuple[Event, ...] = ()  # SEND/RECV postings
    aux_loss: float = 0.0  # the auxiliary losses' weighted sum (1/M per microbatch, mean over replicas)
    token_mean: bool = False  # loss_fn returned (loss_sum, count): `loss` is the step's token mean
    tokens: float = 0.0  # the count behind `loss` over every replica (a token mean), or M x replicas
    partials: torch.Tensor | None = None  # this rank's [loss sum, count, aux sum, pair losses, aux losses]

    @property
    def busy_time(self) -> float:
        return sum(e.duration for e in self.events)

    @property
    def bubble_fraction(self) -> float:
        return 1.0 - self.busy_time / self.step_time if self.step_time > 0 else 0.0


class Executor:
    """Runs lowered action lists for the stages of one rank over a transport.

    Shapes between stages: a transfer's buffers are allocated from its `Signature`. An activation's
    signature is keyed by (producing stage, the microbatch's shape key): the first transfer with a new
    key carries the signature in a small message before the data (two messages: its length, its bytes),
    later ones send only the data. Every rank computes the same keys from the same batch, so sender and
    receiver always agree on whether a signature message comes. A gradient's buffers follow from the
    signature of the activation it belongs to, so gradients never need one.
    """

    def __init__(self, *, rank: int, stage_to_rank: Sequence[int], stages: dict[int, Stage],
                 transport: Transport, timeout: float) -> None:
        self.rank = rank
        self.stage_to_rank = tuple(stage_to_rank)
        self.num_stages = len(self.stage_to_rank)
        self.stages = stages
        self.transport = transport
        self.timeout = timeout
        self.device = transport.device
        self._known: dict[tuple[int, Hashable], Signature] = {}  # (stage, shape key) -> its output's signature

    # --- one step ----------------------------------------------------------------------------------
    def run(self, actions: Sequence[Action], *, inputs: Sequence[Any], targets: Sequence[Any] | None,
            keys: Sequence[Hashable], grad: bool, weights: LossWeights = UNWEIGHTED,
            on_stage_done: Callable[[int], None] | None = None) -> RankStep:
        """Run one step's actions over microbatches `inputs` (each a tensor or a tree of tensors).

        `keys[mb]` is the shape key of microbatch `mb`, the same on every rank. `on_stage_done(stage)` is
        called as soon as a stage's weight gradients are complete (after its last B or W), while later
        actions still run: e.g. to start the data-parallel all-reduce."""
        self._inputs, self._targets, self._keys = inputs, targets, keys
        self._grad, self._weights = grad, weights
        self._on_stage_done = on_stage_done
        self._weight_work_left = {s: len(inputs) for s in self.stages}
        self._t0 = time.perf_counter()
        self._posted: dict[Value, tuple[list[Work], list[torch.Tensor], Signature, Action, int]] = {}
        self._deferred: dict[int, list[tuple[Value, Action]]] = defaultdict(list)
        self._sends: list[tuple[Work, torch.Tensor, Action, int]] = []
        self._local: dict[Value, Packet | list[torch.Tensor]] = {}
        self._outputs: dict[tuple[int, int], Signature] = {}  # this step's (stage, mb) -> output signature
        self._events: list[Event] = []
        self._comms: list[Event] = []
        self._waits: list[Event] = []
        try:
            for action in actions:
                if action.op.is_comm:
                    start = self._now()
                    if action.op in (Op.RECV_F, Op.RECV_B):
                        self._recv(action)
                    else:
                        self._send(action)
                    self._comms.append(Event(self.rank, action, start, self._now()))
                else:
                    self._compute(action)
            for work, _, action, peer in self._sends:
                self._wait(work, action, peer, "the send")
            self._sends.clear()
            partials = self._partials()
        except BaseException as err:
            for stage in self.stages.values():
                stage.clear()
            abort_others(self.transport, self.rank, err)
            raise
        for stage in self.stages.values():
            stage.losses.clear()
            stage.aux.clear()
        return RankStep(self.rank, math.nan, tuple(self._events), tuple(self._waits), self._now(), self._t0,
                        tuple(self._comms), partials=partials)

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    # --- compute -------------------------------------------------------------------------------------
    def _compute(self, action: Action) -> None:
        s, mb = action.stage, action.mb
        stage = self.stages[s]
        needs = received_input(action, self.num_stages)
        if action.op is Op.F:
            x = self._input(needs, action) if needs is not None else self._inputs[mb]
            target = self._targets[mb] if stage.is_last and self._targets is not None else None
            start = self._now()
            out = stage.forward(mb, x, target=target, weights=self._weights, grad=self._grad)
            if out is not None:
                self._outputs[(s, mb)] = out.signature
                self._local[("act", s, mb)] = out
                self._post_known_deferred()
        elif action.op in (Op.B, Op.I):
            grads = self._input(needs, action) if needs is not None else None
            start = self._now()
            grads_in = stage.backward(mb, grads) if action.op is Op.B else stage.backward_input(mb, grads)
            if s > 0:
                self._local[("grad", s, mb)] = grads_in
        else:
            start = self._now()
            stage.backward_weight(mb)
        self._events.append(Event(self.rank, action, start, self._now()))
        if action.op in (Op.B, Op.W):  # each microbatch's weight gradients are finished by one B or one W
            self._weight_work_left[s] -= 1
            if self._weight_work_left[s] == 0 and self._on_stage_done is not None:
                self._on_stage_done(s)
        self._reap_sends()

    def _input(self, value: Value, action: Action) -> Packet | list[torch.Tensor]:
        """A compute action's input from another stage: passed locally on this rank, or received."""
        if self.stage_to_rank[value[1]] == self.rank:
            return self._local.pop(value)
        if value not in self._posted:
            self._post_deferred_through(value)
        works, bufs, signature, recv_action, peer = self._posted.pop(value)
        start = self._now()
        for work in works:
            self._wait(work, recv_action, peer, describe(value), waiting_in=action)
        self._waits.append(Event(self.rank, action, start, self._now()))
        return Packet(bufs, signature) if value[0] == "act" else bufs

    # --- transfers -----------------------------------------------------------------------------------
    def _signature(self, value: Value) -> Signature | None:
        """The signature of an activation (or, for a gradient, of the activation it belongs to), if known
        without a message."""
        stage = value[1] if value[0] == "act" else value[1] - 1
        return self._outputs.get((stage, value[2])) or self._known.get((stage, self._keys[value[2]]))

    def _recv(self, action: Action) -> None:
        value = message_of(action)
        peer = self.stage_to_rank[value[1]]
        if self._deferred[peer] or self._signature(value) is None:
            # not known yet: post when a compute action needs it (or its shape is learned), keeping the order
            self._deferred[peer].append((value, action))
        else:
            self._post_recv(value, action, peer)

    def _post_known_deferred(self) -> None:
        """Post deferred receives at the head of each peer's queue whose shapes are now known."""
        for peer, queue in self._deferred.items():
            while queue and self._signature(queue[0][0]) is not None:
                value, action = queue.pop(0)
                self._post_recv(value, action, peer)

    def _post_deferred_through(self, value: Value) -> None:
        peer = self.stage_to_rank[value[1]]
        queue = self._deferred[peer]
        while queue:
            v, a = queue.pop(0)
            self._post_recv(v, a, peer)
            if v == value:
                return
        raise CommError(f"{rank_name(self.transport, self.rank)}: no receive was posted for {describe(value)}; "
                        "the schedule was not lowered for this placement")

    def _post_recv(self, value: Value, action: Action, peer: int) -> None:
        signature = self._signature(value)
        if signature is None:
            if value[0] != "act":
                raise CommError(f"{rank_name(self.transport, self.rank)}: {action} receives {describe(value)} "
                                "before this rank computed the activation it belongs to; the schedule is invalid")
            signature = self._recv_signature(value, action, peer)
        shapes = signature.leaves if value[0] == "act" else [signature.leaves[i] for i in signature.grad_leaves]
        bufs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype, _ in shapes]
        works = [self.transport.irecv(buf, peer) for buf in bufs]
        self._posted[value] = (works, bufs, signature, action, peer)

    def _recv_signature(self, value: Value, action: Action, peer: int) -> Signature:
        what = f"the shapes of {describe(value)}"
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._wait(self.transport.irecv(length, peer), action, peer, what)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self._wait(self.transport.irecv(data, peer), action, peer, what)
        signature = Signature.from_bytes(data)
        self._known[(value[1], self._keys[value[2]])] = signature
        return signature

    def _send(self, action: Action) -> None:
        value = message_of(action)
        peer = self.stage_to_rank[consumer_stage(value)]
        payload = self._local.pop(value)
        if isinstance(payload, Packet):
            self._send_signature_if_new(value, payload.signature, action, peer)
            tensors = payload.leaves
        else:
            tensors = payload
        for tensor in tensors:
            tensor = tensor.contiguous()
            self._sends.append((self.transport.isend(tensor, peer), tensor, action, peer))

    def _send_signature_if_new(self, value: Value, signature: Signature, action: Action, peer: int) -> None:
        key = (value[1], self._keys[value[2]])
        known = self._known.get(key)
        if known is None:
            data = signature.to_bytes().to(self.device)
            for tensor in (torch.tensor([data.numel()], dtype=torch.int64, device=self.device), data):
                self._sends.append((self.transport.isend(tensor, peer), tensor, action, peer))
            self._known[key] = signature
        elif known != signature:
            raise ValueError(f"{action}: stage {value[1]}'s output for microbatch {value[2]} is "
                             f"{signature.describe()}, but an earlier microbatch with the same input shapes gave "
                             f"{known.describe()}. The shapes between stages must follow from the shapes of the "
                             "microbatch, not from its values: pad data-dependent sizes to a fixed bound")

    def _reap_sends(self) -> None:
        """Drop finished sends so their tensors can be freed."""
        if self._sends:
            self._sends = [s for s in self._sends if not s[0].is_completed()]

    def _wait(self, work: Work, action: Action | str, peer: int, what: str, *,
              waiting_in: Action | None = None) -> None:
        inside = f" (needed by {waiting_in})" if waiting_in is not None else ""
        wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=peer, what=what,
                      doing=f"{action}{inside}")

    # --- loss ----------------------------------------------------------------------------------------
    def _partials(self) -> torch.Tensor:
        """This rank's share of the step's loss and auxiliary losses, summed over ranks by the pipeline."""
        out = torch.zeros(5, dtype=torch.float64)
        last = self.stages.get(self.num_stages - 1)
        if last is not None and last.losses:
            results = [last.losses[m] for m in range(len(self._inputs))]
            pairs = sum(count is not None for _, count in results)
            if pairs not in (0, len(results)):
                raise ValueError("loss_fn returned a mean for some microbatches and a (loss_sum, count) pair for "
                                 "others; return the same kind for every microbatch")
            values = torch.stack([loss.double().cpu() for loss, _ in results])
            out[LOSS_SUM] = values.sum()
            out[LOSS_COUNT] = (sum(float(c) for _, c in results) if pairs else len(results))
            out[PAIR_LOSSES] = 1.0 if pairs else 0.0
        aux = [a.double().cpu() for stage in self.stages.values() for a in stage.aux.values()]
        if aux:
            out[AUX_SUM] = torch.stack(aux).sum()
            out[AUX_LOSSES] = len(aux)
        return out.to(self.device)


def gather_timeline(step: RankStep, transport: Transport, timeout: float, dst: int = 0) -> Timeline | None:
    """Every rank's measured `step` as one Timeline on rank `dst` (None elsewhere); collective. Two sums over
    the ranks: the row counts, then the rows, each rank filling its own slice of a zero matrix."""
    rows = [[e.action.stage, _OPS.index(e.action.op), e.action.mb, e.start + step.t0, e.end + step.t0, kind]
            for kind, events in ((0, step.events + step.comms), (1, step.waits)) for e in events]
    world = transport.world_size
    head = torch.zeros(world, 3, dtype=torch.float64, device=transport.device)
    head[transport.rank] = torch.tensor([len(rows), step.step_time, step.t0], dtype=torch.float64)
    transport.all_reduce(head, timeout)
    counts = [int(n) for n in head[:, 0].tolist()]
    body = torch.zeros(sum(counts), 6, dtype=torch.float64, device=transport.device)
    first = sum(counts[:transport.rank])
    if rows:
        body[first:first + len(rows)] = torch.tensor(rows, dtype=torch.float64)
    transport.all_reduce(body, timeout)
    if transport.rank != dst:
        return None
    origin = float(head[:, 2].min())
    step_times = [float(t0 + length - origin) for _, length, t0 in head.tolist()]
    events, waits = [], []
    for r, (start, n) in enumerate(zip([sum(counts[:r]) for r in range(world)], counts, strict=True)):
        for stage, op, mb, begin, end, kind in body[start:start + n].tolist():
            event = Event(r, Action(int(stage), _OPS[int(op)], int(mb)), begin - origin, end - origin)
            (waits if kind else events).append(event)
    return Timeline(world, tuple(sorted(events, key=lambda e: (e.rank, e.start, e.end))),
                    tuple(sorted(waits, key=lambda e: (e.rank, e.start))), tuple(step_times))
