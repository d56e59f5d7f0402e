"""Simulated vs measured: fit per-action costs from a measured step, simulate it, report the error."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .actions import Op, Value, message_of
from .base import Schedule
from .simulate import Costs, SimResult, simulate
from .timeline import Timeline


@dataclass(frozen=True)
class Comparison:
    measured: Timeline
    predicted: SimResult
    costs: Costs  # what the simulator was given: see `measured_costs`

    @property
    def measured_step_time(self) -> float:
        return self.measured.step_time()

    @property
    def step_time_error(self) -> float:
        """(predicted - measured) / measured step time."""
        return (self.predicted.step_time - self.measured_step_time) / self.measured_step_time

    def report(self) -> str:
        lines = [f"{'':10s} {'measured':>10s} {'simulated':>10s}",
                 f"{'step time':10s} {self.measured_step_time * 1e3:9.2f}ms {self.predicted.step_time * 1e3:9.2f}ms"
                 f"   error {self.step_time_error:+.1%}"]
        for m, p in zip(self.measured.per_rank(), self.predicted.per_rank, strict=True):
            lines.append(f"{'rank ' + str(m.rank) + ' idle':10s} {m.bubble_fraction:10.1%} {p.bubble_fraction:10.1%}")
        lines.append(f"costs given to the simulator: transfer {self.costs.comm * 1e3:.3f}ms, posting a send/recv "
                     f"{self.costs.post * 1e3:.3f}ms; per stage (ms) "
                     + ", ".join(f"{s}: F {_ms(self.costs.f, s)} I {_ms(self.costs.b, s)} W {_ms(self.costs.w, s)}"
                                 for s in range(len(self.costs.f))))
        return "\n".join(lines)


def _ms(values, stage: int) -> str:
    return f"{values[stage] * 1e3:.2f}"


def measured_costs(schedule: Schedule, measured: Timeline) -> Costs:
    """Per-action costs from a measured step, all means (the step is a sum of them along a path):

    - F, I and W of each stage (a full B counts as I, with W = 0), each plus its rank's overhead: the part
      of the rank's span (first to last action) outside actions and waits -- the executor's own Python --
      shared over its compute actions;
    - `post`: posting one SEND or RECV; `comm`: a transfer (see `_transfer_time`).
    """
    durations: dict[tuple[int, Op], list[float]] = {}
    posts = []
    accounted = [0.0] * measured.num_ranks
    computes = [0] * measured.num_ranks
    first = [float("inf")] * measured.num_ranks
    last = [0.0] * measured.num_ranks
    for e in (*measured.events, *measured.waits):
        accounted[e.rank] += e.duration
        first[e.rank] = min(first[e.rank], e.start)
        last[e.rank] = max(last[e.rank], e.end)
    for e in measured.events:
        if e.action.op.is_comm:
            posts.append(e.duration)
        else:
            computes[e.rank] += 1
            durations.setdefault((e.action.stage, e.action.op), []).append(e.duration)
    # the executor's own time: a rank's span (first to last action) not covered by actions or waits
    overhead = [max(0.0, last[r] - first[r] - accounted[r]) / computes[r] if computes[r] else 0.0
                for r in range(measured.num_ranks)]

    def mean(stage: int, *ops: Op) -> float:
        for op in ops:
            if (stage, op) in durations:
                return statistics.fmean(durations[(stage, op)]) + overhead[schedule.stage_to_rank[stage]]
        return 0.0

    stages = range(schedule.num_stages)
    return Costs(f=[mean(s, Op.F) for s in stages], b=[mean(s, Op.I, Op.B) for s in stages],
                 w=[mean(s, Op.W) for s in stages], comm=_transfer_time(measured),
                 post=statistics.fmean(posts) if posts else 0.0)


BLOCKED = 1e-4  # seconds: a shorter wait found its data already there, and says nothing about transfers


def _transfer_time(measured: Timeline) -> float:
    """Median transfer time: from the later of a message's SEND and RECV postings (a transfer starts when
    both sides have posted, as in the simulator) to the end of a wait that blocked on it."""
    sent: dict[Value, float] = {}
    posted: dict[tuple[int, Value], float] = {}
    for e in measured.events:
        if e.action.op in (Op.SEND_F, Op.SEND_B):
            sent[message_of(e.action)] = e.end
        elif e.action.op in (Op.RECV_F, Op.RECV_B):
            posted[(e.rank, message_of(e.action))] = e.end
    delays = []
    for wait in measured.waits:
        a = wait.action
        value = ("act", a.stage - 1, a.mb) if a.op is Op.F else ("grad", a.stage + 1, a.mb)
        if wait.duration > BLOCKED and value in sent and (wait.rank, value) in posted:
            delays.append(wait.end - max(sent[value], posted[(wait.rank, value)]))
    return statistics.median(delays) if delays else 0.0


def compare(schedule: Schedule, measured: Timeline) -> Comparison:
    costs = measured_costs(schedule, measured)
    return Comparison(measured, simulate(schedule, costs), costs)
