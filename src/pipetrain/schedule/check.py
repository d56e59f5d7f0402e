"""The schedule checker: placement, counts, F before B (I before W), matching sends, no deadlock."""

from __future__ import annotations

from collections import Counter, defaultdict

from .actions import Op, message_of
from .base import Schedule, ScheduleError
from .lowering import lower, message_order


def check(schedule: Schedule) -> None:
    """Raise ScheduleError, naming the rank, the action and the fix, unless the schedule is runnable.

    Proves that every stage runs F, then B (or I then W), exactly once for every microbatch on the rank
    that owns it, that every transfer has one SEND and one RECV posted in the same order on both ranks,
    and that the lowered order cannot deadlock (by running it on the dataflow model of `simulate`).
    A schedule with no backward actions at all is a forward-only (evaluation) schedule.
    """
    from .simulate import Costs, run_dataflow

    _check_placement(schedule)
    _check_counts(schedule)
    if schedule.lowered:
        _check_transfers(schedule)
    run_dataflow(lower(schedule), Costs())


def _check_placement(s: Schedule) -> None:
    if len(s.actions) != s.num_ranks:
        raise ScheduleError(f"schedule has action lists for {len(s.actions)} ranks but num_ranks={s.num_ranks}")
    if s.num_stages != s.num_ranks * s.stages_per_rank:
        raise ScheduleError(
            f"stage_to_rank places {s.num_stages} stages; expected num_ranks * stages_per_rank = "
            f"{s.num_ranks} * {s.stages_per_rank}")
    for rank in range(s.num_ranks):
        if len(s.stages_of(rank)) != s.stages_per_rank:
            raise ScheduleError(f"rank {rank} owns stages {list(s.stages_of(rank))}; every rank must own "
                                f"exactly stages_per_rank={s.stages_per_rank} (stage_to_rank={list(s.stage_to_rank)})")
    for rank, acts in enumerate(s.actions):
        for step, a in enumerate(acts):
            if not 0 <= a.stage < s.num_stages or not 0 <= a.mb < s.num_microbatches:
                raise ScheduleError(f"rank {rank}, step {step}: {a} is out of range "
                                    f"({s.num_stages} stages, {s.num_microbatches} microbatches)")
            if s.stage_to_rank[a.stage] != rank:
                raise ScheduleError(f"rank {rank}, step {step}: {a} belongs to stage {a.stage}, which runs on "
                                    f"rank {s.stage_to_rank[a.stage]}")
            if a.op.is_comm and not s.lowered:
                raise ScheduleError(f"rank {rank}, step {step}: {a} is a transfer in a schedule not marked "
                                    "lowered; give compute actions only and let `lower` add transfers")


def _check_counts(s: Schedule) -> None:
    counts = Counter((a.stage, a.op, a.mb) for acts in s.actions for a in acts if a.op.is_compute)
    backward = s.has_backward
    for stage in range(s.num_stages):
        for mb in range(s.num_microbatches):
            n = {op: counts[(stage, op, mb)] for op in (Op.F, Op.B, Op.I, Op.W)}
            where = f"stage {stage} (rank {s.stage_to_rank[stage]}), microbatch {mb}"
            if n[Op.F] != 1:
                raise ScheduleError(f"{where}: F runs {n[Op.F]} times; it must run exactly once")
            if not backward:
                continue
            if n[Op.I] != n[Op.W]:
                raise ScheduleError(f"{where}: I runs {n[Op.I]} times but W {n[Op.W]} times; "
                                    "a split backward needs both, once each")
            if n[Op.B] + n[Op.I] != 1:
                raise ScheduleError(f"{where}: backward runs {n[Op.B] + n[Op.I]} times "
                                    f"(B: {n[Op.B]}, I: {n[Op.I]}); it must run exactly once, as B or as I+W")


def _check_transfers(s: Schedule) -> None:
    expected = message_order(s.compute_only())
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    for rank, acts in enumerate(s.actions):
        for a in acts:
            if a.op.is_compute:
                continue
            value = message_of(a)
            if a.op in (Op.SEND_F, Op.SEND_B):
                peer = s.stage_to_rank[a.stage + (1 if a.op is Op.SEND_F else -1)]
                sends[(rank, peer)].append(value)
            else:
                peer = s.stage_to_rank[value.stage]
                recvs[(peer, rank)].append(value)
    for pair in sorted(set(expected) | set(sends) | set(recvs)):
        want = expected.get(pair, [])
        if sends.get(pair, []) != want:
            raise ScheduleError(f"rank {pair[0]} -> rank {pair[1]}: SENDs {sends.get(pair, [])} do not match "
                                f"the values the compute actions produce for that rank, in order: {want}")
        if recvs.get(pair, []) != want:
            raise ScheduleError(f"rank {pair[0]} -> rank {pair[1]}: RECVs are posted in the order "
                                f"{recvs.get(pair, [])} but sent in the order {want}; point-to-point "
                                "messages match first-in first-out, so this would mix up tensors or hang")
