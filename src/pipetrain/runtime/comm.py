"""Transports that move tensors between ranks: torch.distributed P2P, and in-process for tests."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist


class CommError(RuntimeError):
    """A transfer that failed or timed out; the message names the rank, the action and the peer."""


class Work(Protocol):
    def wait(self, timeout: float) -> None: ...

    def is_completed(self) -> bool: ...


class Transport(Protocol):
    """Point-to-point messages between the ranks of one pipeline, matched in order per (sender, receiver),
    and a sum over all of them (for the step's loss and a trainer's metrics)."""

    rank: int
    world_size: int
    device: torch.device

    def isend(self, tensor: torch.Tensor, peer: int) -> Work: ...

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work: ...

    def all_reduce(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        """Sum `tensor` over the pipeline's ranks, in place (bounded by `timeout`); returns it."""
        ...


class DistWork:
    def __init__(self, work) -> None:
        self._work = work

    def wait(self, timeout: float) -> None:
        self._work.wait(timedelta(seconds=timeout))

    def is_completed(self) -> bool:
        return self._work.is_completed()


class DistTransport:
    """torch.distributed isend/irecv within `group` (any backend). Peers are ranks in the group.

    NCCL runs both directions of a rank pair on one stream, so a receive posted early could block a send
    queued behind it. With `split_directions` (the default for NCCL) each direction of each pair that
    carries traffic gets its own communicator, which keeps the first-in first-out model that `check`
    proves deadlock-free. Creating them is collective over the default group: every rank gathers every
    pipeline's (global ranks, pairs) and all ranks create the groups in one global order.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                 *, pairs: list[tuple[int, int]] = (), split_directions: bool | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: launch with torchrun and call "
                               "torch.distributed.init_process_group() first (or pass an in-process transport)")
        # None: the default group, looked up at each call. Holding the default group's object would keep it
        # alive past destroy_process_group(), and gloo then sometimes aborts the process at exit.
        self.group = group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        self.global_ranks = (tuple(dist.get_global_rank(group, r) for r in range(self.world_size)) if group is not None
                             else tuple(range(self.world_size)))
        self._direction_groups: dict[tuple[int, int], dist.ProcessGroup] = {}
        if split_directions if split_directions is not None else self.backend == "nccl":
            self._create_direction_groups(sorted(set(pairs)))

    def _create_direction_groups(self, pairs: list[tuple[int, int]]) -> None:
        mine = [(self.global_ranks[src], self.global_ranks[dst]) for src, dst in pairs]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        all_pairs = sorted({pair for pipeline_pairs in everyone for pair in pipeline_pairs})
        to_local = {g: r for r, g in enumerate(self.global_ranks)}
        me = self.global_ranks[self.rank]
        for src, dst in all_pairs:  # the same order on every rank; non-members get a non-group handle
            group = dist.new_group(sorted((src, dst)))
            if me in (src, dst) and (src, dst) in mine:
                self._direction_groups[(to_local[src], to_local[dst])] = group

    def _group_for(self, src: int, dst: int) -> dist.ProcessGroup:
        return self._direction_groups.get((src, dst), self.group)

    def isend(self, tensor: torch.Tensor, peer: int) -> Work:
        try:
            return DistWork(dist.isend(tensor, self.global_ranks[peer], group=self._group_for(self.rank, peer)))
        except RuntimeError as err:  # gloo refuses to post on a connection the peer closed
            raise _posting_failed(self, peer, "send", err) from err

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        try:
            return DistWork(dist.irecv(tensor, self.global_ranks[peer], group=self._group_for(peer, self.rank)))
        except RuntimeError as err:
            raise _posting_failed(self, peer, "receive from", err) from err

    def all_reduce(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        if self.world_size > 1:
            work = DistWork(dist.all_reduce(tensor, group=self.group, async_op=True))
            wait_or_raise(work, timeout=timeout, transport=self, peer=None, what="the pipeline's all-reduce")
        return tensor


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
        return self.done or self.ticket in self.channel.items


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
        try:
            return self.hub.all_reduce(self.rank, tensor, timeout)
        except (RuntimeError, TimeoutError) as err:
            raise CommError(f"rank {self.rank}: the pipeline's all-reduce failed: {err}") from err

    def abort(self, reason: str) -> None:
        """This rank failed: wake every other rank's waits with `reason`."""
        self.hub.abort(reason)


def rank_name(transport: Transport, rank: int) -> str:
    """How errors name a pipeline rank: "rank 1", or "global rank 3 (pipeline rank 1)" when the pipeline is
    a subgroup (data parallelism) whose numbering differs from the job's."""
    global_ranks = getattr(transport, "global_ranks", None)
    if global_ranks is None or global_ranks[rank] == rank:
        return f"rank {rank}"
    return f"global rank {global_ranks[rank]} (pipeline rank {rank})"


def abort_others(transport: Transport, rank: int, err: BaseException) -> None:
    """Tell the other ranks that `rank` failed with `err`, where the transport can (in-process: wake their
    waits; over torch.distributed the failing process's exit closes its connections instead)."""
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort(f"{rank_name(transport, rank)} failed: {type(err).__name__}: {err}")


def _posting_failed(transport: Transport, peer: int, what: str, err: Exception) -> CommError:
    them = rank_name(transport, peer)  # (the message of `bounded_wait`: a closed connection ends a wait at once)
    return CommError(f"{rank_name(transport, transport.rank)}: waiting on {them} to {what} it failed after 0.0s: "
                     f"{err}. {them[0].upper() + them[1:]} may have crashed or be stuck; check its log")


def bounded_wait(work: Work, timeout: float, *, me: str, them: str, what: str, doing: str = "") -> None:
    """The one bounded wait: wait for `work` at most `timeout` seconds; if it fails or times out, raise
    CommError "{me}: {doing} waiting on {them} for {what} timed out after 3s: ..." ("failed after 0.4s" when a
    closed connection ended it sooner), naming who waited, on whom, for what, and what to check."""
    start = time.perf_counter()
    try:
        work.wait(timeout)
    except Exception as err:  # gloo raises RuntimeError, in-process TimeoutError
        waited = time.perf_counter() - start
        how = f"timed out after {timeout:g}s" if waited >= 0.99 * timeout else f"failed after {waited:.1f}s"
        logs = "their logs" if them.startswith("the ") else "its log"
        raise CommError(f"{me}: {doing + ' ' if doing else ''}waiting on {them} for {what} {how}: {err}. "
                        f"{them[0].upper() + them[1:]} may have crashed or be stuck; check {logs}") from err


def wait_or_raise(work: Work, *, timeout: float, transport: Transport, peer: int | None, what: str,
                  doing: str = "") -> None:
    """`bounded_wait` for a transfer with `peer` of `transport`'s pipeline (None: a collective over all of it)."""
    them = rank_name(transport, peer) if peer is not None else "the other ranks"
    bounded_wait(work, timeout, me=rank_name(transport, transport.rank), them=them, what=what, doing=doing)


def fail_together(error: BaseException | None, *, rank: int, world_size: int,
                  sum_all: Callable[[torch.Tensor], torch.Tensor], what: str,
                  payload: torch.Tensor | None = None, name: Callable[[int], str] = "rank {}".format) -> torch.Tensor:
    """The one way ranks fail together outside a step: one sum over the ranks (also a barrier) of a flag per rank,
    and of `payload` (float64) if given. A rank whose `error` is set raises it; every other rank raises
    RuntimeError naming the ranks that failed at `what`, so no rank goes on to wait for a peer that stopped.
    Returns the summed payload (empty without one) when no rank failed. `sum_all` sums a CPU float64 tensor
    over every rank calling this (a pipeline's ranks, and its replicas: their flags add up)."""
    flags = torch.zeros(world_size, dtype=torch.float64)
    flags[rank] = float(error is not None)
    rest = payload.detach().to("cpu", torch.float64).reshape(-1) if payload is not None else flags[:0]
    total = sum_all(torch.cat([flags, rest])).cpu()
    if error is not None:
        raise error
    failed = [r for r, flag in enumerate(total[:world_size].tolist()) if flag]
    if failed:
        whose = "its" if len(failed) == 1 else "their"
        raise RuntimeError(f"{what} failed on {', '.join(name(r) for r in failed)} (see {whose} error); "
                           f"{name(rank)} stops too")
    return total[world_size:].reshape(payload.shape) if payload is not None else rest
