"""Simulated vs measured: fit per-action costs from a measured step, simulate it, report the error."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .actions import RECVS, SENDS, Action, Op, Value, message_of, received_input
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


@dataclass(frozen=True)
class _Samples:
    """What measured steps say per action: durations of each (stage, op), of each SEND/RECV posting, and
    each rank's overhead per compute action (its span, first to last action, outside actions and waits:
    the executor's own Python)."""

    durations: dict[tuple[int, Op], list[float]]
    posts: list[float]
    overhead: list[float]

    @staticmethod
    def collect(steps: Sequence[Timeline]) -> _Samples:
        if any(e.action.paired for step in steps for e in step.events):
            raise ValueError("this timeline runs overlapped pairs (`+0F1`): a pair's two actions share one measured "
                             "duration, so per-action costs cannot be fitted from it; measure the schedule without "
                             "overlap, and simulate it paired with those costs")
        ranks = steps[0].num_ranks
        durations: dict[tuple[int, Op], list[float]] = {}
        posts: list[float] = []
        idle = [0.0] * ranks
        computes = [0] * ranks
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
                elif e.action.op.is_compute:  # (a collective's launch is neither: not fitted)
                    computes[e.rank] += 1
                    durations.setdefault((e.action.stage, e.action.op), []).append(e.duration)
        return _Samples(durations, posts, [idle[r] / computes[r] if computes[r] else 0.0 for r in range(ranks)])

    def of(self, action: Action) -> list[float]:
        """The measured durations of an action's stage and op (I falls back to B: a full B counts as I)."""
        key = (action.stage, action.op)
        if key not in self.durations and action.op is Op.I:
            key = (action.stage, Op.B)
        return self.durations.get(key, [])


def measured_costs(schedule: Schedule, measured: Timeline | Sequence[Timeline]) -> Costs:
    """Per-action costs from measured steps, all means (the step is a sum of them along a path):

    - F, I and W of each stage (a full B counts as I, with W = 0), each plus its rank's overhead per compute
      action (see `_Samples`);
    - `post`: posting one SEND or RECV; `comm`: a transfer (see `_transfer_time`).
    """
    steps = [measured] if isinstance(measured, Timeline) else list(measured)
    return _mean_costs(schedule, _Samples.collect(steps), steps)


def _mean_costs(schedule: Schedule, samples: _Samples, steps: Sequence[Timeline]) -> Costs:
    def mean(stage: int, op: Op) -> float:
        values = samples.of(Action(stage, op, 0))
        return statistics.fmean(values) + samples.overhead[schedule.stage_to_rank[stage]] if values else 0.0

    stages = range(schedule.num_stages)
    return Costs(f=[mean(s, Op.F) for s in stages], b=[mean(s, Op.I) for s in stages],
                 w=[mean(s, Op.W) for s in stages], comm=_transfer_time(steps, schedule.num_stages),
                 post=statistics.fmean(samples.posts) if samples.posts else 0.0)


BLOCKED = 1e-4  # seconds: a shorter wait found its data already there, and says nothing about transfers


def _transfer_time(steps: Sequence[Timeline], num_stages: int) -> float:
    """Median transfer time: from the later of a message's SEND and RECV postings (a transfer starts when
    both sides have posted, as in the simulator) to the end of a wait that blocked on it."""
    delays = []
    for step in steps:
        sent: dict[Value, float] = {}
        posted: dict[tuple[int, Value], float] = {}
        for e in step.events:
            if e.action.op.value in SENDS:
                sent[message_of(e.action, num_stages)] = e.end
            elif e.action.op.value in RECVS:
                posted[(e.rank, message_of(e.action, num_stages))] = e.end
        for wait in step.waits:
            a = wait.action
            value = received_input(a, num_stages)
            if wait.duration > BLOCKED and value in sent and (wait.rank, value) in posted:
                delays.append(wait.end - max(sent[value], posted[(wait.rank, value)]))
    return statistics.median(delays) if delays else 0.0


class _ResampledCosts:
    """Each action's cost drawn from the measured durations of that stage's op (plus its rank's overhead),
    each posting from the measured postings; transfers take the fitted median."""

    def __init__(self, schedule: Schedule, samples: _Samples, comm: float, rng: random.Random) -> None:
        self.schedule, self.samples, self.comm, self.rng = schedule, samples, comm, rng

    def of(self, action: Action) -> float:
        if action.op.is_comm:
            return self.rng.choice(self.samples.posts) if self.samples.posts else 0.0
        if action.op.is_collective:  # (not fitted: a collective's time is hidden or shows as a wait)
            return 0.0
        values = self.samples.of(action)
        overhead = self.samples.overhead[self.schedule.stage_to_rank[action.stage]]
        return self.rng.choice(values) + overhead if values else 0.0

    def exchange(self, action: Action) -> float:
        return 0.0  # (a measured action's duration holds its all-to-alls)


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
    measured_samples = _Samples.collect(steps)
    costs = _mean_costs(schedule, measured_samples, steps)
    lowered = lower(schedule)
    resampled = _ResampledCosts(schedule, measured_samples, costs.comm, random.Random(seed))
    runs = [max((e.end for e in run_dataflow(lowered, resampled)[0]), default=0.0) for _ in range(samples)]
    return Comparison(steps[-1], simulate(schedule, costs), costs, steps, statistics.fmean(runs))
