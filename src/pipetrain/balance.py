"""Layers per stage: an explicit list, or the partition of uniform, parameter-count or measured costs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .partition import BalanceError, rank_partition
from .profile import param_costs, uniform_costs

Balance = str | Sequence[int]


def resolve_balance(balance: Balance, layers: Sequence[nn.Module], stage_to_rank: Sequence[int], *,
                    measured_costs: Callable[[], list[float]]) -> list[int]:
    """The layer count of each stage. `measured_costs()` gives the per-layer times for balance="time"
    (measured once and shared, so that every rank splits alike). A named balance evens out the ranks'
    totals for the schedule's placement (`rank_partition`: the stages themselves when a rank holds one)."""
    num_stages = len(stage_to_rank)
    if isinstance(balance, str):
        sources = {"uniform": lambda: uniform_costs(layers), "params": lambda: param_costs(layers),
                   "time": measured_costs}
        if balance not in sources:
            raise ValueError(f'balance must be "uniform", "params", "time" or a list of layer counts, got {balance!r}')
        return rank_partition(sources[balance](), stage_to_rank)
    counts = list(balance)
    if (len(counts) != num_stages or any(not isinstance(n, int) or n < 1 for n in counts)
            or sum(counts) != len(layers)):
        raise BalanceError(f"balance {counts} must list {num_stages} positive layer counts (one per stage) "
                           f"summing to the {len(layers)} layers")
    return counts
