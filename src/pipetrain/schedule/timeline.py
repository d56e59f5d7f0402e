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
    exposed_all_to_all: float = 0.0  # time compute stood waiting on its all-to-alls (not hidden by a pair's lane)


@dataclass(frozen=True)
class Timeline:
    """Events of one step on every rank, simulated or measured: compute actions, and SEND/RECV postings
    where they take time. Measured timelines also have waits: the time a compute action spent waiting
    for its input to arrive, and waits on a collective's completion. Busy time counts compute actions only,
    once where an overlapped pair's two run together. `all_to_all`: the stretches inside compute actions spent
    waiting on all-to-alls that no other work hid (expert parallel), attributed to the waiting action."""

    num_ranks: int
    events: tuple[Event, ...]
    waits: tuple[Event, ...] = ()
    step_times: tuple[float, ...] | None = None  # per rank, when measured; else the last end
    all_to_all: tuple[Event, ...] = ()

    def step_time(self) -> float:
        if self.step_times is not None:
            return max(self.step_times, default=0.0)
        return max((e.end for e in self.events), default=0.0)

    def per_rank(self) -> list[RankStats]:
        step = self.step_time()
        by_rank: list[list[Event]] = [[] for _ in range(self.num_ranks)]
        for e in self.events:
            if e.action.op.is_compute:
                by_rank[e.rank].append(e)
        exposed = [0.0] * self.num_ranks
        for w in self.waits:
            if w.action.op.is_collective:
                exposed[w.rank] += w.duration
        exchanges = [0.0] * self.num_ranks
        for e in self.all_to_all:
            exchanges[e.rank] += e.duration
        stats = []
        for rank in range(self.num_ranks):
            ordered = sorted(by_rank[rank], key=lambda e: (e.start, e.end, e.action.op is not Op.F))
            busy = covered_time(ordered)
            bubble = 1.0 - busy / step if step > 0 else 0.0
            stats.append(RankStats(rank, busy, bubble, peak_activations([e.action for e in ordered]),
                                   exposed[rank], exchanges[rank]))
        return stats

    def bubble_fraction(self) -> float:
        stats = self.per_rank()
        return sum(s.bubble_fraction for s in stats) / len(stats) if stats else 0.0


def covered_time(ordered: list[Event]) -> float:
    """The time covered by events sorted by start (an overlapped pair's two events count once)."""
    total, reach = 0.0, float("-inf")
    for e in ordered:
        if e.end > reach:
            total += e.end - max(e.start, reach)
            reach = e.end
    return total


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
