"""The executor: runs one rank's lowered action list; every wait is bounded and names its peer."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .comm import CommError, Transport, Work, rank_name
from .schedule.actions import Action, Op, Value, consumer_stage, message_of
from .schedule.simulate import describe
from .schedule.timeline import Event
from .stage import Stage

# The first transfer of each stage boundary is preceded by a small message with its shape and dtype;
# after the first step the receive buffers' shapes are known and frozen.
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]
_META_LEN = 16  # dtype code, ndim, then up to 14 sizes

Shape = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class RankStep:
    """What one rank measured in one step: compute events, waits, and its step time (seconds)."""

    rank: int
    loss: float
    events: tuple[Event, ...]  # compute actions; times in seconds from `t0`
    waits: tuple[Event, ...]
    step_time: float
    t0: float  # time.perf_counter() at the start of the step (one clock for all processes of a host)
    comms: tuple[Event, ...] = ()  # SEND/RECV postings

    @property
    def busy_time(self) -> float:
        return sum(e.duration for e in self.events)

    @property
    def bubble_fraction(self) -> float:
        return 1.0 - self.busy_time / self.step_time if self.step_time > 0 else 0.0


class Executor:
    """Runs lowered action lists for the stages of one rank over a transport."""

    def __init__(self, *, rank: int, stage_to_rank: Sequence[int], stages: dict[int, Stage],
                 transport: Transport, timeout: float) -> None:
        self.rank = rank
        self.stage_to_rank = tuple(stage_to_rank)
        self.num_stages = len(self.stage_to_rank)
        self.stages = stages
        self.transport = transport
        self.timeout = timeout
        self.device = transport.device
        self.recv_shapes: dict[tuple[str, int], Shape] = {}
        self.send_shapes: dict[tuple[str, int], Shape] = {}

    # --- one step ----------------------------------------------------------------------------------
    def run(self, actions: Sequence[Action], *, inputs: Sequence[torch.Tensor] | None,
            targets: Sequence[torch.Tensor] | None, num_microbatches: int, grad: bool,
            loss_scale: float | None = None, on_stage_done: Callable[[int], None] | None = None) -> RankStep:
        """Run one step's actions. Each microbatch loss is scaled by `loss_scale` (default 1/M) for backward.

        `on_stage_done(stage)` is called as soon as a stage's weight gradients are complete (after its
        last B or W), while later actions still run: e.g. to start the data-parallel all-reduce."""
        self._loss_scale = 1.0 / num_microbatches if loss_scale is None else loss_scale
        self._on_stage_done = on_stage_done
        self._weight_work_left = {s: num_microbatches for s in self.stages}
        self._t0 = time.perf_counter()
        self._posted: dict[Value, tuple[Work, torch.Tensor, Action, int]] = {}
        self._deferred: dict[int, list[tuple[Value, Action]]] = defaultdict(list)
        self._sends: list[tuple[Work, torch.Tensor, Action, int]] = []
        self._local: dict[Value, torch.Tensor] = {}
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
                    self._compute(action, inputs, targets, num_microbatches, grad)
            for work, _, action, peer in self._sends:
                self._wait(work, action, peer, "the send")
            self._sends.clear()
            loss = self._share_loss(num_microbatches)
        except BaseException:
            for stage in self.stages.values():
                stage.clear()
            raise
        for stage in self.stages.values():
            stage.losses.clear()
        return RankStep(self.rank, loss, tuple(self._events), tuple(self._waits), self._now(), self._t0,
                        tuple(self._comms))

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    # --- compute -------------------------------------------------------------------------------------
    def _compute(self, action: Action, inputs, targets, num_microbatches: int, grad: bool) -> None:
        s, mb = action.stage, action.mb
        stage = self.stages[s]
        if action.op is Op.F:
            if s == 0:
                x = _pick(inputs, mb, "inputs", s)
            else:
                x = self._input(("act", s - 1, mb), action)
            target = _pick(targets, mb, "targets", s) if stage.is_last else None
            start = self._now()
            out = stage.forward(mb, x, target=target, loss_scale=self._loss_scale, grad=grad)
            if out is not None:
                self._local[("act", s, mb)] = out
        elif action.op in (Op.B, Op.I):
            g = None if stage.is_last else self._input(("grad", s + 1, mb), action)
            start = self._now()
            grad_in = stage.backward(mb, g) if action.op is Op.B else stage.backward_input(mb, g)
            if grad_in is not None and s > 0:
                self._local[("grad", s, mb)] = grad_in
        else:
            start = self._now()
            stage.backward_weight(mb)
        self._events.append(Event(self.rank, action, start, self._now()))
        if action.op in (Op.B, Op.W):  # each microbatch's weight gradients are finished by one B or one W
            self._weight_work_left[s] -= 1
            if self._weight_work_left[s] == 0 and self._on_stage_done is not None:
                self._on_stage_done(s)
        self._reap_sends()

    def _input(self, value: Value, action: Action) -> torch.Tensor:
        """A compute action's input: passed locally by a stage on this rank, or received."""
        if self.stage_to_rank[value[1]] == self.rank:
            return self._local.pop(value)
        if value not in self._posted:
            self._post_deferred_through(value)
        work, buf, recv_action, peer = self._posted.pop(value)
        start = self._now()
        self._wait(work, recv_action, peer, describe(value), waiting_in=action)
        self._waits.append(Event(self.rank, action, start, self._now()))
        return buf

    # --- transfers -----------------------------------------------------------------------------------
    def _recv(self, action: Action) -> None:
        value = message_of(action)
        peer = self.stage_to_rank[value[1]]
        if self._deferred[peer] or value[:2] not in self.recv_shapes:
            # shape not known yet (first step): post when a compute action needs it, keeping the order
            self._deferred[peer].append((value, action))
        else:
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
        key = value[:2]
        if key not in self.recv_shapes:
            meta = torch.zeros(_META_LEN, dtype=torch.int64, device=self.device)
            self._wait(self.transport.irecv(meta, peer), action, peer, f"the shape of {describe(value)}")
            self.recv_shapes[key] = _decode(meta)
        shape, dtype = self.recv_shapes[key]
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        self._posted[value] = (self.transport.irecv(buf, peer), buf, action, peer)

    def _send(self, action: Action) -> None:
        value = message_of(action)
        peer = self.stage_to_rank[consumer_stage(value)]
        tensor = self._local.pop(value).contiguous()
        key, shape = value[:2], (tuple(tensor.shape), tensor.dtype)
        if key not in self.send_shapes:
            if value[0] == "act" and not tensor.is_floating_point():
                raise TypeError(f"stage {value[1]} outputs a {tensor.dtype} tensor; tensors between stages "
                                "must be floating point so gradients can flow back: keep integer-valued "
                                "layers (e.g. the token embedding's input) inside the first stage")
            meta = _encode(tensor)
            self._sends.append((self.transport.isend(meta, peer), meta, action, peer))
            self.send_shapes[key] = shape
        elif shape != self.send_shapes[key]:
            raise ValueError(f"{action}: stage {value[1]} produced shape {shape[0]} {shape[1]}, but the first "
                             f"step froze {self.send_shapes[key][0]} {self.send_shapes[key][1]}; every step "
                             "must use the same batch and microbatch shapes (build a new Pipeline to change them)")
        self._sends.append((self.transport.isend(tensor, peer), tensor, action, peer))

    def _reap_sends(self) -> None:
        """Drop finished sends so their tensors can be freed."""
        if self._sends:
            self._sends = [s for s in self._sends if not s[0].is_completed()]

    def _wait(self, work: Work, action: Action | str, peer: int, what: str, *,
              waiting_in: Action | None = None) -> None:
        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as err:  # gloo raises RuntimeError, in-process TimeoutError
            waited = time.perf_counter() - start
            how = (f"timed out after {self.timeout:g}s" if waited >= 0.99 * self.timeout
                   else f"failed after {waited:.1f}s")
            inside = f" (needed by {waiting_in})" if waiting_in is not None else ""
            them = rank_name(self.transport, peer)
            raise CommError(
                f"{rank_name(self.transport, self.rank)}: {action}{inside} waiting on {them} for {what} {how}: "
                f"{err}. The peer ({them}) may have crashed or be stuck; check its log") from err

    # --- loss ----------------------------------------------------------------------------------------
    def _share_loss(self, num_microbatches: int) -> float:
        """The mean microbatch loss, computed by the last stage's rank and sent to every other rank."""
        last_rank = self.stage_to_rank[-1]
        if self.rank == last_rank:
            losses = self.stages[self.num_stages - 1].losses
            loss = torch.stack([losses[m].double() for m in range(num_microbatches)]).mean().reshape(1)
            loss = loss.to(self.device)
            works = [(self.transport.isend(loss, r), r) for r in range(self.transport.world_size) if r != self.rank]
            for work, r in works:
                self._wait(work, "the loss exchange", r, "the loss")
            return float(loss.item())
        buf = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._wait(self.transport.irecv(buf, last_rank), "the loss exchange", last_rank, "the loss")
        return float(buf.item())


def _pick(tensors, mb: int, name: str, stage: int) -> torch.Tensor:
    if tensors is None:
        raise ValueError(f"stage {stage} needs `{name}` but step() got None on this rank; pass the same batch "
                         "to step() on every rank")
    return tensors[mb]


def _encode(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _META_LEN - 2:
        raise ValueError(f"tensors between stages may have at most {_META_LEN - 2} dims, got {tensor.dim()}")
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"cannot send {tensor.dtype} between stages; supported: {_DTYPES}")
    meta = torch.zeros(_META_LEN, dtype=torch.int64)
    meta[0], meta[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    meta[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return meta.to(tensor.device)


def _decode(meta: torch.Tensor) -> Shape:
    values = meta.tolist()
    ndim = values[1]
    return tuple(values[2:2 + ndim]), _DTYPES[values[0]]
