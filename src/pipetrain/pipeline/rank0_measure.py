"""Measured on rank 0, shared with every rank: so that all build the same split and schedule from the
same numbers, and so that a failure while measuring stops every rank at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..runtime.comm import fail_together
from ..runtime.data_parallel import sum_over


def measured_on_rank_0(measure: Callable[[], Sequence[float]], size: int, *, rank: int, world_size: int,
                       sum_all: Callable[[torch.Tensor], torch.Tensor], replicas: int = 1,
                       what: str = "measuring") -> list[float]:
    """`measure()` (`size` numbers) on rank 0 only; every rank returns rank 0's numbers, averaged over the
    `replicas` (data-parallel copies, whose ranks 0 each measure). `sum_all` sums a float64 CPU tensor over
    every rank of the job and returns it (a collective: every rank calls this). If `measure` raises on rank 0,
    rank 0 raises that error and every other rank a RuntimeError naming rank 0, at once (`fail_together`),
    instead of waiting out their timeout."""
    values = torch.zeros(size, dtype=torch.float64)
    failure = None
    if rank == 0:
        try:
            values[:] = torch.tensor([float(v) for v in measure()], dtype=torch.float64)
        except Exception as err:  # (a bad sample, a layer that fails: shared below)
            failure = err
    values = fail_together(failure, rank=rank, world_size=world_size, sum_all=sum_all, what=what, payload=values)
    return (values / replicas).tolist()


def measured_on_pipeline_rank_0(measure: Callable[[], Sequence[float]], size: int, *, transport,
                                replica_groups: Sequence, timeout: float, what: str) -> list[float]:
    """`measured_on_rank_0` over a pipeline's `transport` and the process groups of its replicas (data and
    tensor parallel copies, whose pipeline ranks 0 each measure): the numbers are summed over the pipeline
    (on its device: NCCL's on the GPU), then over each replica group, and averaged over the replicas."""
    def sum_all(values: torch.Tensor) -> torch.Tensor:
        values = transport.all_reduce(values.to(getattr(transport, "device", "cpu")), timeout)
        for group in replica_groups:
            sum_over(group, values, timeout)
        return values

    return measured_on_rank_0(measure, size, rank=transport.rank, world_size=transport.world_size, sum_all=sum_all,
                              replicas=math.prod(dist.get_world_size(g) for g in replica_groups), what=what)
