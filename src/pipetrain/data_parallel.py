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
            _wait(work, self.timeout, f"the data-parallel gradient all-reduce of stage {key}")
            offset = 0
            for p in self.buckets[key]:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def abandon(self) -> None:
        """After a failed step: forget started reductions (the step's gradients are not used)."""
        self._pending.clear()


def sum_over(group: dist.ProcessGroup | None, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
    """Sum of a small tensor over `group` (in place, bounded wait); the identity without a group."""
    if group is not None and dist.get_world_size(group) > 1:
        _wait(dist.all_reduce(tensor, group=group, async_op=True), timeout, "a data-parallel all-reduce")
    return tensor


def average_over(group: dist.ProcessGroup | None, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
    """Mean of a small tensor over `group` (in place); the identity without a group."""
    return sum_over(group, tensor, timeout).div_(dist.get_world_size(group) if group is not None else 1)


def _wait(work, timeout: float, what: str) -> None:
    """Wait for a collective, bounded; a failure or timeout raises CommError naming this rank and what."""
    try:
        work.wait(timedelta(seconds=timeout))
    except Exception as err:
        raise CommError(f"global rank {dist.get_rank()}: {what} failed or timed out after {timeout:g}s: {err}. "
                        "A replica may have crashed or be stuck; check the other ranks' logs") from err
