"""Layers per stage: an explicit list, or the split of uniform, parameter-count or measured costs that the
schedule runs fastest."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..schedule import Costs, Schedule, simulate
from ..schedule.partition import BalanceError, candidate_splits, stage_costs
from .profile import param_costs, uniform_costs

Balance = str | Sequence[int]


def resolve_balance(balance: Balance, layers: Sequence[nn.Module], schedule: Schedule, *,
                    measured_costs: Callable[[], list[float]], projection: str | None = None) -> list[int]:
    """The layer count of each stage. `measured_costs()` gives the per-layer times for balance="time"
    (measured once and shared, so that every rank splits alike). A named balance is split by `named_split`.
    `projection` (vocabulary parallelism): the last layer's projection, which runs on every rank, not on the
    last stage: "params" and "time" leave its share of the last layer's parameters out of that layer's cost."""
    num_stages = schedule.num_stages
    if isinstance(balance, str):
        sources = {"uniform": lambda: uniform_costs(layers), "params": lambda: param_costs(layers),
                   "time": measured_costs}
        if balance not in sources:
            raise ValueError(f'balance must be "uniform", "params", "time" or a list of layer counts, got {balance!r}')
        costs = list(sources[balance]())
        if projection is not None and balance != "uniform":
            costs = without_projection(costs, layers, projection)
        return named_split(costs, schedule)
    counts = list(balance)
    if (len(counts) != num_stages or any(not isinstance(n, int) or n < 1 for n in counts)
            or sum(counts) != len(layers)):
        raise BalanceError(f"balance {counts} must list {num_stages} positive layer counts (one per stage) "
                           f"summing to the {len(layers)} layers")
    return counts


def without_projection(costs: Sequence[float], layers: Sequence[nn.Module], projection: str) -> list[float]:
    """Per-layer `costs` without the last layer's `projection` (vocabulary parallelism runs it on every rank):
    that layer's cost less the projection's share of its parameters."""
    return [*costs[:-1], costs[-1] * (1 - projection_share(layers[-1], projection))]


def projection_share(head: nn.Module, projection: str) -> float:
    """The share of the last layer's cost its output `projection` takes, counted by parameters."""
    split = sum(p.numel() for p in getattr(head, projection).parameters())
    return split / max(sum(p.numel() for p in head.parameters()), 1)


def named_split(costs: Sequence[float], schedule: Schedule) -> list[int]:
    """Of the split that evens out the ranks' totals and the one that evens out the stages (`candidate_splits`:
    they differ only where a rank holds several stages), the one on which `schedule` simulates the shorter
    step, each layer's cost taken as F, I and W in equal thirds; the ranks' split on a tie."""
    splits = candidate_splits(costs, schedule.stage_to_rank)
    if len(splits) == 1:
        return splits[0]

    def step_time(split: list[int]) -> float:
        third = [c / 3 for c in stage_costs(costs, split)]
        return simulate(schedule, Costs(f=third, b=third, w=third)).step_time

    by_ranks, by_stages = splits
    return by_stages if step_time(by_stages) < step_time(by_ranks) * (1 - 1e-9) else by_ranks
