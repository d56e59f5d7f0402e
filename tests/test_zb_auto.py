"""zb-auto: a schedule built for measured costs, checked like every other and never slower than the
hand-written zero-bubble schedule of its placement at the same memory."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from workers import uneven_zb_auto

import pipetrain.schedule as S
from pipetrain.schedule.placement import looped, vshape


def _peak(schedule):
    return max(r.peak_activations for r in S.simulate(schedule).per_rank)


@pytest.mark.parametrize("ranks,mbs,per_rank", [(2, 8, 1), (3, 5, 1), (4, 8, 1), (2, 4, 2), (4, 8, 2), (3, 7, 2)])
def test_with_equal_costs_it_reaches_the_least_bubble_of_its_placement(ranks, mbs, per_rank):
    # zb-h1 and zbv have the least bubble one / two stages per rank can have when F = I = W
    auto = S.build("zb-auto", num_ranks=ranks, num_microbatches=mbs, stages_per_rank=per_rank)
    hand = S.build("zb-h1" if per_rank == 1 else "zbv", num_ranks=ranks, num_microbatches=mbs)
    assert S.simulate(auto).step_time == pytest.approx(S.simulate(hand).step_time)
    assert auto.stage_to_rank == (looped(ranks) if per_rank == 1 else vshape(ranks))
    assert _peak(auto) <= ranks * per_rank  # 1F1B's memory by default


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(1, 10), st.sampled_from([1, 2]), st.data())
def test_never_slower_than_the_hand_written_schedule_and_within_its_memory(ranks, mbs, per_rank, data):
    n = ranks * per_rank
    per_stage = st.lists(st.floats(0.1, 4.0), min_size=n, max_size=n)
    costs = S.Costs(f=data.draw(per_stage), b=data.draw(per_stage), w=data.draw(per_stage),
                    comm=data.draw(st.sampled_from([0.0, 0.05, 0.5])))
    limit = data.draw(st.sampled_from([1, 1.5, ranks, 2 * ranks, None]))
    auto = S.build("zb-auto", num_ranks=ranks, num_microbatches=mbs, stages_per_rank=per_rank, costs=costs,
                   memory_limit=limit)  # (build checks it: every action once, in order, no deadlock)
    cap = int((ranks if limit is None else limit) * per_rank)
    assert _peak(auto) <= cap
    step = S.simulate(auto, costs).step_time
    work = [mbs * sum(costs.f[s] + costs.b[s] + costs.w[s] for s in auto.stages_of(r)) for r in range(ranks)]
    assert step >= max(work) - 1e-9  # no rank does its work faster than back to back
    hand_name = "zb-h1" if per_rank == 1 else "zbv"
    try:
        hand = S.build(hand_name, num_ranks=ranks, num_microbatches=mbs)
    except ValueError:
        return
    if _peak(hand) <= cap:
        assert step <= S.simulate(hand, costs).step_time + 1e-9


def test_with_memory_to_spare_it_beats_zb_h1_on_an_uneven_pipeline():
    # 4 ranks, the first stage the heaviest, twice 1F1B's memory: rank 0 never waits (zb-h1 makes it wait
    # for gradients), so the step is rank 0's work back to back
    f = [1.8, 1.7, 0.9, 1.2]
    costs = S.Costs(f=f, b=[x * 1.1 for x in f], w=[x * 0.6 for x in f])
    auto = S.simulate(S.build("zb-auto", num_ranks=4, num_microbatches=8, costs=costs, memory_limit=8), costs)
    hand = S.simulate(S.build("zb-h1", num_ranks=4, num_microbatches=8), costs)
    assert auto.step_time == pytest.approx(8 * f[0] * 2.7)  # 38.88
    assert hand.step_time > 1.07 * auto.step_time  # 41.97


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("per_rank", [1, 2])
def test_the_exactness_suites_run_an_order_no_hand_written_schedule_has(world, per_rank):
    built = uneven_zb_auto(world, 2 * world, per_rank)
    for name in ("zb-h1", "zbv", "interleaved-1f1b", "gpipe", "1f1b", "dualpipev"):
        try:
            other = S.build(name, num_ranks=world, num_microbatches=2 * world, stages_per_rank=per_rank)
        except ValueError:
            continue
        assert built.actions != other.actions, name


def test_bad_options_say_what_to_give():
    with pytest.raises(ValueError, match=r"'zbv' does not take costs .*schedules with options: zb-auto"):
        S.build("zbv", num_ranks=2, num_microbatches=4, costs=S.Costs())
    with pytest.raises(ValueError, match="costs.f has 3 entries for 2 stages"):
        S.build("zb-auto", num_ranks=2, num_microbatches=4, costs=S.Costs(f=[1, 1, 1]))
    with pytest.raises(ValueError, match="costs.w must be finite and >= 0"):
        S.build("zb-auto", num_ranks=2, num_microbatches=4, costs=S.Costs(w=-1.0))
    with pytest.raises(ValueError, match="memory_limit >= 1"):
        S.build("zb-auto", num_ranks=2, num_microbatches=4, memory_limit=0.5)
    with pytest.raises(ValueError, match="one stage per rank or two in a V"):
        S.build("zb-auto", num_ranks=2, num_microbatches=4, stages_per_rank=3)
