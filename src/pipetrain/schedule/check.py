"""The schedule checker: placement, counts, F before B (I before W), matching sends, no deadlock."""

from __future__ import annotations

from collections import Counter, defaultdict

from .actions import SENDS, VOCABULARY, Op, consumer, message_of
from .base import Schedule, ScheduleError
from .collectives import check_collectives
from .lowering import lower, message_order
from .overlap import check_pairs


def check(schedule: Schedule) -> Schedule:
    """Raise ScheduleError, naming the rank, the action and the fix, unless the schedule is runnable; return
    the lowered schedule it proved (`schedule` itself if it was lowered).

    Proves that every stage runs F, then B (or I then W), exactly once for every microbatch on the rank
    that owns it, that every transfer has one SEND and one RECV posted in the same order on both ranks, that
    data-parallel collectives (REDUCE, GATHER) sit where they may (`check_collectives`), that overlapped
    pairs are a forward and a backward that may run together (`check_pairs`),
    and that the lowered order cannot deadlock (by running it on the dataflow model of `simulate`).
    A schedule with no backward actions at all is a forward-only (evaluation) schedule.
    """
    from .simulate import Costs, run_dataflow

    _check_placement(schedule)
    _check_counts(schedule)
    check_collectives(schedule)
    check_pairs(schedule)
    if schedule.lowered:
        _check_transfers(schedule)
    lowered = lower(schedule)
    run_dataflow(lowered, Costs())
    return lowered


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
            if a.op._value_ in VOCABULARY:
                if a.stage != rank:
                    raise ScheduleError(f"rank {rank}, step {step}: {a} is vocabulary shard {a.stage}'s pass; "
                                        f"shard r runs on rank r, so rank {rank} runs {rank}{a.op.value}{a.mb}")
                continue
            if s.stage_to_rank[a.stage] != rank:
                raise ScheduleError(f"rank {rank}, step {step}: {a} belongs to stage {a.stage}, which runs on "
                                    f"rank {s.stage_to_rank[a.stage]}")
            if a.op.is_comm and not s.lowered:
                raise ScheduleError(f"rank {rank}, step {step}: {a} is a transfer in a schedule not marked "
                                    "lowered; give compute actions only and let `lower` add transfers")


def _check_counts(s: Schedule) -> None:
    if any(a.op is Op.P or a.op is Op.D for acts in s.actions for a in acts):
        return _check_rounds(s)
    counts = Counter((a.stage, a.op, a.mb) for acts in s.actions for a in acts if a.op.is_compute)
    backward = s.has_backward
    if s.vocabulary_shards:
        _check_vocabulary(s, counts, backward)
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


def _check_vocabulary(s: Schedule, counts: Counter, backward: bool) -> None:
    """Every rank runs its shard's E and S once per microbatch (and T and G, with a backward), each kind in
    microbatch order: their collectives over the pipeline's ranks match by order."""
    for rank, acts in enumerate(s.actions):
        for op in (Op.E, Op.S, Op.T, Op.G) if backward else (Op.E, Op.S):
            for mb in range(s.num_microbatches):
                if counts[(rank, op, mb)] != 1:
                    passes = "E, S, T and G" if backward else "E and S"
                    raise ScheduleError(f"rank {rank}: vocabulary pass {rank}{op.value}{mb} runs "
                                        f"{counts[(rank, op, mb)]} times; every rank runs its shard's {passes} once "
                                        "for every microbatch (`with_vocabulary` places them)")
            order = [a.mb for a in acts if a.op is op]
            if order != sorted(order):
                raise ScheduleError(f"rank {rank}: its {op.value} passes run microbatches {order}; they must run in "
                                    "microbatch order on every rank (their collectives match by order)")
        if not backward and (counts[(rank, Op.T, 0)] or counts[(rank, Op.G, 0)]):
            raise ScheduleError(f"rank {rank}: a T or G pass in a schedule without backward")


def _check_rounds(s: Schedule) -> None:
    """A generation schedule: every group runs the same rounds 0, 1, ... on every stage, each once, prefill
    (P) rounds first, and nothing else."""
    seen: dict[tuple[int, int], dict[int, Op]] = defaultdict(dict)
    for rank, acts in enumerate(s.actions):
        for a in acts:
            if not a.op.is_compute:
                continue
            if a.op is not Op.P and a.op is not Op.D:
                raise ScheduleError(f"rank {rank}: {a} in a generation schedule; it holds P and D passes only")
            if a.round in seen[(a.stage, a.mb)]:
                raise ScheduleError(f"stage {a.stage} (rank {rank}), group {a.mb}: round {a.round} runs twice")
            seen[(a.stage, a.mb)][a.round] = a.op
    for group in range(s.num_microbatches):
        want = None
        for stage in range(s.num_stages):
            ops = [seen[(stage, group)].get(t) for t in range(len(seen[(stage, group)]))]
            where = f"stage {stage} (rank {s.stage_to_rank[stage]}), group {group}"
            if None in ops or not ops:
                raise ScheduleError(f"{where}: runs rounds {sorted(seen[(stage, group)])}; it must run rounds "
                                    "0, 1, 2, ... without a gap")
            first_decode = ops.index(Op.D) if Op.D in ops else len(ops)
            if first_decode == 0 or Op.P in ops[first_decode:]:
                raise ScheduleError(f"{where}: rounds {''.join(op.value for op in ops)}; a group's prefill (P) "
                                    "rounds come first, then its decode (D) rounds")
            if want is None:
                want = ops
            elif ops != want:
                raise ScheduleError(f"{where}: rounds {''.join(op.value for op in ops)}, but stage 0 runs "
                                    f"{''.join(op.value for op in want)}; every stage runs a group's rounds alike")


def _check_transfers(s: Schedule) -> None:
    expected = message_order(s.compute_only())
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    for rank, acts in enumerate(s.actions):
        for a in acts:
            if not a.op.is_comm:
                continue
            value = message_of(a, s.num_stages)
            if a.op.value in SENDS:
                target = consumer(value, s.num_stages)[0]
                if not 0 <= target < s.num_stages:
                    raise ScheduleError(f"rank {rank}: {a} sends {value} to stage {target}, which does not exist")
                sends[(rank, s.stage_to_rank[target])].append(value)
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
