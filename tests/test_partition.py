"""The partitioner against brute force, and the cost sources."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipetrain.pipeline.profile import param_costs, time_costs, uniform_costs
from pipetrain.schedule.partition import BalanceError, partition, rank_partition, stage_costs


def brute_force_bottleneck(costs, k):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(costs[bounds[i]:bounds[i + 1]]) for i in range(k))
        best = worst if best is None else min(best, worst)
    return best


costs_strategy = st.lists(st.one_of(st.integers(0, 20).map(float), st.floats(0, 100, allow_nan=False)),
                          min_size=1, max_size=11)


@settings(max_examples=400, deadline=None)
@given(costs_strategy, st.data())
def test_partition_is_optimal_contiguous_and_non_empty(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    balance = partition(costs, k)
    assert len(balance) == k and sum(balance) == len(costs) and min(balance) >= 1
    assert max(stage_costs(costs, balance)) == pytest.approx(brute_force_bottleneck(costs, k), rel=1e-12, abs=1e-12)


def _busiest_rank(costs, balance, stage_to_rank):
    loads = [0.0] * (max(stage_to_rank) + 1)
    for stage, cost in enumerate(stage_costs(costs, balance)):
        loads[stage_to_rank[stage]] += cost
    return max(loads)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 3), st.sampled_from(["v", "looped"]), st.data())
def test_rank_partition_minimizes_the_busiest_rank(ranks, placement, data):
    from pipetrain.schedule.placement import looped, vshape

    stage_to_rank = vshape(ranks) if placement == "v" else looped(ranks, 2)
    costs = data.draw(st.lists(st.one_of(st.floats(0, 1), st.floats(0, 10)), min_size=2 * ranks, max_size=10))
    balance = rank_partition(costs, stage_to_rank)
    assert len(balance) == 2 * ranks and min(balance) >= 1 and sum(balance) == len(costs)
    best = min(_busiest_rank(costs, [b - a for a, b in zip((0, *cuts), (*cuts, len(costs)), strict=True)],
                             stage_to_rank) for cuts in itertools.combinations(range(1, len(costs)), 2 * ranks - 1))
    assert _busiest_rank(costs, balance, stage_to_rank) <= best * (1 + 1e-9) + 1e-12


def test_rank_partition_gives_a_heavy_head_a_rank_of_its_own_on_a_v():
    from pipetrain.schedule.placement import looped, vshape

    costs = [0.1] + [1.0] * 8 + [8.0]  # embedding, 8 blocks, a head as heavy as the blocks together
    assert partition(costs, 4) == [3, 3, 3, 1]  # even stages: rank 0 (stages 0 and 3) does 10.1 of 16.1
    assert rank_partition(costs, vshape(2)) == [1, 4, 4, 1]  # rank 0: embedding + head, rank 1: the blocks
    assert rank_partition(costs, looped(2)) == partition(costs, 2)  # one stage per rank: the same


def test_equal_layers_spread_evenly():
    assert partition([1.0] * 10, 4) == [3, 3, 2, 2]
    assert partition([1.0] * 8, 4) == [2, 2, 2, 2]


def test_heavy_ends_get_stages_of_their_own():
    # embedding and head are not average layers
    assert partition([10, 1, 1, 1, 1, 1, 1, 10], 3) == [1, 6, 1]


def test_large_inputs_are_fast():
    import random
    import time
    rng = random.Random(0)
    start = time.perf_counter()
    balance = partition([rng.random() for _ in range(1000)], 32)
    assert len(balance) == 32 and time.perf_counter() - start < 5


@pytest.mark.parametrize("costs,k,message", [
    ([1.0, 1.0], 3, "cannot split 2 layers into 3"),
    ([1.0, -1.0], 1, "layer 1 costs -1.0"),
    ([1.0, float("nan")], 1, "finite"),
    ([1.0], 0, "positive integer"),
])
def test_bad_requests_explain_themselves(costs, k, message):
    with pytest.raises(BalanceError, match=message):
        partition(costs, k)


def test_cost_sources():
    layers = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)]
    assert uniform_costs(layers) == [1.0, 1.0, 1.0]
    assert param_costs(layers) == [40.0, 0.0, 18.0]
    layers[0].weight.grad = torch.ones_like(layers[0].weight)
    sample = torch.randn(16, 4)
    before = torch.get_rng_state()
    times = time_costs(layers, sample, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert torch.equal(layers[0].weight.grad, torch.ones_like(layers[0].weight)), "profiling touched grads"
    assert layers[2].weight.grad is None
    assert torch.equal(torch.get_rng_state(), before), "profiling moved the RNG"


def test_time_costs_see_a_slow_layer():
    class Slow(nn.Module):
        def forward(self, x):
            y = x
            for _ in range(200):
                y = torch.tanh(y @ torch.eye(x.shape[-1]))
            return y
    times = time_costs([nn.Linear(32, 32), Slow(), nn.Linear(32, 32)], torch.randn(8, 32), repeats=3)
    assert times[1] > 3 * max(times[0], times[2])
    assert partition(times, 2) in ([2, 1], [1, 2])


def test_equal_sums_that_round_differently_still_partition():
    # regression: 8 + 56.02 and 56.02 + 8 differ in the last bit as prefix-sum differences; the search
    # once rejected its own optimum and returned empty stages ([0, 0, 4])
    costs = [56.02429369944819, 8.0, 56.019999999999996, 8.0]
    balance = partition(costs, 3)
    assert min(balance) >= 1 and sum(balance) == 4
    assert max(stage_costs(costs, balance)) == pytest.approx(brute_force_bottleneck(costs, 3), rel=1e-12)
