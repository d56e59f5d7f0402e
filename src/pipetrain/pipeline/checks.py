"""Pipeline's arguments checked before any communication: the schedule, the layers, the mesh."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.comm import Transport
from ..schedule import Op, Schedule, check
from ..schedule.partition import BalanceError
from .balance import Balance
from .materialize import refuse_meta

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def checked_schedule(schedule: Schedule, layers: list[nn.Module], timeout: float, precision: str,
                      balance: Balance, sample) -> Schedule:
    """The compute-only schedule, after checking it and the other arguments (before any communication)."""
    bad = [i for i, layer in enumerate(layers) if not isinstance(layer, nn.Module)]
    if bad:
        raise TypeError(f"layers[{bad[0]}] is a {type(layers[bad[0]]).__name__}, not an nn.Module")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f'precision must be "fp32" or "bf16", got {precision!r}')
    schedule = schedule.compute_only()
    check(schedule)
    if splits_backward(schedule) and not torch.__version__ >= (2, 7):
        raise RuntimeError(f"schedule {schedule.name!r} splits the backward (I and W), which needs torch >= 2.7 "
                           f"(torch.autograd.backward from GradientEdges); this is torch {torch.__version__}. "
                           "Upgrade torch, or use a schedule without W such as '1f1b' or 'interleaved-1f1b'")
    if not schedule.has_backward:
        raise ValueError(f"schedule {schedule.name!r} has no backward actions; Pipeline needs a training "
                         "schedule (evaluate() derives the forward-only one)")
    if len(layers) < schedule.num_stages:
        raise BalanceError(f"{len(layers)} layers cannot fill {schedule.num_stages} stages: use a schedule "
                           f"with at most {len(layers)} stages (ranks x stages_per_rank) or more layers")
    if isinstance(balance, str) and balance == "time" and sample is None:
        raise ValueError('balance="time" needs `sample=`, one microbatch of model input to profile on')
    if isinstance(balance, str) and balance == "time":
        refuse_meta(layers, 'balance="time"', 'use balance="params" or a list of layers per stage')
    return schedule


def splits_backward(schedule: Schedule) -> bool:
    """Whether the schedule runs I and W (split backward) rather than B."""
    return any(a.op is Op.W for acts in schedule.actions for a in acts)


def groups_of(mesh: DeviceMesh | None, transport: Transport | None
              ) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """The (pipeline, data-parallel) process groups: a DeviceMesh's dimensions "pp" and "dp" (if any); none
    without a mesh (the default group, or the in-process `transport`'s ranks)."""
    if mesh is None:
        return None, None
    if transport is not None:
        raise ValueError("pass either mesh= or transport=, not both")
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "pp" not in names or not set(names) <= {"dp", "pp"}:
        raise ValueError(f"mesh dimensions must be named 'pp' and optionally 'dp', got {names}: e.g. "
                         "init_device_mesh('cpu', (dp, pp), mesh_dim_names=('dp', 'pp'))")
    return mesh.get_group("pp"), (mesh.get_group("dp") if "dp" in names else None)


def check_shard(shard: str, dp_group) -> None:
    """ValueError unless `shard` is a known mode that this layout can take (sharding needs replicas)."""
    from ..runtime.zero import SHARD_MODES

    if shard not in SHARD_MODES:
        raise ValueError(f"shard={shard!r}: choose one of {', '.join(map(repr, SHARD_MODES))}")
    if shard != "none" and (dp_group is None or dist.get_world_size(dp_group) == 1):
        raise ValueError(f"shard={shard!r} shards over data-parallel replicas, but this pipeline has none: give a "
                         "mesh with a 'dp' dimension of size 2 or more (CLI: --dp 2), or shard='none'")
