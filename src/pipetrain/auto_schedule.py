"""Pipeline(schedule="auto"): measure every layer's F, I, W on one rank, share the numbers, simulate every
registered schedule on its best split of them, log the candidates, and run the fastest."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .data_parallel import sum_over
from .materialize import refuse_meta
from .profile import phase_costs
from .schedule import Schedule
from .schedule import build as build_schedule
from .schedule.choose import rank_schedules

logger = logging.getLogger("pipetrain")


def choose_schedule(layers: list[nn.Module], *, num_microbatches: int | None, sample: Any, memory_limit: float | None,
                    group, dp_group, transport, timeout: float) -> tuple[Schedule, list[int]]:
    """The fastest schedule for these layers and its balance (the same on every rank). Collective."""
    if num_microbatches is None:
        raise ValueError('schedule="auto" needs num_microbatches= (the schedule is built for them)')
    if sample is None:
        raise ValueError('schedule="auto" times every layer on `sample=`, one microbatch of model input')
    refuse_meta(layers, 'schedule="auto"', "build a schedule with pipetrain.schedules.build(...) instead")
    world = transport.world_size if transport is not None else dist.get_world_size(group)
    rank = transport.rank if transport is not None else dist.get_rank(group)
    costs = torch.zeros(len(layers), 3, dtype=torch.float64)
    if rank == 0:  # one rank measures, so that every rank ranks the same numbers
        costs.copy_(torch.tensor(phase_costs(layers, sample), dtype=torch.float64))
    if transport is not None:
        transport.all_reduce(costs, timeout)
    else:  # (no transport yet: it is built for the schedule chosen here)
        sum_over(group if group is not None else dist.group.WORLD, costs, timeout, "the all-reduce of measured costs")
    replicas = dist.get_world_size(dp_group) if dp_group is not None else 1
    if replicas > 1:
        sum_over(dp_group, costs, timeout)
        costs /= replicas
    ranked = rank_schedules(num_ranks=world, num_microbatches=num_microbatches,
                            layer_costs=[tuple(row) for row in costs.tolist()], memory_limit=memory_limit)
    best = ranked[0]
    if rank == 0:
        logger.info('schedule="auto" on %d ranks, %d microbatches: %s', world, num_microbatches, best.describe())
        for other in ranked[1:]:
            logger.info("  also simulated: %s", other.describe())
    schedule = build_schedule(best.name, num_ranks=world, num_microbatches=num_microbatches,
                              stages_per_rank=best.stages_per_rank)
    return schedule, list(best.balance)
