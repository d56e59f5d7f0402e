"""A stage's data-parallel collectives as actions: where REDUCE and GATHER go, and the checks of their places.

With data parallelism every stage's weight gradients are reduced over its replicas once a step, and with
shard="params" its parameters are gathered from their shards before its first forward. Both are actions of
the schedule, so they are checked, simulated and drawn with the rest:

    REDUCE(s) right after stage s's last B or W of the step (and that action's SEND_B): in ZB-H1, ZBV and
        DualPipeV after the deferred weight gradients, so the reduction overlaps the rest of the cooldown;
    GATHER(s) at the start of the step, in the order the rank's stages first run F: the first stage's
        gather is waited for, the next ones overlap the compute before them.

A REDUCE or GATHER only launches its collective; the step's end waits for the reductions, a stage's first F
for its gather. torch.distributed.pipelining launches every stage's reduction at once after the step's last
action (pytorch#165106).
"""

from __future__ import annotations

from collections import Counter

from .actions import Action, Op, finishes_weights
from .base import Schedule, ScheduleError, _replace


def with_collectives(schedule: Schedule, *, reduce: bool = True, gather: bool = False) -> Schedule:
    """`schedule` (compute-only or lowered) with a REDUCE per stage after its last weight gradient (`reduce`,
    when it has a backward) and a GATHER per stage at the start (`gather`). A kind the schedule already holds
    is kept as placed (`check` proves the places); only a missing kind is added."""
    held = {a.op for acts in schedule.actions for a in acts if a.op.is_collective}
    reduce = reduce and schedule.has_backward and Op.REDUCE not in held
    gather = gather and Op.GATHER not in held
    if not reduce and not gather:
        return schedule
    actions = []
    for acts in schedule.actions:
        acts = list(acts)
        if reduce:
            last = {a.stage: i for i, a in enumerate(acts) if finishes_weights(a)}
            for stage, i in sorted(last.items(), key=lambda item: -item[1]):
                j = i + 1
                if j < len(acts) and acts[j].paired:  # (after the pair it runs in)
                    j += 1
                while j < len(acts) and acts[j].op._value_ == "SEND_B" and acts[j].stage == stage:
                    j += 1  # (after the last send upstream: the peer is not kept waiting by the launch)
                acts.insert(j, Action(stage, Op.REDUCE, 0))
        if gather:
            first = {}
            for a in acts:
                if a.op is Op.F:
                    first.setdefault(a.stage, len(first))
            acts[:0] = [Action(stage, Op.GATHER, 0) for stage in sorted(first, key=first.get)]
        actions.append(tuple(acts))
    return _replace(schedule, actions=tuple(actions))


def check_collectives(s: Schedule) -> None:
    """Raise ScheduleError unless every stage has no collective or, of each kind it has, exactly one on its own
    rank, every stage alike: a REDUCE after the stage's last B or W (never in a schedule without backward),
    a GATHER before its first F. Generation schedules hold none."""
    counts = Counter((a.stage, a.op) for acts in s.actions for a in acts if a.op.is_collective)
    if not counts:
        return
    if any(a.op is Op.P or a.op is Op.D for acts in s.actions for a in acts):
        raise ScheduleError("a generation schedule holds P and D passes only; REDUCE and GATHER belong to "
                            "training steps")
    for op in (Op.REDUCE, Op.GATHER):
        have = [stage for stage in range(s.num_stages) if counts[(stage, op)]]
        if not have:
            continue
        if op is Op.REDUCE and not s.has_backward:
            raise ScheduleError(f"{have[0]}REDUCE in a schedule without backward: there are no "
                                "gradients to reduce")
        for stage in range(s.num_stages):
            if counts[(stage, op)] != 1:
                raise ScheduleError(f"stage {stage} (rank {s.stage_to_rank[stage]}) has {counts[(stage, op)]} "
                                    f"{op.value} actions; with any, every stage has exactly one")
    for rank, acts in enumerate(s.actions):
        gathered: set[int] = set()
        weights_left = Counter(a.stage for a in acts if finishes_weights(a))
        for step, a in enumerate(acts):
            where = f"rank {rank}, step {step}: {a}"
            if a.op is Op.GATHER:
                gathered.add(a.stage)
            elif a.op is Op.F:
                if counts[(a.stage, Op.GATHER)] and a.stage not in gathered:
                    raise ScheduleError(f"{where} runs before {a.stage}GATHER: a stage's parameters are gathered "
                                        "before its first forward")
            elif finishes_weights(a):
                weights_left[a.stage] -= 1
            elif a.op is Op.REDUCE and weights_left[a.stage]:
                raise ScheduleError(f"{where} comes before {weights_left[a.stage]} more B/W of stage {a.stage}: a "
                                    "stage's gradients are reduced after its last weight gradient of the step")
