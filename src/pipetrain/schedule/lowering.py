"""Lowering: add the SEND/RECV actions a compute-only schedule needs, in an order that cannot hang."""

from __future__ import annotations

from collections import defaultdict

from .actions import (
    PASS,
    Action,
    Value,
    by_collective,
    consumer,
    consumes,
    produces,
    recv_action_for,
    send_action_for,
)
from .base import Schedule, _replace


def crossing_value(action: Action, schedule: Schedule,
                   rounds: dict[tuple[int, int], tuple[int, int]]) -> tuple[Value, int] | None:
    """If `action` produces a value that another rank consumes, return (value, consumer rank). `rounds`
    (`generation_rounds`) says which rounds each (stage, group) of a generation schedule runs: the last
    stage's pass feeds stage 0's next round only if that round decodes."""
    if not action.op.is_compute:
        return None
    value = produces(action)
    target = consumer(value, schedule.num_stages)
    if target is None or not 0 <= target[0] < schedule.num_stages:
        return None
    if value.kind is PASS:
        first_decode, end = rounds.get((target[0], value.mb), (0, 0))
        if target[1] >= end or (target[0] == 0 and target[1] < first_decode):
            return None
    src, dst = schedule.stage_to_rank[action.stage], schedule.stage_to_rank[target[0]]
    return (value, dst) if src != dst else None


def generation_rounds(schedule: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """(stage, group) -> (its prefill rounds, its rounds), from a generation schedule's P/D actions (empty for
    training). Prefill rounds come first (`check`), so the first decode round is the number of P rounds."""
    prefill: dict[tuple[int, int], int] = defaultdict(int)
    end: dict[tuple[int, int], int] = defaultdict(int)
    for acts in schedule.actions:
        for a in acts:
            op = a.op._value_
            if op == "P" or op == "D":
                key = (a.stage, a.mb)
                prefill[key] += op == "P"
                end[key] = max(end[key], a.round + 1)
    return {key: (prefill[key], end[key]) for key in end}


def message_order(schedule: Schedule, rounds: dict[tuple[int, int], tuple[int, int]] | None = None,
                  ) -> dict[tuple[int, int], list[Value]]:
    """For each (sender rank, receiver rank), the values in the order the sender produces them (`rounds`:
    `generation_rounds(schedule)` when the caller has it)."""
    order: dict[tuple[int, int], list[Value]] = defaultdict(list)
    rounds = generation_rounds(schedule) if rounds is None else rounds
    for rank, acts in enumerate(schedule.actions):
        for action in acts:
            crossing = crossing_value(action, schedule, rounds)
            if crossing is not None:
                order[(rank, crossing[1])].append(crossing[0])
    return order


PREFETCH = 4  # measured on 2 gloo CPU ranks: 1F1B 121 -> 112 ms, interleaved 134 -> 121 ms vs prefetch 1


def lower(schedule: Schedule, *, prefetch: int = PREFETCH) -> Schedule:
    """Insert SEND right after each producing compute action and RECV ahead of each consumer.

    An overlapped pair (`paired`) stays adjacent: its receives are posted before its first half, its sends
    after its second.

    Semantics the runtime and the simulator share: SEND and RECV only *post* a transfer (isend/irecv)
    and never block; a compute action waits for the RECVs of its inputs. Receives are posted
    `prefetch` compute actions before the one that needs them, so a transfer overlaps the compute in
    between. Between each pair of ranks, receives are posted in the sender's order (NCCL matches
    point-to-point messages first-in first-out), so no rank can wait on a message queued behind one
    its peer has not yet sent. Whether the compute order itself can deadlock is `check`'s job.
    """
    if schedule.lowered:
        return schedule
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    rounds = generation_rounds(schedule)
    order = message_order(schedule, rounds)
    incoming: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for src, dst in order:
        incoming[dst].append((src, dst))
    lowered = [_lower_rank(rank, acts, schedule, order, incoming[rank], prefetch, rounds)
               for rank, acts in enumerate(schedule.actions)]
    return _replace(schedule, actions=lowered, lowered=True)


def _lower_rank(rank: int, acts: tuple[Action, ...], schedule: Schedule,
                order: dict[tuple[int, int], list[Value]], incoming: list[tuple[int, int]],
                prefetch: int, rounds: dict[tuple[int, int], tuple[int, int]]) -> list[Action]:
    needed_by = _remote_needs(rank, acts, schedule)
    next_pos = {pair: 0 for pair in incoming}
    source_of = {v: (pair, i) for pair in incoming for i, v in enumerate(order[pair])}
    out: list[Action] = []

    def post_through(value: Value) -> None:
        """Post the receive of `value` and of every value queued before it on the same pair."""
        if value not in source_of:  # nobody sends it: the checker reports the missing producer
            return
        pair, position = source_of[value]
        while next_pos[pair] <= position:
            out.append(recv_action_for(order[pair][next_pos[pair]], schedule.num_stages))
            next_pos[pair] += 1

    sends: list[Action] = []  # an overlapped pair's first half sends after its second
    for i, action in enumerate(acts):
        pair = i + 1 < len(acts) and acts[i + 1].paired
        if not action.paired:  # (a pair's receives are all posted before its first half)
            for j in range(i, min(i + prefetch + 1 + pair, len(acts))):
                for value in needed_by[j]:
                    post_through(value)
        out.append(action)
        crossing = crossing_value(action, schedule, rounds)
        if crossing is not None:
            sends.append(send_action_for(crossing[0]))
        if not pair:
            out.extend(sends)
            sends.clear()
    return out


def _remote_needs(rank: int, acts: tuple[Action, ...], schedule: Schedule) -> list[list[Value]]:
    """For each action of a rank, the values it consumes that another rank produces."""
    needs = []
    for action in acts:
        remote = []
        if action.op.is_compute:
            for value in consumes(action, schedule.num_stages, schedule.vocabulary_shards):
                if by_collective(value, action):  # (vocabulary parallelism's collectives: no transfer)
                    continue
                if 0 <= value.stage < schedule.num_stages and schedule.stage_to_rank[value.stage] != rank:
                    remote.append(value)
        needs.append(remote)
    return needs
