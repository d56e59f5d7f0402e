"""`plan_pipeline`: measure every layer's F, I, W (and a stage-to-stage transfer), simulate every registered
schedule (and zb-auto, built for those costs) on its best split, and return the fastest as a plan that
`Pipeline(schedule=plan)` runs. `Pipeline(schedule="auto")` is this, called for you; `schedule_to_run` turns
whatever `schedule=` was given (a Schedule, a name, a plan) into the schedule and split to run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.comm import Transport, wait_or_raise
from ..runtime.dist_transport import DistTransport
from ..schedule import Schedule, build, names
from ..schedule.choose import Candidate, rank_schedules
from .balance import Balance, projection_share
from .checks import groups_of
from .materialize import refuse_meta
from .profile import boundary_bytes, phase_costs, transfer_time
from .rank0_measure import measured_on_pipeline_rank_0

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger("pipetrain")


@dataclass(frozen=True)
class PipelinePlan:
    """A schedule and the split of the layers it runs fastest on, chosen from measured costs: pass it as
    `Pipeline(layers, schedule=plan, ...)`. `candidates` holds every schedule simulated, fastest first."""

    schedule: Schedule
    balance: tuple[int, ...]  # layers per stage
    transfer_seconds: float  # charged to each transfer between ranks (measured, or as given)
    candidates: tuple[Candidate, ...]
    vocab_parallel: bool = False  # the head's projection (and the embedding) split by vocabulary over the ranks

    def describe(self) -> str:
        return self.candidates[0].describe()


def plan_pipeline(layers: list[nn.Module], *, num_microbatches: int, sample: Any,
                  loss_fn: Any = None, sample_target: Any = None, memory_limit: float | None = None,
                  num_ranks: int | None = None, mesh: DeviceMesh | None = None, transport: Transport | None = None,
                  transfer_seconds: float | None = None, timeout: float = 60.0, vocab_parallel: bool | None = False,
                  shard: str = "none") -> PipelinePlan:
    """The fastest registered schedule for `layers` and its split, for `num_microbatches` microbatches.

    Rank 0 times every layer's F, I and W on `sample` (one microbatch of model input; with `loss_fn` and
    `sample_target`, its targets, the last layer is timed with the loss), ranks 0 and 1 time one transfer of
    the largest stage boundary, and every rank ranks the same candidates (`schedule.choose.rank_schedules`),
    so all return the same plan. `memory_limit` drops the candidates that hold more than that many
    microbatches of a rank's layers at once.

    Where it runs: on the pipeline's ranks (collective), given `mesh` (dims "pp" and optionally "dp"), a
    `transport`, or, with neither, the default process group; or, with `num_ranks=` and no process group,
    in one process, for a pipeline of that many ranks (then `transfer_seconds`, default 0, is the transfer
    time charged). The plan's candidates are logged on rank 0 (logger "pipetrain").

    `vocab_parallel`: None weighs vocabulary parallelism too, where the layers, the loss and the layout can run
    it (with `shard`): every schedule is also simulated with the last layer's projection split over the ranks
    (its share of that layer's time by its share of the parameters) and the passes placed; True plans with it
    only, False without (the default of a plan asked for directly; `Pipeline(schedule="auto")` weighs it unless
    `vocab_parallel=` says).
    """
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"plan_pipeline needs num_microbatches= (an int >= 1: the schedule is built for them), "
                         f"got {num_microbatches!r}")
    if sample is None:
        raise ValueError("plan_pipeline times every layer on `sample=`, one microbatch of model input")
    refuse_meta(layers, "plan_pipeline (and schedule=\"auto\")",
                "build a schedule with pipetrain.schedules.build(...) instead")
    layers = list(layers)

    def measure_layers() -> list[float]:  # F, I, W per layer, flattened
        return [t for row in phase_costs(layers, sample, loss_fn=loss_fn, target=sample_target) for t in row]

    together = mesh is not None or transport is not None or (num_ranks is None and dist.is_initialized())
    if together:
        costs, comm, world, rank = _measured_together(layers, sample, measure_layers, mesh, transport, num_ranks,
                                                      transfer_seconds, timeout)
    else:
        if num_ranks is None:
            raise ValueError("plan_pipeline needs num_ranks= when it runs in one process (no mesh, transport or "
                             "initialized process group)")
        costs, comm, world, rank = measure_layers(), transfer_seconds or 0.0, num_ranks, 0
    projection = _projection_share(layers, loss_fn, vocab_parallel, world, mesh, transport, shard)
    ranked = rank_schedules(num_ranks=world, num_microbatches=num_microbatches,
                            layer_costs=[tuple(costs[k:k + 3]) for k in range(0, len(costs), 3)],
                            comm=comm, memory_limit=memory_limit, projection=projection,
                            whole=vocab_parallel is not True)
    best = ranked[0]
    if rank == 0:
        logger.info("plan_pipeline on %d ranks, %d microbatches, transfer %.2f ms: %s", world, num_microbatches,
                    comm * 1e3, best.describe())
        for other in ranked[1:]:
            logger.info("  also simulated: %s", other.describe())
    return PipelinePlan(best.schedule, best.balance, comm, tuple(ranked), best.vocab_parallel)


def _projection_share(layers, loss_fn, vocab_parallel: bool | None, world: int, mesh, transport,
                      shard: str) -> float | None:
    """The share of the last layer's cost its output projection takes (by parameters, as `balance` counts it),
    where vocabulary parallelism is to be weighed (or asked for: then ValueError if it cannot run); None where
    not."""
    from .vocabulary import check_vocabulary_parallel

    if vocab_parallel is False or world < 2:
        if vocab_parallel:
            raise ValueError("vocab_parallel=True splits the vocabulary over the pipeline ranks; this pipeline has "
                             "one rank")
        return None
    groups = groups_of(mesh, transport)
    try:
        plan = check_vocabulary_parallel(layers, loss_fn, transport=transport, tp=groups.tp_size, ep=groups.ep_size,
                                         shard=shard)
    except ValueError:
        if vocab_parallel:
            raise
        return None
    return projection_share(layers[-1], plan.projection)


def _measured_together(layers, sample, measure_layers, mesh, transport, num_ranks, transfer_seconds,
                       timeout) -> tuple[list[float], float, int, int]:
    """(per-layer F, I, W, transfer seconds, pipeline ranks, this rank), measured on rank 0, the same on every
    rank."""
    groups = groups_of(mesh, transport)
    # (a pipeline's own transport is built for the schedule chosen here: measure over a plain one)
    probe = transport if transport is not None else DistTransport(groups.pp, split_directions=False)
    if num_ranks is not None and num_ranks != probe.world_size:
        raise ValueError(f"num_ranks={num_ranks}, but the pipeline has {probe.world_size} ranks; leave num_ranks "
                         "out on the pipeline's ranks")
    comm = 0.0
    if transfer_seconds is not None:
        comm = transfer_seconds
    elif probe.rank < 2:  # ranks 0 and 1 time one transfer of the largest boundary; rank 0 tells 1 its size
        size = torch.tensor([boundary_bytes(layers, sample) if probe.rank == 0 else 0], dtype=torch.int64)
        size = size.to(getattr(probe, "device", "cpu"))
        if probe.world_size > 1:
            work = probe.isend(size, 1) if probe.rank == 0 else probe.irecv(size, 0)
            wait_or_raise(work, timeout=timeout, transport=probe, peer=1 - probe.rank, what="sharing a size")
        comm = transfer_time(probe, int(size.item()), timeout=timeout)

    def measure() -> list[float]:
        return [*measure_layers(), comm]

    measured = measured_on_pipeline_rank_0(measure, 3 * len(layers) + 1, transport=probe,
                                           replica_groups=groups.replicas, timeout=timeout,
                                           what='timing the layers on `sample` for plan_pipeline (schedule="auto")')
    return measured[:-1], measured[-1], probe.world_size, probe.rank


def schedule_to_run(schedule: Schedule | PipelinePlan | str, balance: Balance, *, num_microbatches: int | None,
                    num_ranks: Callable[[], int]) -> tuple[Schedule, Balance]:
    """(schedule, balance) to run: a Schedule given (with `balance`), a plan's schedule and split, or the
    registered schedule named, built for the pipeline's `num_ranks()` and `num_microbatches`."""
    if isinstance(schedule, PipelinePlan):
        if balance != "uniform":
            raise ValueError("a PipelinePlan (or schedule=\"auto\") brings its own split; leave balance= out")
        return schedule.schedule, list(schedule.balance)
    if isinstance(schedule, Schedule):
        if num_microbatches is not None and num_microbatches != schedule.num_microbatches:
            raise ValueError(f"num_microbatches={num_microbatches}, but the schedule given runs "
                             f"{schedule.num_microbatches}: num_microbatches= goes with a schedule given by name")
        return schedule, balance
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a pipetrain Schedule, a PipelinePlan, a registered name or \"auto\", got "
                        f"{type(schedule).__name__}")
    if schedule not in names():
        raise ValueError(f"unknown schedule {schedule!r}: give a registered name ({', '.join(names())}), \"auto\", "
                         "a Schedule (pipetrain.schedules.build(...)) or a PipelinePlan (pipetrain.plan_pipeline(...))")
    if num_microbatches is None:
        raise ValueError(f"schedule={schedule!r} needs num_microbatches= (the schedule is built for them)")
    return build(schedule, num_ranks=num_ranks(), num_microbatches=num_microbatches), balance
