"""Pipeline(schedule="auto"): measure every layer's F, I, W and a stage-to-stage transfer, share the numbers,
simulate every registered schedule (and zb-auto, built for them) on its best split, log the candidates, and
run the fastest."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..runtime.comm import DistTransport, Transport, wait_or_raise
from ..runtime.data_parallel import sum_over
from ..schedule import Schedule
from ..schedule.choose import rank_schedules
from .materialize import refuse_meta
from .profile import boundary_bytes, phase_costs, transfer_time
from .rank0_measure import measured_on_rank_0

logger = logging.getLogger("pipetrain")


def choose_schedule(layers: list[nn.Module], *, num_microbatches: int | None, sample: Any, memory_limit: float | None,
                    group, dp_group, transport: Transport | None, timeout: float,
                    loss: tuple[Any, Any] = (None, None)) -> tuple[Schedule, list[int]]:
    """The fastest schedule for these layers and its balance (the same on every rank). Collective.
    `loss`: (loss_fn, the sample's targets); with targets, the last layer is timed with the loss."""
    if num_microbatches is None:
        raise ValueError('schedule="auto" needs num_microbatches= (the schedule is built for them)')
    if sample is None:
        raise ValueError('schedule="auto" times every layer on `sample=`, one microbatch of model input')
    refuse_meta(layers, 'schedule="auto"', "build a schedule with pipetrain.schedules.build(...) instead")
    # (the pipeline's own transport is built for the schedule chosen here: measure over a plain one)
    probe = transport if transport is not None else DistTransport(group, split_directions=False)
    comm = 0.0
    if probe.rank < 2:  # ranks 0 and 1 time one transfer of the largest boundary; rank 0 tells 1 its size
        size = torch.tensor([boundary_bytes(layers, sample) if probe.rank == 0 else 0], dtype=torch.int64)
        size = size.to(getattr(probe, "device", "cpu"))
        if probe.world_size > 1:
            work = probe.isend(size, 1) if probe.rank == 0 else probe.irecv(size, 0)
            wait_or_raise(work, timeout=timeout, transport=probe, peer=1 - probe.rank, what="sharing a size")
        comm = transfer_time(probe, int(size.item()), timeout=timeout)
    loss_fn, target = loss

    def measure() -> list[float]:  # F, I, W per layer, then the transfer (rank 0's)
        return [*(t for row in phase_costs(layers, sample, loss_fn=loss_fn, target=target) for t in row), comm]

    def sum_all(values: torch.Tensor) -> torch.Tensor:  # (NCCL: on the GPU)
        return sum_over(dp_group, probe.all_reduce(values.to(getattr(probe, "device", "cpu")), timeout), timeout)

    replicas = torch.distributed.get_world_size(dp_group) if dp_group is not None else 1
    measured = measured_on_rank_0(measure, 3 * len(layers) + 1, rank=probe.rank,
                                  world_size=probe.world_size, sum_all=sum_all, replicas=replicas,
                                  what='timing the layers on `sample` for schedule="auto"')
    comm = measured[-1]
    ranked = rank_schedules(num_ranks=probe.world_size, num_microbatches=num_microbatches,
                            layer_costs=[tuple(measured[k:k + 3]) for k in range(0, len(measured) - 1, 3)],
                            comm=comm, memory_limit=memory_limit)
    best = ranked[0]
    if probe.rank == 0:
        logger.info('schedule="auto" on %d ranks, %d microbatches, transfer %.2f ms: %s', probe.world_size,
                    num_microbatches, comm * 1e3, best.describe())
        for other in ranked[1:]:
            logger.info("  also simulated: %s", other.describe())
    return best.schedule, list(best.balance)
