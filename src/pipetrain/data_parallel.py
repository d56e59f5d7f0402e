"""Data parallelism across pipeline replicas: average each stage's gradients over the dp group.

Each stage's gradients go into one flat buffer, pre-divided by the replica count and summed with one
asynchronous all-reduce, started by the executor as soon as the stage's last B or W finishes, so the
reduction overlaps the rest of the pipeline's tail. `finish()` waits (bounded) and copies the averages back.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .comm import CommError


class GradientAverager:
    """Averages gradients of parameter buckets over `group` (the replicas of this pipeline position)."""

    def __init__(self, group: dist.ProcessGroup, buckets: dict[int, list[nn.Parameter]], timeout: float) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank()
        self.buckets = {key: [p for p in params if p.requires_grad] for key, params in buckets.items()}
        self.timeout = timeout
        self._pending: list[tuple[int, object, torch.Tensor]] = []

    def start(self, key: int) -> None:
        """Begin averaging bucket `key` (asynchronous). A missing gradient counts as zeros."""
        params = self.buckets.get(key)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).div_(self.size)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending.append((key, work, flat))

    def finish(self) -> None:
        """Wait for every started bucket and write the averages into `.grad`."""
        pending, self._pending = self._pending, []
        for key, work, flat in pending:
            try:
                work.wait(timedelta(seconds=self.timeout))
            except Exception as err:
                raise CommError(f"global rank {self.rank}: the data-parallel gradient all-reduce of stage {key} "
                                f"failed or timed out after {self.timeout:g}s: {err}. A replica may have crashed or be "
                                "stuck; check the other ranks' logs") from err
            offset = 0
            for p in self.buckets[key]:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def average_now(self, key: int) -> None:
        self.start(key)
        self.finish()

    def abandon(self) -> None:
        """After a failed step: forget started reductions (the step's gradients are not used)."""
        self._pending.clear()


def average_over(group: dist.ProcessGroup | None, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
    """Mean of a small tensor over `group` (in place); the identity without a group."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    work = dist.all_reduce(tensor, group=group, async_op=True)
    try:
        work.wait(timedelta(seconds=timeout))
    except Exception as err:
        raise CommError(f"global rank {dist.get_rank()}: a data-parallel all-reduce failed or timed out after "
                        f"{timeout:g}s: {err}. A replica may have crashed or be stuck") from err
    return tensor.div_(dist.get_world_size(group))
