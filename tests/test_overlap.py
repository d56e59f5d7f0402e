"""Overlapped pairs: the `+` actions of the schedule IR, the `overlap` transform, their simulation, and the lanes
that run a pair taking turns at their collectives."""

import threading
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pipetrain as pt
from pipetrain.runtime.overlap import BACKWARD, FORWARD, Lanes
from pipetrain.schedule import Action, Costs, Op, ScheduleError, check, format_timeline, lower, simulate
from pipetrain.schedule.base import Schedule
from pipetrain.schedule.compare import compare
from pipetrain.schedule.io import timeline_from_json, timeline_to_json
from pipetrain.schedule.overlap import overlap, pairable

A2A = Costs(all_to_all=0.5)


def test_a_paired_action_prints_with_a_plus_parses_back_and_equals_the_action_unpaired():
    a = Action.parse("+1B0")
    assert a.paired and str(a) == "+1B0" and a == Action(1, Op.B, 0) and hash(a) == hash(Action(1, Op.B, 0))
    assert not Action.parse("1B0").paired
    for text in ("+1REDUCE", "+1W0", "+1SEND_F0", "+1D0@1"):
        with pytest.raises(ValueError, match="pair"):
            Action.parse(text)


def _one_rank(*cells: str) -> Schedule:
    return Schedule("custom", 1, 3, 1, (0,), [[Action.parse(c) for c in cells]])


@pytest.mark.parametrize("cells, message", [
    (("0F0", "+0B0", "0F1", "0B1", "0F2", "0B2"), "cannot run together with 0F0"),  # B needs F's output
    (("0F0", "0F1", "+0F2", "0B0", "0B1", "0B2"), "one forward"),
    (("+0F0", "0B0", "0F1", "0B1", "0F2", "0B2"), "found nothing"),
])
def test_check_refuses_a_pair_that_cannot_run_together(cells, message):
    with pytest.raises(ScheduleError, match=message):
        check(_one_rank(*cells))


def test_a_pair_behind_a_transfer_in_a_lowered_schedule_is_refused():
    lowered = lower(overlap(pt.schedules.build("dualpipev", num_ranks=2, num_microbatches=4)))
    acts = list(lowered.actions[0])
    i = next(i for i, a in enumerate(acts) if a.paired and acts[i + 1].op.is_comm)
    acts.insert(i, acts.pop(i + 1))  # the transfer after the pair moved between its two halves
    broken = Schedule(lowered.name, 2, 4, 2, lowered.stage_to_rank, [acts, lowered.actions[1]], lowered=True)
    with pytest.raises(ScheduleError, match="must be a compute action"):
        check(broken)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(pt.schedules.names()), ranks=st.integers(1, 4), microbatches=st.integers(1, 9),
       a2a=st.sampled_from([0.0, 0.3, 1.0]))
def test_overlap_keeps_every_action_in_order_pairs_only_what_may_run_together_and_never_slows_the_step(
        name, ranks, microbatches, a2a):
    try:
        plain = pt.schedules.build(name, num_ranks=ranks, num_microbatches=microbatches)
    except ValueError:
        return
    costs = Costs(f=1.0, b=1.5, w=0.7, all_to_all=a2a)
    paired = overlap(plain, costs)
    lowered = check(paired)  # runs: every pair adjacent, a forward with a backward, no deadlock
    for before, after in zip(plain.actions, paired.actions, strict=True):
        assert list(before) == list(after)  # (equality ignores `paired`)
        for x, y in zip(after, after[1:], strict=False):
            assert not y.paired or pairable(x, y, plain.num_stages)
    for acts in lowered.actions:  # lowering keeps each pair's halves together
        for x, y in zip(acts, acts[1:], strict=False):
            assert not y.paired or (x.op.is_compute and not x.paired)
    pairs = sum(a.paired for acts in paired.actions for a in acts)
    assert simulate(paired, costs).step_time <= simulate(plain, costs).step_time + 1e-9
    if a2a == 0:
        assert pairs == 0  # nothing to hide: a pair cannot be faster than its two actions in a row
    assert paired.name == f"{name}+overlap"


def test_one_rank_1f1b_pairs_each_backward_with_the_next_forward_and_hides_their_all_to_alls():
    paired = overlap(pt.schedules.build("1f1b", num_ranks=1, num_microbatches=4), A2A)
    assert " ".join(map(str, paired.actions[0])) == "0F0 0B0 +0F1 0B1 +0F2 0B2 +0F3 0B3"
    result = simulate(paired, A2A)
    # pairs: F and B (1 + 2) with all-to-alls of 0.5 each hidden behind the other lane; alone: F0 and B3 show
    assert result.step_time == pytest.approx((1 + 0.5) + 3 * 3 + (2 + 0.5))
    assert result.per_rank[0].exposed_all_to_all == pytest.approx(1.0)
    assert result.per_rank[0].busy_time == pytest.approx(result.step_time)  # a pair's two events count once
    assert result.per_rank[0].peak_activations == 2
    drawn = format_timeline(result.timeline, unit=0.5)
    assert "0B0+0F1" in drawn
    back, _ = timeline_from_json(timeline_to_json(result.timeline))
    assert back == result.timeline and [str(e.action) for e in back.events] == [str(e.action)
                                                                                for e in result.timeline.events]
    with pytest.raises(ValueError, match="overlapped pairs"):  # a pair's duration is not two actions' costs
        compare(paired, result.timeline)


def test_dualpipev_pairs_its_steady_forward_and_backward_of_the_two_stages():
    paired = overlap(pt.schedules.build("dualpipev", num_ranks=2, num_microbatches=8), A2A)
    pairs = Counter((x.op, y.op, x.stage != y.stage) for acts in paired.actions
                    for x, y in zip(acts, acts[1:], strict=False) if y.paired)
    assert pairs[(Op.F, Op.B, True)] >= 8  # DualPipe's overlapped chunks: one stage's F with the other's B
    assert simulate(paired, A2A).step_time < simulate(pt.schedules.build("dualpipev", num_ranks=2,
                                                                          num_microbatches=8), A2A).step_time


def test_collectives_go_after_the_pair_their_last_backward_runs_in():
    paired = overlap(pt.schedules.build("1f1b", num_ranks=1, num_microbatches=3), A2A)
    with_reduce = pt.schedules.with_collectives(paired)
    assert " ".join(map(str, with_reduce.actions[0])) == "0F0 0B0 +0F1 0B1 +0F2 0B2 0REDUCE"
    check(with_reduce)


def test_the_simulate_command_pairs_reports_and_draws_the_exposed_all_to_all(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    from pipetrain.cli import main

    assert main(["simulate", "--schedule", "1f1b", "--ranks", "1", "--microbatches", "4", "--cost-a2a", "0.5",
                 "--overlap", "--png", str(tmp_path / "pairs.png")]) == 0
    out = capsys.readouterr().out
    assert "1f1b+overlap" in out and "0B0 +0F1" in out and "exposed all-to-all 1" in out
    assert (tmp_path / "pairs.png").stat().st_size > 10_000


# --- the lanes ---------------------------------------------------------------------------------------


class _Done:
    """A collective that is already complete (the lanes' turns are what is tested here)."""

    def wait(self, timeout=None):
        return True


def _lane(lanes: Lanes, name: str, exchanges: int, log: list, draws: list | None = None):
    def run():
        for i in range(exchanges):
            log.append(f"{name}{i}")
            if draws is not None:
                draws.append(torch.rand(2))
            lanes.exchange(_Done, "a test exchange")
        log.append(f"{name}-end")
        return name
    return run


def test_lanes_take_turns_at_each_exchange_the_backward_first_and_finish_alone():
    lanes, log = Lanes(timeout=5), []
    results = lanes.run(_lane(lanes, "F", 3, log), _lane(lanes, "B", 1, log))
    assert results == ("F", "B")
    assert log == ["B0", "F0", "B-end", "F1", "F2", "F-end"]
    lanes_seen = Counter(lane for lane, _, _ in lanes.stalls)
    assert lanes_seen[FORWARD] >= 3 and lanes_seen[BACKWARD] >= 1
    assert lanes.run(_lane(lanes, "F", 2, log), _lane(lanes, "B", 3, log)) == ("F", "B")
    assert log[6:] == ["B0", "F0", "B1", "F1", "B2", "F-end", "B-end"]


def test_each_lane_draws_the_random_numbers_it_would_draw_alone_and_the_forward_leaves_its_state():
    torch.manual_seed(7)
    alone = [torch.rand(2) for _ in range(3)]
    after_alone = torch.rand(1)
    torch.manual_seed(7)
    lanes, log, draws, noise = Lanes(timeout=5), [], [], []
    lanes.run(_lane(lanes, "F", 3, log, draws), _lane(lanes, "B", 3, log, noise))
    assert all(torch.equal(a, b) for a, b in zip(alone, draws, strict=True))
    assert torch.equal(torch.rand(1), after_alone)  # as if the forward ran after the backward, which drew apart


def test_a_failing_lane_fails_the_pair_and_the_other_lane_launches_nothing_more():
    lanes, log = Lanes(timeout=5), []
    launched = []

    def failing():
        lanes.exchange(_Done, "a test exchange")
        raise RuntimeError("backward broke")

    def forward():
        for i in range(3):
            log.append(f"F{i}")
            lanes.exchange(lambda i=i: launched.append(i) or _Done(), "a test exchange")
        log.append("F-end")

    with pytest.raises(RuntimeError, match="backward broke"):
        lanes.run(forward, failing)
    assert log == ["F0"] and launched == [0]  # it stopped where it got the turn back: nothing more launched
    assert lanes.run(lambda: 1, lambda: 2) == (1, 2)  # the lanes are usable again


def test_the_backward_lane_thread_ends_with_its_lanes():
    import gc

    def lane_threads():
        return {t for t in threading.enumerate() if t.name == "pipetrain-backward-lane"}

    before = lane_threads()
    lanes = Lanes(timeout=5)
    lanes.run(lambda: 1, lambda: 2)
    (thread,) = lane_threads() - before  # its own, started by the first pair
    del lanes
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_overlap_without_expert_parallel_is_refused_with_the_fix(capsys):
    from pipetrain.cli import main
    from pipetrain.pipeline.checks import check_expert_parallel

    with pytest.raises(ValueError, match=r"overlap=True pairs .* with ep=1 there are none"):
        check_expert_parallel(1, shard="none", tp=1, overlap=True)
    assert main(["train", "--preset", "llama-moe-tiny", "--overlap"]) == 2
    assert "add --ep 2 (or more), or drop --overlap" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [[3, 0, 4, 1], [0, 0, 0, 0], [5, 0, 0, 0]])
def test_paired_experts_run_in_two_pieces_with_the_backward_turn_between_them(rows):
    """Under pairs each layer's local experts run in two pieces (about half the rows each, cut between two
    experts): values and gradients as one call, and the backward gives the forward its third turn once, after the
    second piece's backward and before the first's, also where no token came (every rank must hand over alike)."""
    from pipetrain.runtime.expert_parallel import _experts_in_halves

    torch.manual_seed(0)
    weight = torch.randn(len(rows), 3, 3, requires_grad=True)
    expert = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))  # sorted, as received
    events = []

    def local_experts(tokens, ids, piece=None):
        first = 0 if piece is None or piece[1] == 0 else piece[0]
        last = len(rows) if piece is None or piece[1] == 1 else piece[0]
        assert ((ids >= first) & (ids < last)).all()  # each piece holds its own experts only
        out = torch.einsum("rd,rde->re", tokens, weight[ids])
        if out.requires_grad and piece is not None:
            out.register_hook(lambda grad: events.append(f"piece {piece[1]}"))
        return out

    class Lanes:
        def pause(self):
            events.append("pause")

    tokens = torch.randn(len(expert), 3, requires_grad=True)
    whole = local_experts(tokens, expert)
    want = torch.autograd.grad(whole.pow(2).sum(), (tokens, weight), allow_unused=True, materialize_grads=True)
    got = _experts_in_halves(local_experts, tokens, expert, len(rows), Lanes())
    assert torch.allclose(got, whole)
    for g, w in zip(torch.autograd.grad(got.pow(2).sum(), (tokens, weight), materialize_grads=True), want,
                    strict=True):
        assert torch.allclose(g, w)
    assert events.count("pause") == 1
    assert [e for e in events if e.startswith("piece")] == [e for e in ("piece 1", "piece 0") if e in events]
    if "piece 1" in events:
        assert events.index("piece 1") < events.index("pause")
    if "piece 0" in events:
        assert events.index("pause") < events.index("piece 0")
