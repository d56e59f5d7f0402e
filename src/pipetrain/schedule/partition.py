"""Exact balanced partitioning: split a list of layer costs into contiguous, non-empty stages."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate


class BalanceError(ValueError):
    """A partition request that cannot be met (too few layers, bad costs, bad explicit balance)."""


def partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Layers per stage: contiguous, every stage non-empty, minimizing the most expensive stage.

    Among the partitions with that optimal bottleneck, returns the one with the smallest sum of squared
    stage costs, so slack is spread evenly (10 equal layers on 4 stages -> [3, 3, 2, 2], not [3, 3, 3, 1]).
    """
    costs = [float(c) for c in costs]
    if not isinstance(num_stages, int) or num_stages < 1:
        raise BalanceError(f"num_stages must be a positive integer, got {num_stages!r}")
    if len(costs) < num_stages:
        raise BalanceError(f"cannot split {len(costs)} layers into {num_stages} non-empty stages: "
                           f"use at most {len(costs)} stages, or split the model into more layers")
    bad = [i for i, c in enumerate(costs) if not math.isfinite(c) or c < 0]
    if bad:
        raise BalanceError(f"layer costs must be finite and >= 0; layer {bad[0]} costs {costs[bad[0]]}")
    prefix = [0.0, *accumulate(costs)]
    limit = min_bottleneck(prefix, num_stages)
    balance = _spread_evenly(prefix, num_stages, limit)
    if min(balance) < 1 or sum(balance) != len(costs):  # never hand out a wrong split silently
        raise RuntimeError(f"partition({costs}, {num_stages}) produced {balance}; please report this bug")
    return balance


def rank_partition(costs: Sequence[float], stage_to_rank: Sequence[int], *, budget: int = 200_000) -> list[int]:
    """Layers per stage when a rank holds several stages (interleaved, V): contiguous non-empty stages that
    minimize the busiest *rank's* total, then the most expensive stage, then the spread of rank totals, then
    that of stage costs.

    `partition` balances stages, which is not the same: with a heavy output head on a V placement (rank 0
    holds the first and the last stage) the best stage split can leave rank 0 twice as busy as rank 1.
    A depth-first search over the cuts, pruned by the best split found so far (starting from `partition`'s)
    and by what the ranks can still take; exact unless it visits more than `budget` cuts (then the best
    found, never worse than `partition`). One stage per rank: exactly `partition`.
    """
    num_stages = len(stage_to_rank)
    balance = partition(costs, num_stages)
    if len(set(stage_to_rank)) == num_stages:
        return balance
    n, prefix = len(costs), [0.0, *accumulate(float(c) for c in costs)]
    num_ranks = max(stage_to_rank) + 1
    last_stage_of = {r: max(s for s in range(num_stages) if stage_to_rank[s] == r) for r in range(num_ranks)}

    def score(cuts: Sequence[int]) -> tuple[float, float, float, float]:
        loads, stages = [0.0] * num_ranks, [prefix[b] - prefix[a] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for stage, cost in enumerate(stages):
            loads[stage_to_rank[stage]] += cost
        return max(loads), max(stages), sum(x * x for x in loads), sum(x * x for x in stages)

    best_cuts = [0, *accumulate(balance)]
    best = score(best_cuts)
    visits = 0

    def search(stage: int, cuts: list[int], loads: list[float]) -> None:
        nonlocal best, best_cuts, visits
        start, rank = cuts[-1], stage_to_rank[stage]
        limit = best[0] * (1 + 1e-9) + 1e-12
        ends = [n] if stage == num_stages - 1 else range(start + 1, n - (num_stages - 1 - stage) + 1)
        for end in ends:
            visits += 1
            load = loads[rank] + prefix[end] - prefix[start]
            if load > limit or visits > budget:
                return  # (later ends only add to this rank)
            loads[rank] = load
            room = sum(limit - loads[r] for r in range(num_ranks) if last_stage_of[r] > stage)
            if end == n:
                trial = [*cuts, end]
                if _better(score(trial), best):
                    best, best_cuts = score(trial), trial
            elif prefix[n] - prefix[end] <= room:
                search(stage + 1, [*cuts, end], loads)
            loads[rank] = load - (prefix[end] - prefix[start])

    search(0, [0], [0.0] * num_ranks)
    return [b - a for a, b in zip(best_cuts[:-1], best_cuts[1:], strict=True)]


def _better(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Lexicographically smaller, ignoring differences at the rounding level of the sums."""
    for x, y in zip(a, b, strict=True):
        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
            return x < y
    return False


def candidate_splits(costs: Sequence[float], stage_to_rank: Sequence[int]) -> list[list[int]]:
    """The splits worth simulating for a placement: the one that evens out the ranks (`rank_partition`) and,
    where a rank holds several stages and it differs, the one that evens out the stages (`partition`: a
    lopsided stage lengthens the chain through the others even when the ranks' totals are even)."""
    by_ranks, by_stages = rank_partition(costs, stage_to_rank), partition(costs, len(stage_to_rank))
    return [by_ranks] if by_stages == by_ranks else [by_ranks, by_stages]


def stage_costs(costs: Sequence[float], balance: Sequence[int]) -> list[float]:
    """The summed cost of each stage of a balance."""
    out, start = [], 0
    for n in balance:
        out.append(float(sum(costs[start:start + n])))
        start += n
    return out


# Segment costs are differences of prefix sums, so mathematically equal sums can differ in the last bits
# (8 + 56.02 vs 56.02 + 8). Every "segment <= limit" test allows this relative slack, so such ties agree.
_SLACK = 1e-12


def _within(segment: float, limit: float) -> bool:
    return segment <= limit + _SLACK * abs(limit)


def _fits(prefix: list[float], start: int, stages: int, limit: float) -> bool:
    """Can layers [start, n) be cut into `stages` non-empty stages each costing <= limit? (greedy)"""
    n = len(prefix) - 1
    for remaining in range(stages, 0, -1):
        if start >= n:
            return False
        # take as many layers as fit, leaving one for each remaining stage
        end = min(bisect_right(prefix, prefix[start] + limit + 2 * _SLACK * abs(limit)) - 1, n - (remaining - 1))
        while end > start and not _within(prefix[end] - prefix[start], limit):  # bisect's sum may round up
            end -= 1
        if end <= start:
            return False
        start = end
    return start == n


def min_bottleneck(prefix: list[float], num_stages: int) -> float:
    """The optimal largest stage cost (Nicol's probe-based search, exact for any non-negative costs).

    In an optimal partition, either stage p is the bottleneck -- then its cost is the smallest
    s(i, j) that still lets the remaining layers fit -- or it ends one layer before that point.
    """
    n = len(prefix) - 1
    best, start = math.inf, 0
    for p in range(num_stages - 1):
        lo, hi = start + 1, n - (num_stages - p - 1)  # candidate ends of stage p
        if not _fits(prefix, 0, num_stages, prefix[hi] - prefix[start]):
            start = hi  # stage p is never the bottleneck: give it as many layers as it can take
            continue
        while lo < hi:  # smallest end whose cost is a feasible bottleneck
            mid = (lo + hi) // 2
            if _fits(prefix, 0, num_stages, prefix[mid] - prefix[start]):
                hi = mid
            else:
                lo = mid + 1
        best = min(best, prefix[lo] - prefix[start])
        if lo - 1 == start:  # stage p cannot be shorter, so it is the bottleneck
            return best
        start = lo - 1
    return min(best, prefix[n] - prefix[start])


def _spread_evenly(prefix: list[float], num_stages: int, limit: float) -> list[int]:
    """Among partitions with every stage <= limit, the one minimizing the sum of squared stage costs."""
    n = len(prefix) - 1
    inf = math.inf
    # cost[k][i]: best score of cutting layers [0, i) into k stages; back[k][i]: start of stage k-1
    cost = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    back = [[0] * (n + 1) for _ in range(num_stages + 1)]
    cost[0][0] = 0.0
    for k in range(1, num_stages + 1):
        prev, cur, bk = cost[k - 1], cost[k], back[k]
        for i in range(k, n - (num_stages - k) + 1):
            j = i - 1
            while j >= k - 1 and _within(prefix[i] - prefix[j], limit):
                if prev[j] < inf:
                    seg = prefix[i] - prefix[j]
                    score = prev[j] + seg * seg
                    if score < cur[i]:
                        cur[i], bk[i] = score, j
                j -= 1
    balance, i = [], n
    for k in range(num_stages, 0, -1):
        j = back[k][i]
        balance.append(i - j)
        i = j
    return balance[::-1]
