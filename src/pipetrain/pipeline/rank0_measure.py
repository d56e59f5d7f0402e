"""Measured on rank 0, shared with every rank: so that all build the same split and schedule from the
same numbers, and so that a failure while measuring stops every rank at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..runtime.comm import fail_together


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
