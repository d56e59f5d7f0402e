"""Schedules as data: text forms, golden files, the checker, lowering and the simulator."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from regen_golden import golden_cases

import pipetrain.schedule as S
import pipetrain.schedule.actions  # noqa: F401  (S.actions.message_of)
from pipetrain.schedule import Action, Op, Schedule, ScheduleError
from pipetrain.schedule.actions import B, F

SCHEDULE_DIR = Path(S.__file__).parent


def test_schedule_package_never_imports_torch():
    for path in SCHEDULE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), f"{path.name} imports torch"
    code = "import sys, pipetrain.schedule as s; s.simulate(s.build('1f1b', num_ranks=2, num_microbatches=2)); " \
           "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("text", ["1F0", "3I7", "12W105", "0B3", "2SEND_F0", "1RECV_B4"])
def test_action_text_round_trip(text):
    assert str(Action.parse(text)) == text


def test_action_parse_rejects_garbage_with_the_format():
    with pytest.raises(ValueError, match=r"\{stage\}\{op\}\{microbatch\}"):
        Action.parse("F0")


ALL = ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1", "zbv", "dualpipev"]


def test_names_lists_registered_schedules():
    assert S.names() == ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "looped-bfs", "dualpipev", "zb-auto"]
    with pytest.raises(ValueError, match="available: gpipe, 1f1b"):
        S.build("nope", num_ranks=2, num_microbatches=2)


@pytest.mark.parametrize("name,ranks,mbs,per_rank,path", list(golden_cases()),
                         ids=lambda v: getattr(v, "name", str(v)))
def test_golden_files(name, ranks, mbs, per_rank, path):
    sched = S.build(name, num_ranks=ranks, num_microbatches=mbs, stages_per_rank=per_rank)
    assert S.dumps_csv(sched) == path.read_text(), "schedule changed; run `make golden` if intended"
    assert S.dumps_csv(S.lower(sched)) == path.with_suffix(".lowered.csv").read_text()
    assert S.load_csv(path) == sched
    S.check(S.load_csv(path.with_suffix(".lowered.csv")))


def test_gpipe_and_1f1b_by_value():
    assert [str(a) for a in S.build("1f1b", num_ranks=3, num_microbatches=4).actions[0]] == \
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3".split()
    assert [str(a) for a in S.build("gpipe", num_ranks=2, num_microbatches=2).actions[1]] == "1F0 1F1 1B0 1B1".split()


def test_1f1b_with_too_few_microbatches_names_the_alternative():
    with pytest.raises(ValueError, match="use 'gpipe'"):
        S.build("1f1b", num_ranks=4, num_microbatches=3)


@pytest.mark.parametrize("name,per_rank,message", [
    ("gpipe", 2, "one stage per rank"), ("1f1b", 2, "interleaved-1f1b runs several"), ("zb-h1", 2, "try 'zbv'"),
    ("zbv", 3, "exactly two stages per rank"), ("interleaved-1f1b", 1, "use '1f1b'"),
    ("dualpipev", 1, "exactly two stages per rank")])
def test_stages_per_rank_a_schedule_cannot_run_is_refused(name, per_rank, message):
    with pytest.raises(ValueError, match=message):
        S.build(name, num_ranks=2, num_microbatches=4, stages_per_rank=per_rank)


def test_interleaved_with_too_few_microbatches_names_the_alternatives():
    with pytest.raises(ValueError, match="'looped-bfs' / 'gpipe'"):
        S.build("interleaved-1f1b", num_ranks=4, num_microbatches=3)


def test_default_stages_per_rank_is_the_schedules_own():
    assert S.build("zbv", num_ranks=2, num_microbatches=4).stages_per_rank == 2
    assert S.build("interleaved-1f1b", num_ranks=2, num_microbatches=4).stages_per_rank == 2
    assert S.build("zb-h1", num_ranks=2, num_microbatches=4).stages_per_rank == 1


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(ALL), st.integers(1, 6), st.integers(1, 14), st.integers(2, 3))
def test_every_schedule_checks_at_every_size_it_accepts(name, ranks, mbs, per_rank):
    per_rank = {"gpipe": 1, "1f1b": 1, "zb-h1": 1, "zbv": 2, "dualpipev": 2}.get(name, per_rank)
    try:
        sched = S.build(name, num_ranks=ranks, num_microbatches=mbs, stages_per_rank=per_rank)
    except ValueError as err:  # the only sizes refused: M < P for 1F1B families, M < 2P for dualpipev
        assert mbs < (2 * ranks if name == "dualpipev" else ranks) and "microbatches" in str(err)
        return
    S.check(S.lower(sched))
    assert sched.num_stages == ranks * per_rank
    result = S.simulate(sched)
    assert 0 <= result.bubble_fraction < 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 16), st.integers(2, 4))
def test_interleaved_bubble_is_the_textbook_one_for_any_microbatch_count(ranks, mbs, per_rank):
    if mbs < ranks:
        return
    sched = S.build("interleaved-1f1b", num_ranks=ranks, num_microbatches=mbs, stages_per_rank=per_rank)
    result = S.simulate(sched, S.Costs(f=1.0, b=1.0, w=1.0))
    assert result.bubble_fraction == pytest.approx((ranks - 1) / (per_rank * mbs + ranks - 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(2, 32))
def test_dualpipev_idles_like_zbv_holding_one_microbatch_more(ranks, mbs):
    if mbs < 2 * ranks:
        with pytest.raises(ValueError, match=f"at least 2 x ranks = {2 * ranks} microbatches"):
            S.build("dualpipev", num_ranks=ranks, num_microbatches=mbs)
        return
    dual = S.simulate(S.build("dualpipev", num_ranks=ranks, num_microbatches=mbs))
    zbv = S.simulate(S.build("zbv", num_ranks=ranks, num_microbatches=mbs))
    assert dual.bubble_fraction == pytest.approx(zbv.bubble_fraction)
    assert max(s.peak_activations for s in dual.per_rank) == 2 * ranks + 1


def test_dualpipev_by_value():  # the phases of deepseek-ai/DualPipe's dualpipev.py, P=2, M=4
    assert [str(a) for a in S.build("dualpipev", num_ranks=2, num_microbatches=4).actions[0]] == (
        "0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0I2 0W2 0I3 0W3").split()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(1, 32))
def test_zb_h1_idles_a_third_of_1f1b_with_1f1b_peak_memory(ranks, mbs):
    # idle per rank: 1F1B (P-1)(f+b+w) = 3(P-1); ZB-H1 (P-1)(f+b-w) = P-1, which no one-stage-per-rank
    # schedule beats (rank P-1 starts after P-1 forwards). As a fraction of the step, the ratio is
    # (M+P-1)/(3M+P-1): under 45% from M >= 1.6(P-1), e.g. M >= 2P.
    if mbs < ranks:
        return
    zb = S.simulate(S.build("zb-h1", num_ranks=ranks, num_microbatches=mbs))
    one = S.simulate(S.build("1f1b", num_ranks=ranks, num_microbatches=mbs))
    for z, o in zip(zb.per_rank, one.per_rank, strict=True):
        assert zb.step_time - z.busy_time == pytest.approx((one.step_time - o.busy_time) / 3)
    if mbs >= 2 * ranks:
        assert zb.bubble_fraction <= 0.45 * one.bubble_fraction
    assert max(s.peak_activations for s in zb.per_rank) <= max(s.peak_activations for s in one.per_rank)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 32))
def test_zbv_reaches_the_lower_bound_for_two_stages_per_rank(ranks, mbs):
    # Rank P-1 cannot start before P-1 forwards upstream; every rank has 6M units of work (2 stages x F+I+W),
    # so no schedule beats (P-1)/(6M+P-1). zbv meets it from M = 2P-1 on, with 1F1B's peak memory.
    if mbs < 2 * ranks - 1:
        return
    zbv = S.simulate(S.build("zbv", num_ranks=ranks, num_microbatches=mbs))
    assert zbv.bubble_fraction == pytest.approx((ranks - 1) / (6 * mbs + ranks - 1))
    assert max(s.peak_activations for s in zbv.per_rank) <= 2 * ranks  # half-size stages: P full microbatches


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["gpipe", "1f1b"]), st.integers(1, 8), st.integers(1, 16))
def test_every_size_checks_and_matches_the_textbook_bubble(name, ranks, mbs):
    if name == "1f1b" and mbs < ranks:
        return
    sched = S.build(name, num_ranks=ranks, num_microbatches=mbs)
    S.check(S.lower(sched))
    result = S.simulate(sched, S.Costs(f=1.0, b=1.0, w=1.0))
    assert result.bubble_fraction == pytest.approx((ranks - 1) / (mbs + ranks - 1))
    assert result.step_time == pytest.approx(3 * (mbs + ranks - 1))
    peaks = [s.peak_activations for s in result.per_rank]
    assert peaks == ([mbs] * ranks if name == "gpipe" else [min(ranks - r, mbs) for r in range(ranks)])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 10), st.floats(0.0, 1.0))
def test_comm_cost_lengthens_gpipe_by_two_transfers_per_boundary(ranks, mbs, comm):
    # Transfers start once both sides posted; receives are posted at least one compute action (f = 1) early, so
    # any transfer no slower than one forward is hidden except on the critical path's boundary crossings.
    base = S.simulate(S.build("gpipe", num_ranks=ranks, num_microbatches=mbs), S.Costs(comm=0.0))
    slow = S.simulate(S.build("gpipe", num_ranks=ranks, num_microbatches=mbs), S.Costs(comm=comm))
    assert slow.step_time == pytest.approx(base.step_time + 2 * (ranks - 1) * comm)


def test_lowering_pairs_every_send_with_a_recv_in_order():
    lowered = S.lower(S.build("1f1b", num_ranks=4, num_microbatches=6))
    sends = [a for acts in lowered.actions for a in acts if a.op in (Op.SEND_F, Op.SEND_B)]
    recvs = [a for acts in lowered.actions for a in acts if a.op in (Op.RECV_F, Op.RECV_B)]
    assert len(sends) == len(recvs) == 2 * 3 * 6
    assert lowered.actions[3][0] == Action(3, Op.RECV_F, 0)  # receives are posted ahead of the compute


def _custom(actions, ranks=2, mbs=2, lowered=False):
    return Schedule("custom", ranks, mbs, 1, tuple(range(ranks)),
                    [[Action.parse(a) for a in row.split()] for row in actions], lowered=lowered)


@pytest.mark.parametrize("rows,message", [
    (["0F0 0B0", "1F0 1F1 1B0 1B1"], "stage 0 .*microbatch 1: F runs 0 times"),
    (["0F0 0F0 0F1 0B0 0B1", "1F0 1F1 1B0 1B1"], "F runs 2 times"),
    (["0F0 0F1 0B0 0B1 0B1", "1F0 1F1 1B0 1B1"], "backward runs 2 times"),
    (["0B0 0F0 0F1 0B1", "1F0 1F1 1B0 1B1"], "needs the output of stage 0 for microbatch 0"),
    (["0F0 0F1 1B0 0B0 0B1", "1F0 1F1 1B1"], "belongs to stage 1, which runs on rank 1"),
    (["0F0 0B0 0F1 0B1", "1F0 1F1 1B0 1B1"], "deadlock"),
    (["0F0 0F1 0I0 0B1", "1F0 1F1 1B0 1B1"], "I runs 1 times but W 0 times"),
    (["0F0 0F1 0B0 0B1 0F2", "1F0 1F1 1B0 1B1"], "out of range"),
])
def test_checker_rejects_broken_schedules_clearly(rows, message):
    with pytest.raises(ScheduleError, match=message):
        S.check(_custom(rows))


def test_deadlock_message_names_ranks_actions_and_marks_the_grid():
    with pytest.raises(ScheduleError) as err:
        S.check(_custom(["0F0 0B0 0F1 0B1", "1F0 1F1 1B0 1B1"]))
    text = str(err.value)
    assert "rank 0 waits at 0B0 for the input gradient of stage 1 for microbatch 0" in text
    assert "rank 1 waits at 1F1 for the output of stage 0 for microbatch 1" in text
    assert "<-- ERROR HERE" in text and "*0B0*" in text


def test_checker_rejects_receives_posted_out_of_send_order():
    lowered = S.lower(S.build("gpipe", num_ranks=2, num_microbatches=2))
    rows = [" ".join(map(str, acts)) for acts in lowered.actions]
    rows[1] = rows[1].replace("1RECV_F0 1RECV_F1", "1RECV_F1 1RECV_F0")
    with pytest.raises(ScheduleError, match="first-in first-out"):
        S.check(_custom(rows, lowered=True))


def test_checker_rejects_a_lowered_schedule_missing_a_send():
    lowered = S.lower(S.build("gpipe", num_ranks=2, num_microbatches=2))
    rows = [" ".join(str(a) for a in acts if str(a) != "0SEND_F1") for acts in lowered.actions]
    with pytest.raises(ScheduleError, match="SENDs"):
        S.check(_custom(rows, lowered=True))


def test_csv_round_trip_and_bad_csv():
    sched = S.build("1f1b", num_ranks=3, num_microbatches=5)
    assert S.loads_csv(S.dumps_csv(sched)) == sched
    assert S.loads_csv(S.dumps_csv(S.lower(sched))) == S.lower(sched)
    with pytest.raises(ValueError, match="line 2"):
        S.loads_csv("# ranks=1\n0,0F0,oops\n")


def test_forward_only_schedule_checks_and_has_no_backward():
    fwd = S.build("1f1b", num_ranks=2, num_microbatches=3).forward_only()
    S.check(fwd)
    assert not fwd.has_backward and all(a.op is Op.F for acts in fwd.actions for a in acts)


def test_per_stage_costs_and_timeline_picture():
    sched = S.build("gpipe", num_ranks=2, num_microbatches=2)
    res = S.simulate(sched, S.Costs(f=[1.0, 2.0], b=[1.0, 2.0], w=0.0))
    assert res.step_time == pytest.approx(1 + 2 + 2 + 2 + 2 + 1)
    text = S.format_timeline(res.timeline)
    assert text.splitlines()[0].startswith("rank  0: 0F0 0F1")
    assert F(0, 0) in {e.action for e in res.timeline.events} and B(1, 1) in {e.action for e in res.timeline.events}


@pytest.mark.parametrize("name", ALL)
def test_checker_rejects_each_schedule_when_broken(name):
    sched = S.build(name, num_ranks=3, num_microbatches=6)
    rows = [list(acts) for acts in sched.actions]

    def rebuilt(new_rows, lowered=False):
        return Schedule(name, 3, 6, sched.stages_per_rank, sched.stage_to_rank, new_rows, lowered=lowered)

    dropped = [row[:] for row in rows]
    dropped[1].pop()
    with pytest.raises(ScheduleError, match="microbatch 5: .* 0 times"):
        S.check(rebuilt(dropped))
    early = [row[:] for row in rows]  # move rank 0's first backward-type action to the front
    i = next(i for i, a in enumerate(early[0]) if a.op in (Op.B, Op.I))
    early[0].insert(0, early[0].pop(i))
    with pytest.raises(ScheduleError, match="needs .* which this rank has not computed yet"):
        S.check(rebuilt(early))
    lowered = [list(acts) for acts in S.lower(sched).actions]
    recvs = [i for i, a in enumerate(lowered[1]) if a.op in (Op.RECV_F, Op.RECV_B)]
    same_peer = [(i, j) for i in recvs for j in recvs if i < j and
                 sched.stage_to_rank[S.actions.message_of(lowered[1][i], sched.num_stages)[1]] ==
                 sched.stage_to_rank[S.actions.message_of(lowered[1][j], sched.num_stages)[1]]]
    i, j = same_peer[0]
    lowered[1][i], lowered[1][j] = lowered[1][j], lowered[1][i]
    with pytest.raises(ScheduleError, match="first-in first-out|no RECV for it was posted"):
        S.check(rebuilt(lowered, lowered=True))


@pytest.mark.parametrize("name", ALL)
def test_stages_on_one_rank_pass_activations_locally(name):
    lowered = S.lower(S.build(name, num_ranks=3, num_microbatches=6))
    for rank, acts in enumerate(lowered.actions):
        for a in acts:
            if a.op in (Op.SEND_F, Op.SEND_B):
                peer_stage = a.stage + 1 if a.op is Op.SEND_F else a.stage - 1
                assert lowered.stage_to_rank[peer_stage] != rank, f"{name}: {a} sends to its own rank"
    if name == "zbv":  # the V's turn (stages P-1 and P on rank P-1) needs no transfer
        assert not any(str(a) in ("2SEND_F0", "3SEND_B0") for a in lowered.actions[2])
