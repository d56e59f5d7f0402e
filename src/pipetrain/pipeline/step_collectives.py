"""The collectives one `Pipeline.step` issues on each rank, gathered from every rank and checked for one
order across ranks (`schedule.collective_order`) before the first step."""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist

from ..runtime.comm import Transport
from ..runtime.dist_transport import DistTransport
from ..runtime.ties import TiedWeights
from ..schedule.actions import Action
from ..schedule.collective_order import Call, check_collective_order


def step_program(actions: Sequence[Action], *, me: int, pipeline: Sequence[int], replicas: Sequence[int],
                 ties: TiedWeights) -> list[Call]:
    """What a step issues on global rank `me`, in order (`pipeline`, `replicas`: the global ranks of its
    pipeline and of its data-parallel group): each REDUCE / GATHER action's collective over the replicas, as
    the lowered `actions` order them; then, in a step that syncs gradients, each tied weight's exchange with
    its peer and the tied weights' reduction over the replicas; then the loss all-reduce over the pipeline
    and over the replicas."""
    dp = tuple(sorted(replicas))
    calls = [Call(dp, str(a)) for a in actions if a.op.is_collective]
    for tie in ties.ties:
        calls.append(Call(tuple(sorted((me, pipeline[tie.peer]))), "a tied weight's gradient exchange"))
    if ties.ties and len(dp) > 1:
        calls.append(Call(dp, "the tied weights' gradient reduction"))
    calls.append(Call(tuple(sorted(pipeline)), "the step's loss all-reduce over the pipeline"))
    if len(dp) > 1:
        calls.append(Call(dp, "the step's loss all-reduce over the replicas"))
    return calls


def check_step_collectives(actions: Sequence[Action], transport: Transport, dp_group: dist.ProcessGroup | None,
                           ties: TiedWeights) -> None:
    """Gather every rank's `step_program` (collective over the job) and check their order: a ScheduleError,
    the same on every rank, naming the ranks and collectives that would mix up or hang."""
    if not isinstance(transport, DistTransport) or dist.get_world_size() == 1:
        return
    me = dist.get_rank()
    replicas = dist.get_process_group_ranks(dp_group) if dp_group is not None else [me]
    program = step_program(actions, me=me, pipeline=transport.global_ranks, replicas=replicas, ties=ties)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (me, program))
    check_collective_order(dict(everyone))
