"""Ranks as threads of one process, for fast tests: a shared mailbox instead of a process group."""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

from .comm import CommError, Work, refuse_if_stopped


class _Channel:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: dict[int, torch.Tensor] = {}
        self.sent = 0
        self.posted = 0


class InProcessHub:
    """Shared mailbox for ranks running as threads of one process (fast tests, no process group).

    Messages between each (sender, receiver) are matched in posting order, as NCCL and gloo do.
    `abort()` wakes every waiter with an error, as a dead peer's closed connection would.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._channels: dict[tuple[int, int], _Channel] = defaultdict(_Channel)
        self._lock = threading.Lock()
        self.aborted: str | None = None
        self._reduce = threading.Condition()
        self._rounds: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)  # round -> rank -> contribution
        self._round_of = [0] * world_size

    def channel(self, src: int, dst: int) -> _Channel:
        with self._lock:
            return self._channels[(src, dst)]

    def transport(self, rank: int) -> InProcessTransport:
        return InProcessTransport(self, rank)

    def abort(self, reason: str) -> None:
        """Fail every wait (the first reason given is kept: it names the rank that failed first)."""
        if self.aborted is None:
            self.aborted = reason
        with self._lock:
            channels = list(self._channels.values())
        for ch in channels:
            with ch.cond:
                ch.cond.notify_all()
        with self._reduce:
            self._reduce.notify_all()

    def all_reduce(self, rank: int, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        """Sum over the ranks, added in rank order (the same bits on every rank)."""
        with self._reduce:
            number = self._round_of[rank]
            self._round_of[rank] += 1
            contributions = self._rounds[number]
            contributions[rank] = tensor.detach().clone()
            self._reduce.notify_all()
            self._reduce.wait_for(lambda: len(contributions) == self.world_size or self.aborted is not None, timeout)
            if len(contributions) < self.world_size:
                if self.aborted is not None:
                    raise RuntimeError(f"peer failed: {self.aborted}")
                missing = sorted(set(range(self.world_size)) - set(contributions))
                raise TimeoutError(f"timed out after {timeout:g}s in an all-reduce waiting for rank(s) {missing}")
            total = contributions[0].clone()
            for r in range(1, self.world_size):
                total += contributions[r]
            if all(self._round_of[r] > number for r in range(self.world_size)):
                self._rounds.pop(number, None)
        tensor.copy_(total)
        return tensor


class _DoneWork:
    def wait(self, timeout: float) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class _InProcessRecv:
    def __init__(self, hub: InProcessHub, channel: _Channel, ticket: int, out: torch.Tensor) -> None:
        self.hub, self.channel, self.ticket, self.out = hub, channel, ticket, out
        self.done = False

    def wait(self, timeout: float) -> None:
        if self.done:
            return
        ch = self.channel
        with ch.cond:
            ch.cond.wait_for(lambda: self.ticket in ch.items or self.hub.aborted is not None, timeout)
            if self.ticket not in ch.items:
                if self.hub.aborted is not None:
                    raise RuntimeError(f"peer failed: {self.hub.aborted}")
                raise TimeoutError(f"timed out after {timeout:g}s waiting for the message")
            data = ch.items.pop(self.ticket)
        if data.shape != self.out.shape or data.dtype != self.out.dtype:
            raise RuntimeError(f"message of shape {tuple(data.shape)} {data.dtype} does not fit the receive "
                               f"buffer {tuple(self.out.shape)} {self.out.dtype}")
        self.out.copy_(data)
        self.done = True

    def is_completed(self) -> bool:
        """Done, the message in the buffer (as a completed torch.distributed receive's is)."""
        if not self.done and self.ticket in self.channel.items:
            self.wait(0.0)
        return self.done


class InProcessTransport:
    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.device = torch.device("cpu")

    def isend(self, tensor: torch.Tensor, peer: int) -> Work:
        ch = self.hub.channel(self.rank, peer)
        with ch.cond:
            ch.items[ch.sent] = tensor.detach().clone()
            ch.sent += 1
            ch.cond.notify_all()
        return _DoneWork()

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        ch = self.hub.channel(peer, self.rank)
        with ch.cond:
            ticket = ch.posted
            ch.posted += 1
        return _InProcessRecv(self.hub, ch, ticket, tensor)

    def all_reduce(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        refuse_if_stopped(self)
        try:
            return self.hub.all_reduce(self.rank, tensor, timeout)
        except (RuntimeError, TimeoutError) as err:
            raise CommError(f"rank {self.rank}: the pipeline's all-reduce failed: {err}") from err

    @property
    def aborted(self) -> str | None:
        return self.hub.aborted

    def abort(self, reason: str) -> None:
        """This rank failed: wake every other rank's waits with `reason`."""
        self.hub.abort(reason)

    def first_failure(self) -> str | None:
        return self.hub.aborted
