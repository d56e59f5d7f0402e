"""A stage's data-parallel collectives (REDUCE, GATHER) as schedule actions: placed, checked, simulated."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipetrain.schedule as S
from pipetrain.schedule import Action, Op, Schedule, ScheduleError
from pipetrain.schedule.actions import finishes_weights

ALL = ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1", "zbv", "dualpipev"]
PER_RANK = {"gpipe": 1, "1f1b": 1, "zb-h1": 1, "zbv": 2, "dualpipev": 2, "interleaved-1f1b": 2, "looped-bfs": 2}


def _build(name, ranks, mbs):
    return S.build(name, num_ranks=ranks, num_microbatches=max(mbs, 2 * ranks), stages_per_rank=PER_RANK[name])


@pytest.mark.parametrize("text", ["1REDUCE", "0GATHER", "12REDUCE"])
def test_collective_actions_print_without_a_microbatch_and_parse_back(text):
    action = Action.parse(text)
    assert str(action) == text and action.op.is_collective and not action.op.is_comm and not action.op.is_compute


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ALL), st.integers(1, 5), st.integers(1, 10), st.booleans())
def test_each_stage_reduces_right_after_its_last_weight_gradient_and_send(name, ranks, mbs, gather):
    sched = _build(name, ranks, mbs)
    placed = S.with_collectives(sched, gather=gather)
    lowered = S.check(placed)  # (the checker proves the places)
    for rank, acts in enumerate(lowered.actions):
        for stage in sched.stages_of(rank):
            at = acts.index(Action(stage, Op.REDUCE, 0))
            last = max(i for i, a in enumerate(acts) if finishes_weights(a) and a.stage == stage)
            between = acts[last + 1:at]
            # (only postings in between: its SEND_B, receives posted ahead for later actions)
            assert all(a.op.value.startswith("RECV") or a.op is Op.SEND_B and a.stage == stage for a in between)
            assert all(a.op is not Op.SEND_B or a.stage != stage for a in acts[at:])  # the last send upstream
            if gather:
                first_f = min(i for i, a in enumerate(acts) if a.op is Op.F and a.stage == stage)
                assert acts.index(Action(stage, Op.GATHER, 0)) < first_f
    # free collectives change nothing; the CSV form keeps them
    assert S.simulate(placed).step_time == S.simulate(sched).step_time
    assert S.loads_csv(S.dumps_csv(placed)) == placed


def test_a_schedule_holding_one_kind_of_collective_gets_the_other():
    # (a schedule simulated with --cost-gather holds GATHERs only: run with replicas it still reduces)
    sched = S.build("1f1b", num_ranks=2, num_microbatches=4)
    gathers = S.with_collectives(sched, reduce=False, gather=True)
    both = S.with_collectives(gathers, reduce=True)
    assert {a.op for acts in both.actions for a in acts if a.op.is_collective} == {Op.GATHER, Op.REDUCE}
    assert S.with_collectives(both, reduce=True, gather=True) is both  # (kept as placed)
    S.check(both)


def _bulk_at_the_end(sched: Schedule) -> Schedule:
    """torch.distributed.pipelining's placement: every stage's reduction launched after the step's last action."""
    actions = [[*acts, *(Action(s, Op.REDUCE, 0) for s in sched.stages_of(r))] for r, acts in enumerate(sched.actions)]
    return Schedule(sched.name, sched.num_ranks, sched.num_microbatches, sched.stages_per_rank, sched.stage_to_rank,
                    actions)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ALL), st.integers(1, 5), st.integers(1, 10), st.floats(0.0, 4.0), st.floats(0.0, 1.0))
def test_reducing_after_each_stage_never_exposes_more_than_reducing_in_bulk(name, ranks, mbs, reduce, comm):
    sched = _build(name, ranks, mbs)
    costs = S.Costs(f=1.0, b=1.0, w=0.5, comm=comm, reduce=reduce)
    ours, bulk, bare = (S.simulate(s, costs) for s in (S.with_collectives(sched), _bulk_at_the_end(sched), sched))
    S.check(_bulk_at_the_end(sched))
    for mine, theirs, compute in zip(ours.per_rank, bulk.per_rank, bare.per_rank, strict=True):
        assert mine.exposed_collectives <= theirs.exposed_collectives + 1e-9
        # in bulk every reduction is exposed: the rank's stages' reductions back to back after its last action
        assert theirs.exposed_collectives == pytest.approx(reduce * sched.stages_per_rank)
        assert mine.busy_time == compute.busy_time
    assert bare.step_time <= ours.step_time <= bulk.step_time + 1e-9


def test_a_v_schedule_hides_its_first_stages_reduction_behind_the_cooldown():
    # zbv: rank 0's stage 3 finishes its weight gradients long before stage 0 does
    sched = S.build("zbv", num_ranks=2, num_microbatches=4)
    result = S.simulate(S.with_collectives(sched), S.Costs(reduce=2.0))
    # rank 0: only the last stage's shows; rank 1's stages finish one W apart, so its second reduction
    # queues 1 behind the first (one collective at a time per rank)
    assert [s.exposed_collectives for s in result.per_rank] == [2.0, 3.0]
    result = S.simulate(S.with_collectives(sched, gather=True), S.Costs(reduce=2.0, gather=1.0))
    assert result.per_rank[0].exposed_collectives == 3.0  # + the first stage's gather, before anything can run


def _custom(rows, ranks=2, mbs=2):
    return Schedule("custom", ranks, mbs, 1, tuple(range(ranks)), [[Action.parse(a) for a in r.split()] for r in rows])


@pytest.mark.parametrize("rows,message", [
    (["0F0 0F1 0B0 0REDUCE 0B1", "1F0 1F1 1B0 1B1 1REDUCE"], r"0REDUCE comes before 1 more B/W of stage 0"),
    (["0F0 0F1 0B0 0B1 0REDUCE 0REDUCE", "1F0 1F1 1B0 1B1 1REDUCE"], "stage 0 .* has 2 REDUCE actions"),
    (["0F0 0F1 0B0 0B1 0REDUCE", "1F0 1F1 1B0 1B1"], r"stage 1 \(rank 1\) has 0 REDUCE actions; with any, every"),
    (["0F0 0GATHER 0F1 0B0 0B1", "1GATHER 1F0 1F1 1B0 1B1"], r"rank 0, step 0: 0F0 runs before 0GATHER"),
    (["0F0 0F1 0REDUCE", "1F0 1F1"], "0REDUCE in a schedule without backward"),
])
def test_misplaced_collectives_are_refused_naming_the_rank_and_action(rows, message):
    with pytest.raises(ScheduleError, match=message):
        S.check(_custom(rows))


def test_generation_schedules_hold_no_collectives():
    gen = S.circulation((0, 1), prefill_rounds=[1, 1], rounds=[2, 2])
    broken = Schedule(gen.name, gen.num_ranks, gen.num_microbatches, gen.stages_per_rank, gen.stage_to_rank,
                      [[Action(0, Op.GATHER, 0), *gen.actions[0]], list(gen.actions[1])])
    with pytest.raises(ScheduleError, match="REDUCE and GATHER belong to training steps"):
        S.check(broken)


def test_the_cli_simulates_data_parallel_collectives(capsys):
    from pipetrain.cli import main

    assert main(["simulate", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--cost-reduce", "3",
                 "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert [r["exposed_collectives"] for r in out["per_rank"]] == [3.0, 3.0] and out["step_time"] == 18.0


# --- the order of every rank's collectives (schedule.collective_order) ----------------------------------
def _call(group, name):
    from pipetrain.schedule.collective_order import Call

    return Call(tuple(group), name)


def _dp2_pp2_programs(schedule="zbv", swap=None):
    """What a step of dp 2 x pp 2 issues on global ranks 0..3 (pipelines (0, 1) and (2, 3)); `swap`: a
    global rank whose REDUCEs are launched in the other order."""
    from pipetrain.pipeline.step_collectives import step_program
    from pipetrain.runtime.ties import TiedWeights

    sched = S.lower(S.with_collectives(S.build(schedule, num_ranks=2, num_microbatches=4)))
    programs = {}
    for replica in range(2):
        for rank in range(2):
            me = 2 * replica + rank
            acts = list(sched.actions[rank])
            if me == swap:
                at = [i for i, a in enumerate(acts) if a.op is Op.REDUCE]
                acts[at[0]], acts[at[1]] = acts[at[1]], acts[at[0]]
            programs[me] = step_program(acts, me=me, pipeline=(2 * replica, 2 * replica + 1), replicas=(rank, rank + 2),
                                        ties=TiedWeights([], {}, rank))
    return programs


def test_every_ranks_collectives_agree_in_a_dp_by_pp_step():
    from pipetrain.schedule.collective_order import check_collective_order

    programs = _dp2_pp2_programs()
    check_collective_order(programs)
    assert [str(c) for c in programs[0]] == ["3REDUCE (ranks 0, 2)", "0REDUCE (ranks 0, 2)",
                                             "the step's loss all-reduce over the pipeline (ranks 0, 1)",
                                             "the step's loss all-reduce over the replicas (ranks 0, 2)"]


def test_replicas_launching_their_reductions_in_another_order_are_refused_by_name():
    from pipetrain.schedule.collective_order import check_collective_order

    with pytest.raises(ScheduleError, match=r"ranks 0 and 2 disagree on the collectives over ranks 0, 2: collective 1 "
                                            r"is '3REDUCE' on rank 0 but '0REDUCE' on rank 2; collectives match in "
                                            r"the order they are issued"):
        check_collective_order(_dp2_pp2_programs(swap=2))


def test_a_cycle_across_groups_is_found_although_each_groups_order_agrees():
    # Megatron-LM#1810's shape: each pair agrees on its own order, but 0 waits for 1, 1 for 2, 2 for 0
    from pipetrain.schedule.collective_order import check_collective_order

    a, b, c = _call((0, 1), "embedding all-reduce"), _call((1, 2), "a"), _call((0, 2), "b")
    with pytest.raises(ScheduleError, match=r"(?s)wait on each other in a cycle.*rank 0 waits in embedding all-reduce "
                                            r"\(ranks 0, 1\) for rank 1, which waits in a \(ranks 1, 2\)"):
        check_collective_order({0: [a, c], 1: [b, a], 2: [c, b]})
    check_collective_order({0: [a, c], 1: [a, b], 2: [c, b]})  # (reordered on rank 1: it gets through)
    with pytest.raises(ScheduleError, match=r"collective 2 is 'x' on rank 0 but nothing \(it issues 1\) on rank 1"):
        check_collective_order({0: [a, _call((0, 1), "x")], 1: [a]})
    with pytest.raises(ScheduleError, match=r"rank 2 issues a \(ranks 0, 1\), over a group it is not in"):
        check_collective_order({2: [_call((0, 1), "a")]})
