"""Simulated vs measured: fit per-action costs from a measured step, simulate it, report the error."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .actions import Action, Op, Value, message_of
from .base import Schedule
from .lowering import lower
from .simulate import Costs, SimResult, run_dataflow, simulate
from .timeline import Timeline


@dataclass(frozen=True)
class Comparison:
    measured: Timeline  # the last measured step (for pictures)
    predicted: SimResult  # simulated with the mean costs (for pictures and idle fractions)
    costs: Costs  # the mean costs: see `measured_costs`
    steps: tuple[Timeline, ...] = ()  # every measured step the costs were fitted on
    predicted_step_time: float = 0.0  # mean over simulations with resampled per-action durations

    @property
    def measured_step_time(self) -> float:
        """Mean step time over the measured steps."""
        steps = self.steps or (self.measured,)
        return statistics.fmean(t.step_time() for t in steps)

    @property
    def step_time_error(self) -> float:
        """(predicted - measured) / measured step time."""
        return (self.predicted_step_time - self.measured_step_time) / self.measured_step_time

    def report(self) -> str:
        n = len(self.steps) or 1
        lines = [f"{'':10s} {'measured':>10s} {'simulated':>10s}   ({n} step{'s' if n > 1 else ''}, mean)",
                 f"{'step time':10s} {self.measured_step_time * 1e3:9.2f}ms {self.predicted_step_time * 1e3:9.2f}ms"
                 f"   error {self.step_time_error:+.1%}"]
        steps = self.steps or (self.measured,)
        measured_idle = [statistics.fmean(t.per_rank()[r].bubble_fraction for t in steps)
                         for r in range(self.measured.num_ranks)]
        for r, p in enumerate(self.predicted.per_rank):
            lines.append(f"{'rank ' + str(r) + ' idle':10s} {measured_idle[r]:10.1%} {p.bubble_fraction:10.1%}")
        lines.append(f"costs given to the simulator: transfer {self.costs.comm * 1e3:.3f}ms, posting a send/recv "
                     f"{self.costs.post * 1e3:.3f}ms; per stage (ms) "
                     + ", ".join(f"{s}: F {_ms(self.costs.f, s)} I {_ms(self.costs.b, s)} W {_ms(self.costs.w, s)}"
                                 for s in range(len(self.costs.f))))
        return "\n".join(lines)


def _ms(values, stage: int) -> str:
    return f"{values[stage] * 1e3:.2f}"


def measured_costs(schedule: Schedule, measured: Timeline | Sequence[Timeline]) -> Costs:
    """Per-action costs from measured steps, all means (the step is a sum of them along a path):

    - F, I and W of each stage (a full B counts as I, with W = 0), each plus its rank's overhead: the part
      of the rank's span (first to last action) outside actions and waits -- the executor's own Python --
      shared over its compute actions;
    - `post`: posting one SEND or RECV; `comm`: a transfer (see `_transfer_time`).
    """
    steps = [measured] if isinstance(measured, Timeline) else list(measured)
    ranks = steps[0].num_ranks
    durations: dict[tuple[int, Op], list[float]] = {}
    posts = []
    idle = [0.0] * ranks  # the executor's own time: a rank's span (first to last action) not covered
    computes = [0] * ranks  # by actions or waits, and the compute actions it is shared over
    for step in steps:
        accounted = [0.0] * ranks
        first = [float("inf")] * ranks
        last = [0.0] * ranks
        for e in (*step.events, *step.waits):
            accounted[e.rank] += e.duration
            first[e.rank] = min(first[e.rank], e.start)
            last[e.rank] = max(last[e.rank], e.end)
        for r in range(ranks):
            idle[r] += max(0.0, last[r] - first[r] - accounted[r]) if last[r] > 0 else 0.0
        for e in step.events:
            if e.action.op.is_comm:
                posts.append(e.duration)
            else:
                computes[e.rank] += 1
                durations.setdefault((e.action.stage, e.action.op), []).append(e.duration)
    overhead = [idle[r] / computes[r] if computes[r] else 0.0 for r in range(ranks)]

    def mean(stage: int, *ops: Op) -> float:
        for op in ops:
            if (stage, op) in durations:
                return statistics.fmean(durations[(stage, op)]) + overhead[schedule.stage_to_rank[stage]]
        return 0.0

    stages = range(schedule.num_stages)
    return Costs(f=[mean(s, Op.F) for s in stages], b=[mean(s, Op.I, Op.B) for s in stages],
                 w=[mean(s, Op.W) for s in stages], comm=_transfer_time(steps),
                 post=statistics.fmean(posts) if posts else 0.0)


BLOCKED = 1e-4  # seconds: a shorter wait found its data already there, and says nothing about transfers


def _transfer_time(steps: Sequence[Timeline]) -> float:
    """Median transfer time: from the later of a message's SEND and RECV postings (a transfer starts when
    both sides have posted, as in the simulator) to the end of a wait that blocked on it."""
    delays = []
    for step in steps:
        sent: dict[Value, float] = {}
        posted: dict[tuple[int, Value], float] = {}
        for e in step.events:
            if e.action.op in (Op.SEND_F, Op.SEND_B):
                sent[message_of(e.action)] = e.end
            elif e.action.op in (Op.RECV_F, Op.RECV_B):
                posted[(e.rank, message_of(e.action))] = e.end
        for wait in step.waits:
            a = wait.action
            value = ("act", a.stage - 1, a.mb) if a.op is Op.F else ("grad", a.stage + 1, a.mb)
            if wait.duration > BLOCKED and value in sent and (wait.rank, value) in posted:
                delays.append(wait.end - max(sent[value], posted[(wait.rank, value)]))
    return statistics.median(delays) if delays else 0.0


class _ResampledCosts:
    """Each action's cost drawn from the measured durations of that stage's op (plus its rank's overhead),
    each posting from the measured postings; transfers take the fitted median."""

    def __init__(self, schedule: Schedule, steps: Sequence[Timeline], costs: Costs, rng: random.Random) -> None:
        self.samples: dict[tuple[int, Op], list[float]] = {}
        self.posts: list[float] = []
        for step in steps:
            for e in step.events:
                if e.action.op.is_comm:
                    self.posts.append(e.duration)
                else:
                    self.samples.setdefault((e.action.stage, e.action.op), []).append(e.duration)
        self.overhead = {s: costs.of(Action(s, Op.F, 0)) - statistics.fmean(self.samples[(s, Op.F)])
                         for s in range(schedule.num_stages) if (s, Op.F) in self.samples}
        self.comm, self.post, self.rng = costs.comm, costs.post, rng

    def of(self, action: Action) -> float:
        if action.op.is_comm:
            return self.rng.choice(self.posts) if self.posts else 0.0
        op = action.op if (action.stage, action.op) in self.samples or action.op is not Op.I else Op.B
        values = self.samples.get((action.stage, op))
        return (self.rng.choice(values) + self.overhead.get(action.stage, 0.0)) if values else 0.0


def compare(schedule: Schedule, measured: Timeline | Sequence[Timeline], *, samples: int = 30,
            seed: int = 0) -> Comparison:
    """Fit costs on one or several measured steps of `schedule`, simulate, and compare step times.

    The predicted step time is the mean of `samples` simulations whose action durations are drawn from
    the measured ones: where a rank waits for the later of two inputs, noise lengthens the step, which a
    simulation with mean costs alone misses (it under-predicted by 5-11% on 2 CPU ranks).
    """
    steps = (measured,) if isinstance(measured, Timeline) else tuple(measured)
    if not steps:
        raise ValueError("compare needs at least one measured timeline")
    costs = measured_costs(schedule, steps)
    lowered = lower(schedule)
    rng = random.Random(seed)
    resampled = _ResampledCosts(schedule, steps, costs, rng)
    runs = [max((e.end for e in run_dataflow(lowered, resampled)[0]), default=0.0) for _ in range(samples)]
    return Comparison(steps[-1], simulate(schedule, costs), costs, steps, statistics.fmean(runs))
