"""Measured on rank 0, shared with every rank: so that all build the same split and schedule from the
same numbers, and so that a failure while measuring stops every rank at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def measured_on_rank_0(measure: Callable[[], Sequence[float]], size: int, *, rank: int,
                       sum_all: Callable[[torch.Tensor], torch.Tensor], replicas: int = 1,
                       what: str = "measuring") -> list[float]:
    """`measure()` (`size` numbers) on rank 0 only; every rank returns rank 0's numbers, averaged over the
    `replicas` (data-parallel copies, whose ranks 0 each measure). `sum_all` sums a float64 CPU tensor over
    every rank of the job and returns it (a collective: every rank calls this). If `measure` raises on rank 0,
    rank 0 raises that error and every other rank a RuntimeError naming rank 0, at once (NaN in the sum
    tells them), instead of waiting out their timeout."""
    values = torch.zeros(size, dtype=torch.float64)
    failure = None
    if rank == 0:
        try:
            values[:] = torch.tensor([float(v) for v in measure()], dtype=torch.float64)
        except Exception as err:  # (a bad sample, a layer that fails: shared below)
            failure, values[:] = err, float("nan")
    values = sum_all(values).cpu()
    if failure is not None:
        raise failure
    if values.isnan().any():
        raise RuntimeError(f"rank 0 failed while {what}; see its error")
    return (values / replicas).tolist()
