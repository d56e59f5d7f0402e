"""Pipeline's arguments checked before any communication: the schedule, the layers, the mesh."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Groups:
    """A rank's process groups from a DeviceMesh: its pipeline ("pp"), its data-parallel replicas ("dp", and
    "ep" whose ranks are replicas too), its tensor-parallel group as a 1-d mesh ("tp"), its expert-parallel
    group as a 1-d mesh ("ep") and the replicas holding the same experts (`expert_dp`: "dp" alone); None
    where the mesh has no such dimension (or no mesh)."""

    pp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    tp: DeviceMesh | None = None
    ep: DeviceMesh | None = None
    expert_dp: dist.ProcessGroup | None = None
    mesh: DeviceMesh | None = None

    def pp_and_tp(self) -> DeviceMesh | None:
        """With tp: the replica's pipeline and tp ranks as one dimension (pp-major; over which vocabulary parallelism
        splits its tables). Made on first use, collectively over the job, then reused (torch keeps it by name)."""
        return self.mesh["pp", "tp"]._flatten("pp_tp") if self.tp is not None else None

    @property
    def tp_size(self) -> int:
        return self.tp.size() if self.tp is not None else 1

    @property
    def ep_size(self) -> int:
        return self.ep.size() if self.ep is not None else 1

    @property
    def replicas(self) -> list[dist.ProcessGroup]:
        """The groups over which the ranks hold the same pipeline position (dp, then tp)."""
        return [g for g in (self.dp, self.tp.get_group() if self.tp is not None else None) if g is not None]


def groups_of(mesh: DeviceMesh | None, transport: Transport | None) -> Groups:
    """The process groups of a DeviceMesh with dimensions "pp" and optionally "dp", "ep" and "tp"; none
    without a mesh (the default group, or the in-process `transport`'s ranks). With "ep", the data-parallel
    group is "dp" and "ep" together (collective over the job: every rank makes every such group)."""
    if mesh is None:
        return Groups()
    if transport is not None:
        raise ValueError("pass either mesh= or transport=, not both")
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if "pp" not in names or not set(names) <= {"dp", "ep", "pp", "tp"}:
        raise ValueError(f"mesh dimensions must be named 'pp' and optionally 'dp', 'ep' and 'tp', got {names}: "
                         "e.g. init_device_mesh('cpu', (dp, ep, pp, tp), mesh_dim_names=('dp', 'ep', 'pp', 'tp'))")
    tp = mesh["tp"] if "tp" in names and mesh["tp"].size() > 1 else None
    dp = mesh.get_group("dp") if "dp" in names else None
    if "ep" not in names or mesh["ep"].size() == 1:
        return Groups(mesh.get_group("pp"), dp, tp, mesh=mesh)
    # dp and ep flattened into one group (as torchtitan's meshes do): made once per mesh, reused by later Pipelines
    both = mesh["dp", "ep"]._flatten("dp_ep").get_group() if "dp" in names else mesh.get_group("ep")
    expert_dp = dp if dp is not None and mesh["dp"].size() > 1 else None
    return Groups(mesh.get_group("pp"), both, tp, mesh["ep"], expert_dp, mesh)


def check_expert_parallel(ep: int, *, shard: str, tp: int, overlap: bool = False) -> None:
    """ValueError for what expert parallel does not compose with yet, and an overlap with nothing to hide."""
    if overlap and ep == 1:
        raise ValueError("overlap=True pairs forwards with backwards to hide expert parallel's all-to-alls behind "
                         "compute; with ep=1 there are none: give a mesh with an \"ep\" dimension of 2 or more "
                         "(CLI: --ep), or leave overlap off")
    if ep > 1 and shard != "none":
        raise ValueError(f"expert parallel (ep={ep}) with shard={shard!r}: the sharded optimizer does not split "
                         "experts yet; use shard='none' with ep, or ep=1")
    if ep > 1 and tp > 1:
        raise ValueError(f"expert parallel (ep={ep}) with tensor parallel (tp={tp}) is not supported yet: use one "
                         "of them")


def check_shard(shard: str, dp_group) -> None:
    """ValueError unless `shard` is a known mode that this layout can take (sharding needs replicas)."""
    from ..runtime.zero import SHARD_MODES

    if shard not in SHARD_MODES:
        raise ValueError(f"shard={shard!r}: choose one of {', '.join(map(repr, SHARD_MODES))}")
    if shard != "none" and (dp_group is None or dist.get_world_size(dp_group) == 1):
        raise ValueError(f"shard={shard!r} shards over data-parallel replicas, but this pipeline has none: give a "
                         "mesh with a 'dp' dimension of size 2 or more (CLI: --dp 2), or shard='none'")
