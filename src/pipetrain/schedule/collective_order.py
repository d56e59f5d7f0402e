"""Every rank's collectives in one step, checked across ranks: the same order within each group, no cycle.

Collectives match by the order their members issue them, not by name: if two replicas launch their stages'
reductions in another order, each sums the other's wrong tensor (or, with other sizes, hangs). And a rank
blocked in one group's collective holds up every other group it belongs to, so ranks can wait on each
other in a cycle although each group's order agrees (Megatron-LM#1810, #5100, #6616: an embedding
all-reduce against the pipeline's transfers). `check_collective_order` proves neither can happen for the
programs it is given, treating every collective as blocking its rank until all members reach it (NCCL on
one stream can behave so; an asynchronous launch only relaxes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .base import ScheduleError


@dataclass(frozen=True)
class Call:
    """One collective a rank issues: over the global ranks `group` (sorted), `name` saying what it is (the
    schedule action that launches it, e.g. `1REDUCE`, or the step's own, e.g. "the loss all-reduce")."""

    group: tuple[int, ...]
    name: str

    def __str__(self) -> str:
        return f"{self.name} (ranks {', '.join(map(str, self.group))})"


def check_collective_order(programs: Mapping[int, Sequence[Call]]) -> None:
    """`programs[rank]`: the collectives global rank `rank` issues in one step, in order (every member of
    a group that holds a program must be given). Raise ScheduleError naming the ranks and the collectives
    unless (1) the members of each group issue the same collectives in the same order and (2) issuing them
    in order, each waiting for all its members, every rank gets through."""
    per_group: dict[tuple[int, ...], dict[int, list[str]]] = {}
    for rank, calls in programs.items():
        for call in calls:
            if rank not in call.group:
                raise ScheduleError(f"rank {rank} issues {call}, over a group it is not in")
            per_group.setdefault(call.group, {}).setdefault(rank, []).append(call.name)
    for group, names in per_group.items():
        members = [m for m in group if m in programs]
        first = members[0]
        for other in members[1:]:
            _same_order(group, first, names.get(first, []), other, names.get(other, []))
    _no_cycle(programs)


def _same_order(group: tuple[int, ...], a: int, mine: list[str], b: int, theirs: list[str]) -> None:
    if mine == theirs:
        return
    i = next((i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y), min(len(mine), len(theirs)))
    what = {rank: (f"{calls[i]!r}" if i < len(calls) else f"nothing (it issues {len(calls)})")
            for rank, calls in ((a, mine), (b, theirs))}
    raise ScheduleError(f"ranks {a} and {b} disagree on the collectives over ranks {', '.join(map(str, group))}: "
                        f"collective {i + 1} is {what[a]} on rank {a} but {what[b]} on rank {b}; collectives match "
                        "in the order they are issued, so this would mix up their tensors or hang")


def _no_cycle(programs: Mapping[int, Sequence[Call]]) -> None:
    """Run the programs: a rank's next collective completes once every member is at it (each group's order
    agrees, so members at a call of the same group are at the same call)."""
    pos = dict.fromkeys(programs, 0)

    def head(rank: int) -> Call | None:
        calls = programs[rank]
        return calls[pos[rank]] if pos[rank] < len(calls) else None

    moved = True
    while moved:
        moved = False
        for rank in programs:
            call = head(rank)
            if call is None:
                continue
            members = [m for m in call.group if m in programs]
            if all(head(m) is not None and head(m).group == call.group for m in members):
                for m in members:
                    pos[m] += 1
                moved = True
    stuck = [r for r in programs if head(r) is not None]
    if stuck:
        lines = []
        for rank in stuck:
            call = head(rank)
            late = next(m for m in call.group if m in programs and (head(m) is None or head(m).group != call.group))
            there = f"waits in {head(late)}" if head(late) is not None else "has finished without it"
            lines.append(f"  rank {rank} waits in {call} for rank {late}, which {there}")
        raise ScheduleError("the ranks' collectives wait on each other in a cycle:\n" + "\n".join(lines))
