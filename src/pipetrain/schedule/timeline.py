"""Timelines: per-rank start/end of every action, simulated or measured, and their summary."""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Action, Op


@dataclass(frozen=True, slots=True)
class Event:
    """One action on one rank, from `start` to `end` seconds (from the start of the step)."""

    rank: int
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class RankStats:
    rank: int
    busy_time: float  # time in compute actions
    bubble_fraction: float  # 1 - busy_time / step_time
    peak_activations: int  # most (stage, microbatch) activations held at once
    exposed_collectives: float = 0.0  # time waiting on REDUCE / GATHER collectives (not hidden behind compute)


@dataclass(frozen=True)
class Timeline:
    """Events of one step on every rank, simulated or measured: compute actions, and SEND/RECV postings
    where they take time. Measured timelines also have waits: the time a compute action spent waiting
    for its input to arrive, and waits on a collective's completion. Busy time counts compute actions only."""

    num_ranks: int
    events: tuple[Event, ...]
    waits: tuple[Event, ...] = ()
    step_times: tuple[float, ...] | None = None  # per rank, when measured; else the last end

    def step_time(self) -> float:
        if self.step_times is not None:
            return max(self.step_times, default=0.0)
        return max((e.end for e in self.events), default=0.0)

    def per_rank(self) -> list[RankStats]:
        step = self.step_time()
        busy = [0.0] * self.num_ranks
        by_rank: list[list[Event]] = [[] for _ in range(self.num_ranks)]
        for e in self.events:
            if e.action.op.is_compute:
                busy[e.rank] += e.duration
                by_rank[e.rank].append(e)
        exposed = [0.0] * self.num_ranks
        for w in self.waits:
            if w.action.op.is_collective:
                exposed[w.rank] += w.duration
        stats = []
        for rank in range(self.num_ranks):
            ordered = sorted(by_rank[rank], key=lambda e: (e.start, e.end))
            bubble = 1.0 - busy[rank] / step if step > 0 else 0.0
            stats.append(RankStats(rank, busy[rank], bubble, peak_activations([e.action for e in ordered]),
                                   exposed[rank]))
        return stats

    def bubble_fraction(self) -> float:
        stats = self.per_rank()
        return sum(s.bubble_fraction for s in stats) / len(stats) if stats else 0.0


def peak_activations(actions: list[Action]) -> int:
    """Most (stage, microbatch) activations alive at once: held from F until B (or until W)."""
    live = peak = 0
    split = {(a.stage, a.mb) for a in actions if a.op is Op.I}
    for a in actions:
        if a.op is Op.F:
            live += 1
            peak = max(peak, live)
        elif a.op is Op.B or (a.op is Op.W and (a.stage, a.mb) in split):
            live -= 1
    return peak
