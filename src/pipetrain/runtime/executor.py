"""The executor: runs one rank's lowered action list; every wait is bounded and names its peer."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedule.actions import (
    ACT,
    Action,
    Op,
    Value,
    consumer_stage,
    describe,
    finishes_weights,
    message_of,
    produces,
    received_input,
    shaped_like,
)
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


@dataclass
class _Posted:
    """A receive posted ahead of the compute action that needs it."""

    works: list[Work]
    buffers: list[torch.Tensor]
    signature: Signature
    action: Action  # the RECV
    peer: int


@dataclass
class _StepState:
    """Everything one `Executor.run` creates: its microbatches, what it has posted, sent and kept, and what it
    measured. A new one per run, so nothing of a step outlives it."""

    inputs: Sequence[Any]
    targets: Sequence[Any] | None
    keys: Sequence[Hashable]
    grad: bool
    weights: LossWeights
    on_stage_done: Callable[[int], None] | None
    weight_work_left: dict[int, int]  # stage -> microbatches whose weight gradients are not finished yet
    t0: float = field(default_factory=time.perf_counter)
    posted: dict[Value, _Posted] = field(default_factory=dict)
    deferred: dict[int, list[tuple[Value, Action]]] = field(default_factory=lambda: defaultdict(list))  # per peer
    sends: list[tuple[Work, torch.Tensor, Action, int]] = field(default_factory=list)
    local: dict[Value, Packet | list[torch.Tensor]] = field(default_factory=dict)  # passed between own stages
    outputs: dict[tuple[int, int], Signature] = field(default_factory=dict)  # (stage, mb) -> output signature
    events: list[Event] = field(default_factory=list)
    comms: list[Event] = field(default_factory=list)
    waits: list[Event] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.t0


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
        self._step: _StepState | None = None  # the run in progress

    # --- one step ----------------------------------------------------------------------------------
    def run(self, actions: Sequence[Action], *, inputs: Sequence[Any], targets: Sequence[Any] | None,
            keys: Sequence[Hashable], grad: bool, weights: LossWeights = UNWEIGHTED,
            on_stage_done: Callable[[int], None] | None = None) -> RankStep:
        """Run one step's actions over microbatches `inputs` (each a tensor or a tree of tensors).

        `keys[mb]` is the shape key of microbatch `mb`, the same on every rank. `on_stage_done(stage)` is
        called as soon as a stage's weight gradients are complete (after its last B or W), while later
        actions still run: e.g. to start the data-parallel all-reduce."""
        st = self._step = _StepState(inputs, targets, keys, grad, weights, on_stage_done,
                                     weight_work_left={s: len(inputs) for s in self.stages})
        try:
            for action in actions:
                if action.op.is_comm:
                    start = st.now()
                    if action.op in (Op.RECV_F, Op.RECV_B):
                        self._recv(action)
                    else:
                        self._send(action)
                    st.comms.append(Event(self.rank, action, start, st.now()))
                else:
                    self._compute(action)
            for work, _, action, peer in st.sends:
                self._wait(work, action, peer, "the send")
            st.sends.clear()
            partials = self._partials()
        except BaseException as err:
            for stage in self.stages.values():
                stage.clear()
            abort_others(self.transport, self.rank, err)
            raise
        finally:
            self._step = None
        for stage in self.stages.values():
            stage.losses.clear()
            stage.aux.clear()
        return RankStep(self.rank, math.nan, tuple(st.events), tuple(st.waits), st.now(), st.t0, tuple(st.comms),
                        partials=partials)

    # --- compute -------------------------------------------------------------------------------------
    def _compute(self, action: Action) -> None:
        st, s, mb = self._step, action.stage, action.mb
        stage = self.stages[s]
        needs = received_input(action, self.num_stages)
        if action.op is Op.F:
            x = self._input(needs, action) if needs is not None else st.inputs[mb]
            target = st.targets[mb] if stage.is_last and st.targets is not None else None
            start = st.now()
            out = stage.forward(mb, x, target=target, weights=st.weights, grad=st.grad)
            if out is not None:
                st.outputs[(s, mb)] = out.signature
                st.local[produces(action)] = out
                self._post_known_deferred()
        elif action.op in (Op.B, Op.I):
            grads = self._input(needs, action) if needs is not None else None
            start = st.now()
            grads_in = stage.backward(mb, grads) if action.op is Op.B else stage.backward_input(mb, grads)
            if s > 0:
                st.local[produces(action)] = grads_in
        else:
            start = st.now()
            stage.backward_weight(mb)
        st.events.append(Event(self.rank, action, start, st.now()))
        if finishes_weights(action):
            st.weight_work_left[s] -= 1
            if st.weight_work_left[s] == 0 and st.on_stage_done is not None:
                st.on_stage_done(s)
        self._reap_sends()

    def _input(self, value: Value, action: Action) -> Packet | list[torch.Tensor]:
        """A compute action's input from another stage: passed locally on this rank, or received."""
        st = self._step
        if self.stage_to_rank[value.stage] == self.rank:
            return st.local.pop(value)
        if value not in st.posted:
            self._post_deferred_through(value)
        posted = st.posted.pop(value)
        start = st.now()
        for work in posted.works:
            self._wait(work, posted.action, posted.peer, describe(value), waiting_in=action)
        st.waits.append(Event(self.rank, action, start, st.now()))
        return Packet(posted.buffers, posted.signature) if value.kind is ACT else posted.buffers

    # --- transfers -----------------------------------------------------------------------------------
    def _signature(self, value: Value) -> Signature | None:
        """The signature of the activation `value` is shaped like (`shaped_like`), if known without a message."""
        act = shaped_like(value)
        return self._step.outputs.get((act.stage, act.mb)) or self._known.get((act.stage, self._step.keys[act.mb]))

    def _recv(self, action: Action) -> None:
        value = message_of(action)
        peer = self.stage_to_rank[value.stage]
        deferred = self._step.deferred
        if deferred[peer] or self._signature(value) is None:
            # not known yet: post when a compute action needs it (or its shape is learned), keeping the order
            deferred[peer].append((value, action))
        else:
            self._post_recv(value, action, peer)

    def _post_known_deferred(self) -> None:
        """Post deferred receives at the head of each peer's queue whose shapes are now known."""
        for peer, queue in self._step.deferred.items():
            while queue and self._signature(queue[0][0]) is not None:
                value, action = queue.pop(0)
                self._post_recv(value, action, peer)

    def _post_deferred_through(self, value: Value) -> None:
        peer = self.stage_to_rank[value.stage]
        queue = self._step.deferred[peer]
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
            if value.kind is not ACT:
                raise CommError(f"{rank_name(self.transport, self.rank)}: {action} receives {describe(value)} "
                                "before this rank computed the activation it belongs to; the schedule is invalid")
            signature = self._recv_signature(value, action, peer)
        shapes = signature.leaves if value.kind is ACT else [signature.leaves[i] for i in signature.grad_leaves]
        buffers = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype, _ in shapes]
        works = [self.transport.irecv(buffer, peer) for buffer in buffers]
        self._step.posted[value] = _Posted(works, buffers, signature, action, peer)

    def _recv_signature(self, value: Value, action: Action, peer: int) -> Signature:
        what = f"the shapes of {describe(value)}"
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._wait(self.transport.irecv(length, peer), action, peer, what)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self._wait(self.transport.irecv(data, peer), action, peer, what)
        signature = Signature.from_bytes(data)
        self._known[(value.stage, self._step.keys[value.mb])] = signature
        return signature

    def _send(self, action: Action) -> None:
        value = message_of(action)
        peer = self.stage_to_rank[consumer_stage(value)]
        payload = self._step.local.pop(value)
        if isinstance(payload, Packet):
            self._send_signature_if_new(value, payload.signature, action, peer)
            tensors = payload.leaves
        else:
            tensors = payload
        for tensor in tensors:
            tensor = tensor.contiguous()
            self._step.sends.append((self._post_send(tensor, peer, action), tensor, action, peer))

    def _send_signature_if_new(self, value: Value, signature: Signature, action: Action, peer: int) -> None:
        key = (value.stage, self._step.keys[value.mb])
        known = self._known.get(key)
        if known is None:
            data = signature.to_bytes().to(self.device)
            for tensor in (torch.tensor([data.numel()], dtype=torch.int64, device=self.device), data):
                self._step.sends.append((self._post_send(tensor, peer, action), tensor, action, peer))
            self._known[key] = signature
        elif known != signature:
            raise ValueError(f"{action}: stage {value.stage}'s output for microbatch {value.mb} is "
                             f"{signature.describe()}, but an earlier microbatch with the same input shapes gave "
                             f"{known.describe()}. The shapes between stages must follow from the shapes of the "
                             "microbatch, not from its values: pad data-dependent sizes to a fixed bound")

    def _post_send(self, tensor: torch.Tensor, peer: int, action: Action) -> Work:
        try:
            return self.transport.isend(tensor, peer)
        except CommError as err:  # a peer that closed its connection: say which action found out
            raise CommError(f"{action}: {err}") from err

    def _reap_sends(self) -> None:
        """Drop finished sends so their tensors can be freed."""
        st = self._step
        if st.sends:
            st.sends = [s for s in st.sends if not s[0].is_completed()]

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
            results = [last.losses[m] for m in range(len(self._step.inputs))]
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
