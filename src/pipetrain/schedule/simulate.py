"""Event-driven simulation of a lowered schedule: step time, bubble per rank, deadlock detection."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from .actions import (
    RECVS,
    SENDS,
    Action,
    Op,
    Value,
    by_collective,
    consumes,
    describe,
    message_of,
    produces,
    rank_of_value,
)
from .base import Schedule, ScheduleError, format_table
from .lowering import lower
from .timeline import Event, RankStats, Timeline

PerStage = float | Sequence[float]


@dataclass(frozen=True)
class Costs:
    """Time of F, I (`b`) and W for one stage and one microbatch; B costs `b + w`.

    Each of `f`, `b`, `w` is one number for every stage or a sequence indexed by stage.
    `comm` is the time of one stage-to-stage transfer (zero between stages on the same rank).
    `post` is the time a rank itself spends posting one SEND or RECV (the transport's call overhead).
    `reduce` and `gather` (per stage, like `f`) are the times of a stage's REDUCE and GATHER collectives,
    which run beside the rank's compute (one collective at a time per rank).
    `all_to_all` (per stage) is the time of the all-to-alls inside one F, and again inside one B or I (expert
    parallel's dispatch and combine, and their backward): waited for alone, hidden behind the other lane's
    compute in an overlapped pair (`pair_time`).
    `s`, `t`, `e` and `g` are the times of one vocabulary shard's S, T, E and G for one microbatch (vocabulary
    parallelism: its logits and softmax statistics; their backward; its rows of the input embedding; their
    gradient); `collective` the time their collectives take to bring a value (None: `comm`).
    """

    f: PerStage = 1.0
    b: PerStage = 1.0
    w: PerStage = 1.0
    comm: float = 0.0
    post: float = 0.0
    reduce: PerStage = 0.0
    gather: PerStage = 0.0
    all_to_all: PerStage = 0.0
    s: float = 1.0
    t: float = 2.0
    e: float = 0.0
    g: float = 0.0
    collective: float | None = None

    @property
    def collective_time(self) -> float:
        return self.comm if self.collective is None else self.collective

    def exchange(self, action: Action) -> float:
        """The all-to-all time inside a compute action (F, B, I; none in W or generation)."""
        if action.op is Op.F or action.op is Op.B or action.op is Op.I:
            return _at(self.all_to_all, action.stage)
        return 0.0

    def of(self, action: Action) -> float:
        """The compute time of an action (without its all-to-alls), or a posting's or collective's time."""
        s = action.stage
        if action.op is Op.F or action.op is Op.P or action.op is Op.D:  # a generation pass: a forward
            return _at(self.f, s)
        if action.op is Op.I:
            return _at(self.b, s)
        if action.op is Op.W:
            return _at(self.w, s)
        if action.op is Op.B:
            return _at(self.b, s) + _at(self.w, s)
        if action.op is Op.S:
            return self.s
        if action.op is Op.T:
            return self.t
        if action.op is Op.E:
            return self.e
        if action.op is Op.G:
            return self.g
        if action.op is Op.REDUCE:
            return _at(self.reduce, s)
        if action.op is Op.GATHER:
            return _at(self.gather, s)
        return self.post


def _at(cost: PerStage, stage: int) -> float:
    """One stage's cost: the number itself, or the sequence's entry for the stage."""
    return float(cost) if isinstance(cost, int | float) else float(cost[stage])


def pair_time(compute: tuple[float, float], exchange: tuple[float, float]) -> tuple[float, tuple[float, float]]:
    """An overlapped pair's time and each lane's exposed all-to-all: the lanes take turns, so each lane's
    all-to-all hides behind the other's compute and shows only where it is longer (taken spread evenly over the
    lane's turns): each lane exposes max(0, its exchange - the other's compute)."""
    exposed = (max(0.0, exchange[0] - compute[1]), max(0.0, exchange[1] - compute[0]))
    return compute[0] + compute[1] + exposed[0] + exposed[1], exposed


@dataclass(frozen=True)
class SimResult:
    schedule: Schedule  # the lowered schedule that was simulated
    timeline: Timeline
    step_time: float
    bubble_fraction: float  # mean over ranks
    per_rank: list[RankStats]


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimResult:
    """Run the lowered action lists on a model clock and summarize the resulting timeline."""
    lowered = lower(schedule)
    exposed: list[Event] = []
    events, waits = run_dataflow(lowered, costs or Costs(), exposed)
    timeline = Timeline(lowered.num_ranks, tuple(events), tuple(waits), all_to_all=tuple(exposed))
    per_rank = timeline.per_rank()
    bubble = sum(s.bubble_fraction for s in per_rank) / len(per_rank)
    return SimResult(lowered, timeline, timeline.step_time(), bubble, per_rank)


def run_dataflow(lowered: Schedule, costs: Costs, exposed: list[Event] | None = None,
                 ) -> tuple[list[Event], list[Event]]:
    """Execute a lowered schedule on a model clock; raise ScheduleError on misorder or deadlock.

    SEND and RECV post a transfer, which takes the rank `post` (often zero). A message is in flight from
    the later of its SEND and RECV postings and arrives `comm` later. A compute action starts when its rank is
    free and every input has arrived (the time in between is a wait). Each rank runs until it waits on a
    message not yet sent; a SEND wakes the rank waiting on it. Ranks left waiting when nothing can run are
    deadlocked. A collective (REDUCE, GATHER) runs on its rank's collective lane from the later of its launch
    and the lane's previous collective, beside the compute (its replicas run the same actions, so they are
    taken to launch it at the same time); a stage's F waits for its GATHER, and the rank's step ends when its
    last REDUCE does. Waits on collectives are waits of the collective's action. A value that vocabulary
    parallelism's collectives carry (`by_collective`) arrives `comm` after it is computed. Returns the events
    and waits.
    """
    num_stages, rank_of, shards = lowered.num_stages, lowered.stage_to_rank, lowered.vocabulary_shards
    pos = [0] * lowered.num_ranks
    clock = [0.0] * lowered.num_ranks
    lane = [0.0] * lowered.num_ranks  # when each rank's collective lane is free
    gathers = {a.stage for acts in lowered.actions for a in acts if a.op is Op.GATHER}
    gathered: dict[int, float] = {}  # stage -> the end of its GATHER
    last_reduce: list[Action | None] = [None] * lowered.num_ranks
    done: dict[Value, float] = {}
    sent: dict[Value, float] = {}
    posted: dict[tuple[int, Value], float] = {}
    blocked_on: dict[int, Value] = {}
    waiting: dict[Value, list[int]] = defaultdict(list)
    events: list[Event] = []
    waits: list[Event] = []
    ready = deque(range(lowered.num_ranks))

    def fail(rank: int, why: str) -> ScheduleError:
        grid = format_table(lowered, mark=[(rank, pos[rank])])
        return ScheduleError(f"rank {rank}, step {pos[rank]} ({lowered.actions[rank][pos[rank]]}): {why}\n{grid}")

    while ready:
        r = ready.popleft()
        acts = lowered.actions[r]
        while pos[r] < len(acts):
            a = acts[pos[r]]
            if a.op.is_comm and (posting := costs.of(a)) > 0:
                events.append(Event(r, a, clock[r], clock[r] + posting))
                clock[r] += posting
            if a.op._value_ in SENDS:
                value = message_of(a, num_stages)
                if value not in done:
                    raise fail(r, f"sends {describe(value)} before computing it")
                sent[value] = clock[r]
                ready.extend(waiting.pop(value, ()))
            elif a.op._value_ in RECVS:
                posted[(r, message_of(a, num_stages))] = clock[r]
            elif a.op.is_collective:
                start = max(clock[r], lane[r])
                lane[r] = start + costs.of(a)
                events.append(Event(r, a, start, lane[r]))
                if a.op is Op.GATHER:
                    gathered[a.stage] = lane[r]
                else:
                    last_reduce[r] = a
            else:
                unit = (a, acts[pos[r] + 1]) if pos[r] + 1 < len(acts) and acts[pos[r] + 1].paired else (a,)
                start, missing = clock[r], None
                for x in unit:
                    for value in consumes(x, num_stages, shards):
                        if rank_of_value(value, rank_of) == r:
                            if value not in done:
                                raise fail(r, f"needs {describe(value)}, which this rank has not computed yet")
                            start = max(start, done[value])
                        elif by_collective(value, x):
                            if value not in done:
                                missing = value
                                break
                            start = max(start, done[value] + costs.collective_time)
                        elif (r, value) not in posted:
                            raise fail(r, f"needs {describe(value)} from rank {rank_of[value.stage]} "
                                          "but no RECV for it was posted before")
                        elif value not in sent:
                            missing = value
                            break
                        else:
                            start = max(start, max(sent[value], posted[(r, value)]) + costs.comm)
                    if missing is not None:
                        break
                if missing is not None:
                    blocked_on[r] = missing
                    waiting[missing].append(r)
                    break
                if start > clock[r]:
                    waits.append(Event(r, a, clock[r], start))
                for x in unit:
                    if x.stage in gathers and x.op is Op.F:
                        if x.stage not in gathered:
                            raise fail(r, f"runs before {x.stage}GATHER: the stage's parameters are not gathered")
                        if gathered[x.stage] > start:
                            waits.append(Event(r, Action(x.stage, Op.GATHER, 0), start, gathered[x.stage]))
                            start = gathered[x.stage]
                if len(unit) == 1:
                    exchanges = (costs.exchange(a),)
                    length = costs.of(a) + exchanges[0]
                else:
                    length, exchanges = pair_time((costs.of(a), costs.of(unit[1])),
                                                  (costs.exchange(a), costs.exchange(unit[1])))
                end = start + length
                at = end - sum(exchanges)
                for x, shown in zip(unit, exchanges, strict=True):
                    done[value := produces(x)] = end
                    if shards and value in waiting:  # (a rank waits on a vocabulary collective's value)
                        ready.extend(waiting.pop(value))
                    events.append(Event(r, x, start, end))
                    if shown > 0 and exposed is not None:
                        exposed.append(Event(r, x, at, at + shown))
                        at += shown
                clock[r] = end
                pos[r] += len(unit) - 1
            pos[r] += 1
        else:
            blocked_on.pop(r, None)
            if last_reduce[r] is not None and lane[r] > clock[r]:  # the step ends with the last reduction
                waits.append(Event(r, last_reduce[r], clock[r], lane[r]))

    stuck = [r for r in range(lowered.num_ranks) if pos[r] < len(lowered.actions[r])]
    if stuck:
        lines = []
        for r in stuck:
            value = blocked_on[r]
            peer = rank_of_value(value, rank_of)
            peer_at = (f"stuck at {lowered.actions[peer][pos[peer]]}" if pos[peer] < len(lowered.actions[peer])
                       else "finished without sending it")
            lines.append(f"  rank {r} waits at {lowered.actions[r][pos[r]]} for {describe(value)} "
                         f"from rank {peer}, which is {peer_at}")
        marks = [(r, pos[r]) for r in stuck]
        raise ScheduleError("deadlock: the ranks wait on each other in a cycle\n" + "\n".join(lines)
                            + "\n" + format_table(lowered, mark=marks))
    return events, waits
