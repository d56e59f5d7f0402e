"""Data parallelism across pipeline replicas: average each stage's gradients over the dp group.

Each stage's gradients move into one flat buffer (each freed as it moves) summed with one asynchronous
all-reduce, launched by the stage's REDUCE action (right after its last B or W, `schedule.collectives`), so
the reduction overlaps the rest of the pipeline's tail. `finish(scale)` waits (bounded), scales the sums by
`scale` (1/dp for a mean loss, 1/(the global token count) for a token-mean loss, whose normalization is
known only once every replica has counted) and makes each parameter's `.grad` its view of the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..schedule.actions import Action, finishes_weights
from .comm import wait_replicas
from .expert_parallel import is_expert_parallel
from .gradient_buffer import attach_gradients, move_gradients
from .stage import Stage
from .tensor_parallel import local, set_grad
from .zero import ShardedGradients, wait_all

TIED = -1  # the gradient bucket of weights tied across ranks


class GradientAverager:
    """Averages gradients of parameter buckets over `group` (the replicas of this pipeline position): the
    executor's `Collectives` (REDUCE launches `reduce`; there is nothing to gather).

    Expert weights split over an "ep" group (`expert_parallel`) are summed over `expert_group` only (the
    replicas that hold the same experts; None: there are none): their gradients already hold every ep
    rank's tokens. Both sums are then scaled alike."""

    def __init__(self, group: dist.ProcessGroup, buckets: dict[int, list[nn.Parameter]], timeout: float,
                 expert_group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.buckets = {key: [p for p in params if p.requires_grad] for key, params in buckets.items()}
        self.timeout = timeout
        self._pending: list[tuple[int, object, torch.Tensor, list[nn.Parameter]]] = []
        self._groups = {False: group, True: expert_group}
        self._kinds = {key: _by_kind(params) for key, params in self.buckets.items()}
        self._attached: dict[int, list[torch.Tensor | None]] = {}  # this step's gradient buffers, by bucket

    def before_backward(self, stage: int) -> None:
        """Before stage `stage`'s backward: its gradients go straight into the buffers its reduction reads
        (`attach_gradients`), once per step."""
        if stage in self.buckets and stage not in self._attached:
            self._attached[stage] = [attach_gradients(params, numels, sum(numels))
                                     for params, numels, _ in self._kinds[stage]]

    def reduce(self, key: int) -> None:
        """Begin summing bucket `key` over the replicas (asynchronous; one buffer per dtype and device of its
        parameters). A missing gradient counts as zeros."""
        kinds = self._kinds.get(key, [])
        attached = self._attached.pop(key, [None] * len(kinds))
        for (params, numels, experts), flat in zip(kinds, attached, strict=True):
            flat = move_gradients(params, numels, sum(numels), flat)
            group = self._groups[experts]
            work = dist.all_reduce(flat, group=group, async_op=True) if group is not None else None
            self._pending.append((key, work, flat, params))

    def gather(self, key: int) -> None:
        """(Parameters are whole on every replica: nothing to gather.)"""

    def wait_gathered(self, key: int) -> bool:
        return False

    def wait(self) -> list[tuple[int, float, float]]:
        """Wait for every started reduction (bounded); each one's wait (key, start, end), in
        `time.perf_counter()` seconds."""
        return wait_all(self._pending, self.timeout, "all-reduce")

    def finish(self, scale: float) -> None:
        """After `wait`: each started bucket's sum times `scale` becomes `.grad` (views of the reduced buffer)."""
        self.wait()  # (at once when waited for)
        pending, self._pending = self._pending, []
        for _, _, flat, params in pending:
            flat.mul_(scale)
            offset = 0
            for p in params:
                n = local(p).numel()
                set_grad(p, flat[offset:offset + n].view_as(local(p)))
                offset += n

    def settle(self) -> None:
        """(Nothing to do once the gradients are final: they are in `.grad`.)"""

    def abandon(self) -> None:
        """After a failed step: forget started reductions (the step's gradients are not used)."""
        self._pending.clear()
        self._attached.clear()


def _by_kind(params: list[nn.Parameter]) -> list[tuple[list[nn.Parameter], list[int], bool]]:
    """`params` by dtype, device and whether they are experts split over "ep" (one buffer each), with their
    sizes (split by tensor or expert parallel: this rank's slices)."""
    kinds: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        kinds.setdefault((p.dtype, p.device, is_expert_parallel(p)), []).append(p)
    return [(group, [local(p).numel() for p in group], key[2]) for key, group in kinds.items()]


def averager_for(stages: dict[int, Stage], actions: Sequence[Action], tied: Sequence[nn.Parameter],
                 dp_group: dist.ProcessGroup, timeout: float, identity: tuple, shard: str = "none",
                 expert_group: dist.ProcessGroup | None = None):
    """The replicas' gradient reduction: a GradientAverager, or for shard="optimizer" | "gradients" | "params"
    a `zero.ShardedGradients`. One bucket per stage, each parameter in the bucket of the last of its stages
    to finish its weight gradients (a weight shared by two stages of this rank), `tied` weights in their own
    (`TIED`, reduced after the step: weights tied across ranks, and vocabulary parallelism's tables).

    `identity` (pipeline rank, schedule, microbatches, balance, shard) must be the same on every replica."""
    size = dist.get_world_size(dp_group)
    replicas: list = [None] * size
    dist.all_gather_object(replicas, identity, group=dp_group)
    if any(r != identity for r in replicas):
        raise ValueError(f"the dp_group's replicas disagree on (pipeline rank, schedule, microbatches, balance, "
                         f"shard): "
                         f"{replicas}; each data-parallel group must hold the ranks at the same pipeline "
                         "position of identical pipelines (a DeviceMesh with dims ('dp', 'pp') does this)")
    last_action = {a.stage: i for i, a in enumerate(actions) if finishes_weights(a)}
    tied_ids = {id(p) for p in tied}
    bucket_of: dict[int, int] = {}
    params: dict[int, nn.Parameter] = {}
    for s in sorted(stages, key=lambda s: last_action[s]):
        for p in stages[s].module.parameters():
            bucket_of[id(p)] = TIED if id(p) in tied_ids else s
            params[id(p)] = p
    for p in tied:  # (outside every stage: a vocabulary-parallel table's rows on a rank without its layer)
        if id(p) not in params:
            bucket_of[id(p)], params[id(p)] = TIED, p
    buckets: dict[int, list[nn.Parameter]] = {}
    for key, p in params.items():
        buckets.setdefault(bucket_of[key], []).append(p)
    if shard == "none":
        return GradientAverager(dp_group, buckets, timeout, expert_group)
    needs = {s: {bucket_of[id(p)] for p in stage.module.parameters()} for s, stage in stages.items()}
    return ShardedGradients(dp_group, buckets, timeout, shard, needs)


def sum_over(group: dist.ProcessGroup | None, tensor: torch.Tensor, timeout: float,
             what: str = "a data-parallel all-reduce") -> torch.Tensor:
    """Sum of a small tensor over `group` (in place, bounded wait); the identity without a group."""
    if group is not None and dist.get_world_size(group) > 1:
        wait_replicas(dist.all_reduce(tensor, group=group, async_op=True), timeout, what)
    return tensor
