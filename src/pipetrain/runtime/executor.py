"""The executor: runs one rank's lowered action list, training's (F/B/I/W) or generation's (P/D); every value
crosses in the one wire format (`wire`), and every wait is bounded and names its peer."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from ..schedule.actions import (
    ACT,
    PASS,
    Action,
    Op,
    Value,
    consumer,
    describe,
    message_of,
    produces,
    received_input,
    shaped_like,
)
from ..schedule.timeline import Event, Timeline, covered_time
from .comm import CommError, Transport, abort_others, rank_name, refuse_if_stopped
from .overlap import FORWARD, Lanes
from .stage import UNWEIGHTED, LossWeights, Stage
from .values import Packet, Signature, batch_check, describe_key, flatten, unflatten
from .vocabulary import VocabularyShard
from .vocabulary_embedding import EmbeddingShard
from .wire import HEADER_BYTES, MIN_CAPACITY, Link, Posted, Wire, direct, envelope_size, unpack

_OPS = list(Op)

# What the step's all-reduce carries (one small float64 vector; see `RankStep.partials`)
LOSS_SUM, LOSS_COUNT, AUX_SUM, PAIR_LOSSES, AUX_LOSSES = range(5)


@dataclass(frozen=True)
class RankStep:
    """What one rank measured in one step (or generate call): compute events, waits, and its time (seconds)."""

    rank: int
    loss: float  # the step's loss, the same on every rank (nan until the pipeline has reduced the partials)
    events: tuple[Event, ...]  # compute actions; times in seconds from `t0`
    waits: tuple[Event, ...]
    step_time: float
    t0: float  # time.perf_counter() at the start of the step (one clock for all processes of a host)
    comms: tuple[Event, ...] = ()  # SEND/RECV postings
    all_to_all: tuple[Event, ...] = ()  # waits on all-to-alls inside compute that nothing hid (`Lanes.stalls`)
    aux_loss: float = 0.0  # the auxiliary losses' weighted sum (1/M per microbatch, mean over replicas)
    token_mean: bool = False  # loss_fn returned (loss_sum, count): `loss` is the step's token mean
    tokens: float = 0.0  # the count behind `loss` over every replica (a token mean), or M x replicas
    partials: torch.Tensor | None = None  # this rank's [loss sum, count, aux sum, pair losses, aux losses]

    @property
    def busy_time(self) -> float:
        """Time in compute actions (an overlapped pair's two counted once)."""
        return covered_time(sorted(self.events, key=lambda e: (e.start, e.end)))

    @property
    def bubble_fraction(self) -> float:
        return 1.0 - self.busy_time / self.step_time if self.step_time > 0 else 0.0


PassOutput = tuple[Any, torch.Tensor | None]  # (a tree of tensors or None, the kept rows or None)


class Passes(Protocol):
    """What a generation schedule's P/D actions compute (`generation.passes.RankPasses`): `run` one pass of a
    group through a stage on its input (None: the stage-0 prefill, which reads the prompts) and return what
    goes to the group's next pass, or None where nothing does. A `keep` of the group's previous rows says
    which sequences go on; an empty one that the whole group has finished: the executor then skips the
    group's later passes on that stage and tells `finish(stage, group)` (to free its caches)."""

    def run(self, action: Action, x: Any, keep: torch.Tensor | None) -> PassOutput | None: ...

    def finish(self, stage: int, group: int) -> None: ...


class Collectives(Protocol):
    """What a training schedule's REDUCE and GATHER actions launch (`data_parallel.GradientAverager`,
    `zero.ShardedGradients`): asynchronous collectives over a stage's data-parallel replicas. The caller waits
    for the reductions after the step; a stage's F waits for its gather (`wait_gathered` says whether one was
    still running)."""

    def reduce(self, stage: int) -> None: ...

    def gather(self, stage: int) -> None: ...

    def wait_gathered(self, stage: int) -> bool: ...

    def before_backward(self, stage: int) -> None: ...


@dataclass
class _Incoming:
    """A value's receive, posted ahead of the compute action that needs it (or, the first time its shapes
    cross, already received: `leaves`)."""

    signature: Signature
    action: Action  # the RECV
    posted: Posted | None = None
    shapes: Sequence = ()
    leaves: list[torch.Tensor] | None = None


@dataclass
class _StepState:
    """Everything one `Executor.run` (or `run_passes`) creates: its microbatches, what it has posted and kept,
    and what it measured. A new one per run, so nothing of a step outlives it."""

    inputs: Sequence[Any] = ()
    targets: Sequence[Any] | None = None
    keys: Sequence[Hashable] = ()
    grad: bool = False
    weights: LossWeights = UNWEIGHTED
    reductions: Collectives | None = None  # what REDUCE launches (None: skipped)
    collectives: Collectives | None = None  # what GATHER launches (None: skipped)
    passes: Passes | None = None  # generation
    t0: float = field(default_factory=time.perf_counter)
    posted: dict[Value, _Incoming] = field(default_factory=dict)
    deferred: dict[int, list[tuple[Value, Action]]] = field(default_factory=lambda: defaultdict(list))  # per peer
    local: dict[Value, Any] = field(default_factory=dict)  # passed between own stages, or waiting for its SEND
    outputs: dict[tuple[int, int], Signature] = field(default_factory=dict)  # (stage, mb) -> output signature
    links_in: dict[int, Link] = field(default_factory=dict)  # generation: peer -> link
    links_out: dict[int, Link] = field(default_factory=dict)
    arrived: dict[Value, Any] = field(default_factory=dict)  # generation: envelopes received before needed
    finished: set[tuple[int, int]] = field(default_factory=set)  # generation: (stage, group) whose group ended
    events: list[Event] = field(default_factory=list)
    comms: list[Event] = field(default_factory=list)
    waits: list[Event] = field(default_factory=list)
    all_to_all: list[Event] = field(default_factory=list)
    partials: torch.Tensor | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0


class Executor:
    """Runs lowered action lists for the stages of one rank over a transport.

    Shapes between stages: a transfer's receive buffer is sized from the value's `Signature`. An
    activation's signature is keyed by (producing stage, the microbatch's shape key): the first transfer
    with a new key carries the signature in its envelope and is received at `MIN_CAPACITY` (plus its
    remainder), later ones are received at their exact size. Every rank computes the same keys from the
    same batch, so sender and receiver always agree on the size. A gradient's shapes follow from the
    signature of the activation it belongs to. Generation's values carry their own (see `wire`).
    """

    def __init__(self, *, rank: int, stage_to_rank: Sequence[int], stages: dict[int, Stage],
                 transport: Transport, timeout: float, lanes: Lanes | None = None,
                 vocabulary: VocabularyShard | None = None, embedding: EmbeddingShard | None = None) -> None:
        self.rank = rank
        self.vocabulary = vocabulary  # this rank's shard of a vocabulary-parallel head (its S and T actions)
        self.embedding = embedding  # and of the input embedding (its E and G actions)
        self.lanes = lanes if lanes is not None else Lanes(timeout, transport.device)  # overlapped pairs
        self.stage_to_rank = tuple(stage_to_rank)
        self.num_stages = len(self.stage_to_rank)
        self.stages = stages
        self.transport = transport
        self.timeout = timeout
        self.device = transport.device
        self.wire = Wire(transport, timeout)
        self._known: dict[tuple[int, Hashable], Signature] = {}  # (stage, shape key) -> its output's signature
        self._step: _StepState | None = None  # the run in progress

    # --- one step ----------------------------------------------------------------------------------
    def run(self, actions: Sequence[Action], *, inputs: Sequence[Any], targets: Sequence[Any] | None,
            keys: Sequence[Hashable], grad: bool, weights: LossWeights = UNWEIGHTED,
            collectives: Collectives | None = None, reduce: bool = True) -> RankStep:
        """Run one step's actions over microbatches `inputs` (each a tensor or a tree of tensors).

        `keys[mb]` is the shape key of microbatch `mb`, the same on every rank. The schedule's REDUCE and
        GATHER actions launch `collectives`' (skipped without; REDUCE also with `reduce=False`: a step that
        does not sync gradients)."""
        st = _StepState(inputs, targets, keys, grad, weights, collectives if reduce else None,
                        collectives)
        self._execute(st, actions)
        for stage in self.stages.values():
            stage.losses.clear()
            stage.aux.clear()
        if self.vocabulary is not None:
            self.vocabulary.losses.clear()
        return RankStep(self.rank, math.nan, tuple(st.events), tuple(st.waits), st.now(), st.t0, tuple(st.comms),
                        tuple(st.all_to_all), partials=st.partials)

    def run_passes(self, actions: Sequence[Action], passes: Passes, *, history: int) -> RankStep:
        """Run one generate call's lowered circulation actions (P/D), each pass computed by `passes`. Each
        generation link keeps a receive posted ahead, sized from its last `history` envelopes."""
        st = _StepState(passes=passes)
        last = self.num_stages - 1
        mine = [s for s, r in enumerate(self.stage_to_rank) if r == self.rank]
        sources = {self.stage_to_rank[s - 1 if s else last] for s in mine} - {self.rank}
        targets = {self.stage_to_rank[s + 1 if s < last else 0] for s in mine} - {self.rank}
        st.links_out = {peer: Link(self.wire, peer, history, receiving=False) for peer in targets}
        st.links_in = {peer: Link(self.wire, peer, history, receiving=True) for peer in sources}
        self._execute(st, actions)
        return RankStep(self.rank, math.nan, tuple(st.events), tuple(st.waits), st.now(), st.t0, tuple(st.comms))

    def _execute(self, st: _StepState, actions: Sequence[Action]) -> None:
        refuse_if_stopped(self.transport)
        self._step = st
        self.lanes.stalls.clear()
        try:
            paired_with_previous = False
            for i, action in enumerate(actions):
                if action.paired:
                    if not paired_with_previous:
                        raise ValueError(f"{action} pairs with the action before it, which must be a compute action "
                                         "of its own: check the schedule (`pipetrain.schedules.check`)")
                    paired_with_previous = False
                    continue
                paired_with_previous = i + 1 < len(actions) and actions[i + 1].paired and action.op.is_compute
                if paired_with_previous:
                    self._compute_pair(action, actions[i + 1])
                elif action.op.is_comm:
                    start = st.now()
                    if action.op is Op.SEND_F or action.op is Op.SEND_B or action.op is Op.SEND_P:
                        self._send(action)
                    elif action.op is not Op.RECV_P:  # (generation's links keep their receive posted)
                        self._recv(action)
                    st.comms.append(Event(self.rank, action, start, st.now()))
                elif action.op is Op.REDUCE:
                    if st.reductions is not None:
                        start = st.now()
                        st.reductions.reduce(action.stage)
                        st.comms.append(Event(self.rank, action, start, st.now()))
                elif action.op is Op.GATHER:
                    if st.collectives is not None:
                        start = st.now()
                        st.collectives.gather(action.stage)
                        st.comms.append(Event(self.rank, action, start, st.now()))
                elif action.op is Op.P or action.op is Op.D:
                    self._pass(action)
                else:
                    self._compute(action)
            if st.passes is not None:
                self._close_links()
            self.wire.wait_sends()
            if self.vocabulary is not None and st.passes is None:
                self.vocabulary.finish()
                self.embedding.finish()
            st.partials = self._partials() if st.passes is None else None
        except BaseException as err:
            for stage in self.stages.values():
                stage.clear()
            if self.vocabulary is not None:
                self.vocabulary.clear()
                self.embedding.clear()
            self.wire.sends.clear()
            abort_others(self.transport, self.rank, err)
            raise
        finally:
            self._step = None

    # --- compute -------------------------------------------------------------------------------------
    def _compute(self, action: Action) -> None:
        st = self._step
        run = self._prepare(action)
        start = st.now()
        self._keep(action, run())
        st.events.append(Event(self.rank, action, start, st.now()))
        self._stalls((action, action))
        self.wire.reap()

    def _compute_pair(self, first: Action, second: Action) -> None:
        """An overlapped pair (`schedule.overlap`): both inputs first, then the forward here and the backward on
        the lanes' thread, taking turns at their all-to-alls (`Lanes`); both results leave afterwards."""
        st = self._step
        forward, backward = (first, second) if first.op is Op.F else (second, first)
        runs = {forward: self._prepare(forward), backward: self._prepare(backward)}
        start = st.now()
        results = self.lanes.run(runs[forward], runs[backward])
        end = st.now()
        for action, result in zip((forward, backward), results, strict=True):
            self._keep(action, result)
        st.events += [Event(self.rank, first, start, end), Event(self.rank, second, start, end)]
        self._stalls((forward, backward))
        self.wire.reap()

    def _prepare(self, action: Action) -> Callable[[], Any]:
        """Bring a compute action's input (received or local) and return its computation."""
        st, s, mb = self._step, action.stage, action.mb
        stage = self.stages[s]
        needs = received_input(action, self.num_stages)
        if action.op is Op.F:
            x = self._input(needs, action) if needs is not None else st.inputs[mb]
            target = st.targets[mb] if stage.is_last and st.targets is not None else None
            start = st.now()
            if st.collectives is not None and st.collectives.wait_gathered(s):
                st.waits.append(Event(self.rank, Action(s, Op.GATHER, 0), start, st.now()))
            extra = [self.embedding.first_input(mb, x, grad=st.grad)] if needs is None and self.embedding else []
            return partial(stage.forward, mb, x, target=target, weights=st.weights, grad=st.grad, extra=extra)
        if action.op is Op.E:
            return partial(self.embedding.lookup, mb, st.inputs[mb])
        if action.op is Op.G:
            return partial(self.embedding.backward, mb, st.inputs[mb])
        if action.op is Op.S:
            return partial(self.vocabulary.forward, mb, st.targets[mb], grad=st.grad)
        if action.op is Op.T:
            return partial(self.vocabulary.backward, mb, st.weights)
        if action.op is Op.B or action.op is Op.I:
            grads = self._input(needs, action) if needs is not None else None
            if needs is None and self.vocabulary is not None and stage.is_last:
                grads = [self.vocabulary.output_gradient(mb)]
            if st.reductions is not None:  # (gradients accumulate into the buffer their reduction reads)
                st.reductions.before_backward(s)
            return partial(stage.backward if action.op is Op.B else stage.backward_input, mb, grads)
        return partial(stage.backward_weight, mb)

    def _keep(self, action: Action, result: Any) -> None:
        """Keep what a compute action produced for the transfer or local use that takes it."""
        st = self._step
        if action.op is Op.F:
            if result is not None and self.vocabulary is not None and action.stage == self.num_stages - 1:
                self.vocabulary.send_hidden(action.mb, _hidden_state(result, action))
            elif result is not None:
                st.outputs[(action.stage, action.mb)] = result.signature
                st.local[produces(action)] = result
                self._post_known_deferred()
        elif (action.op is Op.B or action.op is Op.I) and action.stage > 0:
            st.local[produces(action)] = result
        elif (action.op is Op.B or action.op is Op.I) and self.embedding is not None:
            self.embedding.send_gradient(action.mb, result[-1])  # (the first stage's input: the embedding)

    def _stalls(self, lanes: tuple[Action, Action]) -> None:
        """The all-to-all waits the last compute recorded, as events of the action that waited (by lane:
        forward, backward; outside a pair both are the one action)."""
        st = self._step
        for lane, start, end in self.lanes.stalls:
            action = lanes[lane if lane is not None else FORWARD]
            st.all_to_all.append(Event(self.rank, action, start - st.t0, end - st.t0))
        self.lanes.stalls.clear()

    def _input(self, value: Value, action: Action) -> Packet | list[torch.Tensor]:
        """A compute action's input from another stage: passed locally on this rank, or received."""
        st = self._step
        if self.stage_to_rank[value.stage] == self.rank:
            return st.local.pop(value)
        if value not in st.posted:
            self._post_deferred_through(value)
        incoming = st.posted.pop(value)
        start = st.now()
        leaves = incoming.leaves
        if leaves is None:
            posted = incoming.posted
            if not posted.work.is_completed():  # (the words of a wait that may fail: only for one that waits)
                self.wire.wait(posted, what=describe(value), doing=f"{incoming.action} (needed by {action})")
            leaves = [posted.body] if direct(incoming.shapes) else unpack(posted.body, HEADER_BYTES, incoming.shapes)
        st.waits.append(Event(self.rank, action, start, st.now()))
        return Packet(leaves, incoming.signature) if value.kind is ACT else leaves

    # --- generation ----------------------------------------------------------------------------------
    def _pass(self, action: Action) -> None:
        st, s, g = self._step, action.stage, action.mb
        if (s, g) in st.finished:
            return
        needs = received_input(action, self.num_stages)
        x = keep = None
        if needs is not None:
            x, keep = (st.local.pop(needs) if self.stage_to_rank[needs.stage] == self.rank
                       else self._receive_pass(needs, action))
        start = st.now()
        if keep is not None and keep.numel() == 0:  # the group has finished: pass that on, free its caches
            st.finished.add((s, g))
            st.passes.finish(s, g)
            out = (None, keep) if s < self.num_stages - 1 else None
        else:
            out = st.passes.run(action, x, keep)
        st.events.append(Event(self.rank, action, start, st.now()))
        if out is not None:
            st.local[produces(action)] = out
        self.wire.reap()

    def _receive_pass(self, value: Value, action: Action) -> tuple[Any, torch.Tensor | None]:
        """A pass's input from another rank: envelopes arrive in the sender's order and say what they are."""
        st = self._step
        start = st.now()
        link = st.links_in[self.stage_to_rank[value.stage]]
        while value not in st.arrived:
            envelope = link.receive(what=describe(value), doing=action)
            if envelope is None:
                raise CommError(f"{rank_name(self.transport, self.rank)}: {action} needs {describe(value)}, but "
                                f"{rank_name(self.transport, link.peer)} closed its generation link before sending it")
            st.arrived[envelope.value] = envelope
        envelope = st.arrived.pop(value)
        st.waits.append(Event(self.rank, action, start, st.now()))
        x = unflatten(envelope.leaves, envelope.signature.spec) if envelope.signature is not None else None
        return x, envelope.keep

    def _close_links(self) -> None:
        """End every outgoing link and check every incoming one ended: no envelope may come after the last
        pass (and no receive may stay posted)."""
        st = self._step
        for peer, link in st.links_out.items():
            self.wire.end(peer, link.capacity)
        for peer, link in st.links_in.items():
            envelope = link.receive(what="the end of generation", doing="closing the generation links")
            if envelope is not None:
                raise CommError(f"{rank_name(self.transport, self.rank)}: {describe(envelope.value)} came from "
                                f"{rank_name(self.transport, peer)} after this rank's last pass that needs it")
        if st.arrived:
            value = next(iter(st.arrived))
            raise CommError(f"{rank_name(self.transport, self.rank)}: {describe(value)} arrived but no pass of this "
                            f"rank used it ({len(st.arrived)} unused): the schedule's passes and the sender disagree")

    # --- transfers -----------------------------------------------------------------------------------
    def _signature(self, value: Value) -> Signature | None:
        """The signature of the activation `value` is shaped like (`shaped_like`), if known without a message."""
        act = shaped_like(value)
        return self._step.outputs.get((act.stage, act.mb)) or self._known.get((act.stage, self._step.keys[act.mb]))

    def _recv(self, action: Action) -> None:
        value = message_of(action, self.num_stages)
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
        if signature is None:  # the first time these shapes cross: the envelope brings them (size unknown)
            if value.kind is not ACT:
                raise CommError(f"{rank_name(self.transport, self.rank)}: {action} receives {describe(value)} "
                                "before this rank computed the activation it belongs to; the schedule is invalid")
            header, body = self.wire.take(self.wire.post(peer, MIN_CAPACITY), what=f"the shapes of {describe(value)}",
                                          doing=action)
            envelope = self.wire.open(peer, header, body)
            key = self._step.keys[value.mb]
            if envelope.batch and envelope.batch != batch_check(key):
                raise ValueError(f"{rank_name(self.transport, self.rank)} and {rank_name(self.transport, peer)} were "
                                 f"given differently shaped batches: microbatch {value.mb} holds "
                                 f"{describe_key(key)} here, other shapes there. Pass step() the same batch on "
                                 "every rank (the ranks use its shapes to agree on the shapes between stages)")
            self._known[(value.stage, key)] = envelope.signature
            self._step.posted[value] = _Incoming(envelope.signature, action, leaves=envelope.leaves)
            return
        shapes = signature.leaves if value.kind is ACT else [signature.leaves[i] for i in signature.grad_leaves]
        posted = (self.wire.post_leaf(peer, *shapes[0][:2]) if direct(shapes)
                  else self.wire.post(peer, envelope_size(shapes)))
        self._step.posted[value] = _Incoming(signature, action, posted, shapes)

    def _send(self, action: Action) -> None:
        st = self._step
        value = message_of(action, self.num_stages)
        peer = self.stage_to_rank[consumer(value, self.num_stages)[0]]
        if value.kind is PASS:
            out = st.local.pop(value, None)
            if out is not None:  # (none: the group finished before this pass)
                tree, keep = out
                leaves, signature = [], None
                if tree is not None:
                    leaves, spec = flatten(tree, what="a generation value")
                    signature = Signature.of(leaves, spec)
                link = st.links_out[peer]
                link.sent(self.wire.send(peer, value, leaves, signature=signature, keep=keep, capacity=link.capacity,
                                         doing=action))
            return
        payload = st.local.pop(value)
        if not isinstance(payload, Packet):  # a gradient: the receiver knows its shapes
            if direct([(t.shape, t.dtype, False) for t in payload]):
                self.wire.send_leaf(peer, payload[0], doing=action)
            else:
                self.wire.send(peer, value, payload, doing=action)
            return
        if self._check_known(value, payload.signature, action):
            if direct(payload.signature.leaves):
                self.wire.send_leaf(peer, payload.leaves[0], doing=action)
            else:
                self.wire.send(peer, value, payload.leaves, signature=payload.signature, doing=action)
            return
        self.wire.send(peer, value, payload.leaves, signature=payload.signature, capacity=MIN_CAPACITY,
                       batch=batch_check(self._step.keys[value.mb]), doing=action)
        self._known[(value.stage, self._step.keys[value.mb])] = payload.signature  # (once it is sent)

    def _check_known(self, value: Value, signature: Signature, action: Action) -> bool:
        """Whether the receiver knows this output's shapes (from an earlier microbatch of the same shape key)."""
        key = (value.stage, self._step.keys[value.mb])
        known = self._known.get(key)
        if known is None:
            return False
        if known != signature:
            raise ValueError(f"{action}: stage {value.stage}'s output for microbatch {value.mb} is "
                             f"{signature.describe()}, but an earlier microbatch with the same input shapes gave "
                             f"{known.describe()}. The shapes between stages must follow from the shapes of the "
                             "microbatch, not from its values: pad data-dependent sizes to a fixed bound")
        return True

    # --- loss ----------------------------------------------------------------------------------------
    def _partials(self) -> torch.Tensor:
        """This rank's share of the step's loss and auxiliary losses, summed over ranks by the pipeline."""
        out = torch.zeros(5, dtype=torch.float64)
        last = self.stages.get(self.num_stages - 1)
        losses = self.vocabulary.losses if self.vocabulary is not None else last.losses if last is not None else {}
        if losses:
            results = [losses[m] for m in range(len(self._step.inputs))]
            pairs = sum(count is not None for _, count in results)
            if pairs not in (0, len(results)):
                raise ValueError("loss_fn returned a mean for some microbatches and a (loss_sum, count) pair for "
                                 "others; return the same kind for every microbatch")
            values = torch.stack([loss.float() for loss, _ in results]).double().cpu()  # (each exact in double)
            out[LOSS_SUM] = values.sum()
            out[LOSS_COUNT] = (sum(float(c) for _, c in results) if pairs else len(results))
            out[PAIR_LOSSES] = 1.0 if pairs else 0.0
        aux = [a.double().cpu() for stage in self.stages.values() for a in stage.aux.values()]
        if aux:
            out[AUX_SUM] = torch.stack(aux).sum()
            out[AUX_LOSSES] = len(aux)
        return out.to(self.device)


def _hidden_state(result: Packet, action: Action) -> torch.Tensor:
    """The last stage's output as a vocabulary-parallel head takes it: one floating tensor."""
    if len(result.leaves) != 1 or not result.leaves[0].is_floating_point():
        raise ValueError(f"{action}: with vocabulary parallelism the last stage's output is the head's hidden state, "
                         f"one floating tensor (*targets.shape, d); got {result.signature.describe()}")
    return result.leaves[0]


def gather_timeline(step: RankStep, transport: Transport, timeout: float, dst: int = 0) -> Timeline | None:
    """Every rank's measured `step` as one Timeline on rank `dst` (None elsewhere); collective. Two sums over
    the ranks: the row counts, then the rows, each rank filling its own slice of a zero matrix."""
    rows = [[e.action.stage, _OPS.index(e.action.op), e.action.mb, e.action.round, e.start + step.t0,
             e.end + step.t0, kind, e.action.paired]
            for kind, events in ((0, step.events + step.comms), (1, step.waits), (2, step.all_to_all)) for e in events]
    world = transport.world_size
    head = torch.zeros(world, 3, dtype=torch.float64, device=transport.device)
    head[transport.rank] = torch.tensor([len(rows), step.step_time, step.t0], dtype=torch.float64)
    transport.all_reduce(head, timeout)
    counts = [int(n) for n in head[:, 0].tolist()]
    body = torch.zeros(sum(counts), 8, dtype=torch.float64, device=transport.device)
    first = sum(counts[:transport.rank])
    if rows:
        body[first:first + len(rows)] = torch.tensor(rows, dtype=torch.float64)
    transport.all_reduce(body, timeout)
    if transport.rank != dst:
        return None
    origin = float(head[:, 2].min())
    step_times = [float(t0 + length - origin) for _, length, t0 in head.tolist()]
    kinds: tuple[list[Event], list[Event], list[Event]] = ([], [], [])  # events, waits, all-to-all waits
    for r, (start, n) in enumerate(zip([sum(counts[:r]) for r in range(world)], counts, strict=True)):
        for stage, op, mb, round_, begin, end, kind, paired in body[start:start + n].tolist():
            action = Action(int(stage), _OPS[int(op)], int(mb), int(round_), bool(paired))
            kinds[int(kind)].append(Event(r, action, begin - origin, end - origin))
    return Timeline(world, tuple(sorted(kinds[0], key=lambda e: (e.rank, e.start, e.end))),
                    tuple(sorted(kinds[1], key=lambda e: (e.rank, e.start))), tuple(step_times),
                    tuple(sorted(kinds[2], key=lambda e: (e.rank, e.start))))
