"""Vocabulary parallelism's passes placed into any schedule: each rank's E, S, T and G, by a simulation of the step.

With vocabulary parallelism (Yeung et al., "Balancing Pipeline Parallelism with Vocabulary Parallelism", MLSys
2025) the output layer and its cross-entropy are split by vocabulary over every pipeline rank. The last stage's
output goes to every rank, where shard r's S(r, m) computes its logits for microbatch m and their softmax
statistics; once every shard's statistics are in (an all-gather), T(r, m) computes the shard's part of the
softmax's gradient, its weight gradient and its part of the gradient of the last stage's output, which the
last stage's backward of m sums over the shards (their Vocab-1 passes). The input embedding is split the same
way: E(r, m) looks up the shard's rows of microbatch m's tokens (zero for the others), summed into the first
stage's forward, and G(r, m) adds the gradient of the first stage's input to those rows.

`with_vocabulary` places them into a compute-only schedule of any generator by list scheduling on the
simulator's clock: each rank runs its actions in the schedule's order, and an S or T as soon as its input
is in, an E at most `LOOKUP_AHEAD` microbatches ahead of the first stage's forwards, a G when nothing else is
ready (its collectives match by order, so each kind runs in microbatch order on every rank). While the last
stage's backward waits for the shards' gradients, its rank may run up to `delay` forwards of later microbatches
early (the paper shifts the last stage's backward the same way); the delay whose step simulates shortest wins.
"""

from __future__ import annotations

import math

from .actions import VOCABULARY, Action, Op, by_collective, consumes, produces, rank_of_value
from .base import Schedule, ScheduleError, _replace
from .simulate import Costs, simulate

DELAYS = (0, 1, 2)
LOOKUP_AHEAD = 2  # E passes run at most this many microbatches ahead of the first stage's F (each one's sum waits)


def with_vocabulary(schedule: Schedule, costs: Costs | None = None, *, delays: tuple[int, ...] = DELAYS) -> Schedule:
    """`schedule` with every rank's vocabulary passes: E(r, m) and S(r, m) for every microbatch, and T(r, m) and
    G(r, m) with a backward.

    `schedule` is compute-only (a generator's output, or `compute_only()` of a lowered one), without pairs or
    data-parallel collectives (add those after: `with_collectives`). `costs` are those of `simulate` (its `s`,
    `t`, `e` and `g` the passes' times); each of `delays` is tried and the shortest simulated step kept. A schedule that
    already holds vocabulary passes is returned as it is."""
    if schedule.vocabulary_shards:
        return schedule
    if schedule.lowered:
        schedule = schedule.compute_only()
    for acts in schedule.actions:
        for a in acts:
            if a.paired or a.op.is_collective or a.op is Op.P or a.op is Op.D:
                raise ValueError(f"with_vocabulary places S and T into a training schedule of F, B, I and W actions; "
                                 f"{schedule.name} holds {a}: add vocabulary passes first, then overlapped pairs or "
                                 "data-parallel collectives")
    costs = costs or Costs()
    best: tuple[float, Schedule] | None = None
    for delay in delays:
        placed = _place(schedule, costs, delay)
        time = simulate(placed, costs).step_time
        if best is None or time < best[0] - 1e-12:
            best = (time, placed)
    return best[1]


def _touched(action: Action, rank: int, rank_of, num_ranks: int) -> range | tuple[int, ...]:
    """The ranks whose candidates `action`, just placed on `rank`, may change: its own, and those that consume
    what it produced (every rank for the vocabulary passes' values, the last stage's output and the first
    stage's forwards, which let the E passes go on; the neighbour for a stage's output or input gradient)."""
    last = len(rank_of) - 1
    if action.op._value_ in VOCABULARY or (action.op is Op.F and action.stage in (0, last)) or (
            action.op in (Op.B, Op.I) and action.stage in (0, last)):
        return range(num_ranks)
    if action.op is Op.F:
        return rank, rank_of[action.stage + 1]
    if action.op in (Op.B, Op.I):
        return rank, rank_of[action.stage - 1]
    return (rank,)


def _place(schedule: Schedule, costs: Costs, delay: int) -> Schedule:
    """List scheduling on the model clock: at each turn, of every rank's candidates (its next E, S, T and G, its
    next action in the schedule's order, and with `delay` a later forward while one of its backwards waits), the
    one that can start earliest runs; ties go to T, then S, then E, then the schedule's order, then G."""
    num_ranks, num_stages = schedule.num_ranks, schedule.num_stages
    rank_of, m_count = schedule.stage_to_rank, schedule.num_microbatches
    backward = schedule.has_backward
    queues = [list(acts) for acts in schedule.actions]
    taken = [[False] * len(q) for q in queues]
    head = [0] * num_ranks  # each rank's first action not yet placed
    early = [0] * num_ranks  # forwards placed before an earlier action of their rank's list
    next_pass = {op: [0] * num_ranks for op in (Op.E, Op.S, Op.T, Op.G)}
    first_forwards = [0]  # F(0, .) placed so far
    clock = [0.0] * num_ranks
    done: dict = {}
    out: list[list[Action]] = [[] for _ in range(num_ranks)]

    def ready(action: Action, rank: int) -> float:
        start = clock[rank]
        for value in consumes(action, num_stages, num_ranks):
            if value not in done:
                return math.inf
            if rank_of_value(value, rank_of) != rank:
                transfer = costs.collective_time if by_collective(value, action) else costs.comm
                start = max(start, done[value] + transfer)
            else:
                start = max(start, done[value])
        return start

    def candidates(rank: int):
        """(start, priority, action, index in the rank's list or None) for each action the rank may run next."""
        s_next, t_next = next_pass[Op.S][rank], next_pass[Op.T][rank]
        e_next, g_next = next_pass[Op.E][rank], next_pass[Op.G][rank]
        if backward and t_next < s_next:
            yield ready(action := Action(rank, Op.T, t_next), rank), 0, action, None
        if s_next < m_count:
            yield ready(action := Action(rank, Op.S, s_next), rank), 1, action, None
        if e_next < min(m_count, first_forwards[0] + LOOKUP_AHEAD):
            yield ready(action := Action(rank, Op.E, e_next), rank), 2, action, None
        if backward and g_next < m_count:
            yield ready(action := Action(rank, Op.G, g_next), rank), 5, action, None
        queue, i = queues[rank], head[rank]
        if i < len(queue):
            yield ready(queue[i], rank), 3, queue[i], i
        if early[rank] >= delay:
            return
        for j in range(i, len(queue)):  # past backwards (the last stage's waits for the shards' gradients)
            a = queue[j]
            if taken[rank][j] or a.op in (Op.B, Op.I, Op.W):
                continue
            if a.op is Op.F and j > i:
                yield ready(a, rank), 4, a, j
            return

    # each rank's candidates, kept until something they depend on changes: the rank's own placements, or a value
    # that another rank's action produced (`_touched`)
    cached: list[list | None] = [None] * num_ranks
    remaining = sum(map(len, queues)) + num_ranks * m_count * (4 if backward else 2)
    while remaining:
        for rank in range(num_ranks):
            if cached[rank] is None:
                cached[rank] = [(start, priority, rank, action, index)
                                for start, priority, action, index in candidates(rank)]
        best = min((c for rank_candidates in cached for c in rank_candidates), key=lambda c: c[:3], default=None)
        if best is None or best[0] == math.inf:
            raise ScheduleError(f"cannot place vocabulary passes into {schedule.name}: every rank waits "
                                f"(placed so far: {[[str(a) for a in acts] for acts in out]})")
        start, _, rank, action, index = best
        out[rank].append(action)
        clock[rank] = start + costs.of(action) + costs.exchange(action)
        done[produces(action)] = clock[rank]
        remaining -= 1
        for other in _touched(action, rank, rank_of, num_ranks):
            cached[other] = None
        if action.op._value_ in VOCABULARY:
            next_pass[action.op][rank] += 1
            continue
        taken[rank][index] = True
        first_forwards[0] += action.op is Op.F and action.stage == 0
        if index > head[rank]:
            early[rank] += 1
        else:
            while head[rank] < len(queues[rank]) and taken[rank][head[rank]]:
                early[rank] -= head[rank] > index
                head[rank] += 1
    return _replace(schedule, name=f"{schedule.name}/vocabulary", actions=tuple(tuple(acts) for acts in out))
