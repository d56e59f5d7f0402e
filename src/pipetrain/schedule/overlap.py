"""Overlapped pairs: a forward and a backward of one rank run together (`0F1 +0B0`), so one's all-to-all is in
flight while the other computes (DualPipe's overlapped forward-backward chunks, Megatron's combined 1F1B).

A pair is two adjacent compute actions of one rank, the second marked `paired`: a forward and a backward (B or
I) of other microbatches or stages, neither needing the other's result. The runtime runs them as two lanes
that take turns, each handing over at its collectives (runtime/overlap.py); in the dataflow the pair starts
when both inputs have arrived and its outputs leave when both lanes are done. `overlap(schedule)` pairs what a
schedule allows; `check` proves the pairs (`check_pairs`) and, with the rest, that they cannot deadlock.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .actions import Action, Op, consumes, produces
from .base import Schedule, ScheduleError, _replace
from .simulate import Costs

_BACKWARD = (Op.B, Op.I)


def independent(x: Action, y: Action, num_stages: int) -> bool:
    """Whether x and y may run together: neither consumes what the other produces."""
    return produces(x) not in consumes(y, num_stages) and produces(y) not in consumes(x, num_stages)


def pairable(x: Action, y: Action, num_stages: int) -> bool:
    """Whether y may pair with x before it: one forward and one backward (B or I), independent."""
    kinds = {x.op, y.op}
    return Op.F in kinds and bool(kinds & set(_BACKWARD)) and independent(x, y, num_stages)


def check_pairs(schedule: Schedule) -> None:
    """Raise ScheduleError unless every paired action directly follows the compute action it pairs with, the
    two a forward and a backward that do not need each other's results, in a training schedule."""
    for rank, acts in enumerate(schedule.actions):
        for step, a in enumerate(acts):
            if not a.paired:
                continue
            where = f"rank {rank}, step {step}: {a}"
            before = acts[step - 1] if step else None
            if before is None or not before.op.is_compute or before.paired:
                raise ScheduleError(f"{where} pairs with the action before it, which must be a compute action "
                                    f"of its own (found {before if before is not None else 'nothing'}); a pair is "
                                    "two adjacent actions, the second marked '+'")
            if not pairable(before, a, schedule.num_stages):
                raise ScheduleError(f"{where} cannot run together with {before}: a pair holds one forward (F) and "
                                    "one backward (B or I) of which neither needs the other's result")


def pairs(acts: tuple[Action, ...] | list[Action]) -> int:
    """How many pairs one rank's list holds."""
    return sum(a.paired for a in acts)


def overlap(schedule: Schedule, costs: Costs | None = None) -> Schedule:
    """`schedule` with adjacent forward/backward actions paired where that makes the step faster, as simulated
    with `costs` (default: F, I and W 1 each, and all-to-alls of 0.5 inside each F and each B or I).

    Candidates are adjacent (F, B or I) of one rank that do not need each other. A pair starts when both its
    inputs have arrived and sends both results at its end, which can delay a neighbouring rank (on 1F1B with
    two or more ranks it would chain them) while it hides the all-to-alls. So the pairing is chosen by
    simulation: first the better of pairing every backward with the forward after it (1F1B's steady state,
    `0B0 +0F2`) and every forward with the backward after it (DualPipeV's `0F2 +3B1`), if it beats none; then
    each remaining candidate, left to right, kept if the step gets faster and the schedule still runs."""
    from .simulate import simulate

    if schedule.lowered:
        raise ValueError("overlap pairs the actions of a compute-only schedule: pass it before `lower`")
    if any(a.op is Op.P or a.op is Op.D for acts in schedule.actions for a in acts):
        raise ValueError("overlap pairs a training step's forwards and backwards; a generation schedule has none")
    costs = costs if costs is not None else Costs(all_to_all=0.5)
    plain = _replace(schedule, actions=tuple(tuple(replace(a, paired=False) for a in acts)
                                                 for acts in schedule.actions))

    def step_time(chosen: list[set[int]]) -> float:
        try:
            return simulate(_with_pairs(plain, chosen), costs).step_time
        except ScheduleError:  # (deadlocks)
            return math.inf

    best, best_time = [set() for _ in plain.actions], step_time([set() for _ in plain.actions])
    for forward_first in (False, True):
        chosen = [_greedy(acts, plain.num_stages, forward_first) for acts in plain.actions]
        if (time := step_time(chosen)) < best_time:
            best, best_time = chosen, time
    for second, rank in _candidates(plain):
        if second - 1 in best[rank] or second in best[rank] or second + 1 in best[rank]:
            continue
        best[rank].add(second)
        if (time := step_time(best)) < best_time:
            best_time = time
        else:
            best[rank].discard(second)
    return _replace(_with_pairs(plain, best), name=f"{schedule.name}+overlap")


def _greedy(acts: tuple[Action, ...], num_stages: int, forward_first: bool) -> set[int]:
    """Indices of the second actions of non-overlapping candidate pairs of one orientation, left to right."""
    chosen: set[int] = set()
    i = 0
    while i + 1 < len(acts):
        if (acts[i].op is Op.F) == forward_first and _may_pair(acts, i, num_stages):
            chosen.add(i + 1)
            i += 2
        else:
            i += 1
    return chosen


def _with_pairs(schedule: Schedule, chosen: list[set[int]]) -> Schedule:
    actions = tuple(tuple(replace(a, paired=True) if i in chosen[rank] else a for i, a in enumerate(acts))
                    for rank, acts in enumerate(schedule.actions))
    return _replace(schedule, actions=actions)


def _candidates(plain: Schedule) -> list[tuple[int, int]]:
    """(index of the second action, rank) of every adjacent pair that may run together, by position."""
    return sorted((i + 1, rank) for rank, acts in enumerate(plain.actions) for i in range(len(acts) - 1)
                  if _may_pair(acts, i, plain.num_stages))


def _may_pair(acts: tuple[Action, ...], i: int, num_stages: int) -> bool:
    """Whether compute actions i and i + 1 of one rank may run as a pair."""
    return acts[i].op.is_compute and acts[i + 1].op.is_compute and pairable(acts[i], acts[i + 1], num_stages)
