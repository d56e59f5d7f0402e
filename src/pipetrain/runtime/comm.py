"""Transports that move tensors between ranks: torch.distributed P2P, and in-process for tests."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

try:
    from torch._C._distributed_c10d import _resolve_process_group
except ImportError:  # a torch built without distributed: only in-process transports work
    _resolve_process_group = None


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
    """A torch.distributed request. `release()` drops it (the pipeline's communication was torn down): a
    request still referenced would keep its process group, and so its connections, alive."""

    def __init__(self, work, transport: DistTransport | None = None) -> None:
        self._work = work
        self._transport = transport

    def wait(self, timeout: float) -> None:
        work = self._work
        if work is None:
            raise RuntimeError(f"the pipeline's communication was torn down ({self._transport.aborted})")
        if self._transport is not None and self._transport.backend == "nccl":
            self._wait_polling(work, timeout)
        else:
            work.wait(timedelta(seconds=timeout))

    def _wait_polling(self, work, timeout: float) -> None:
        """NCCL: a peer's failure closes no connection, so poll for completion and for a failure recorded
        by another rank (every `FAILURE_POLL` s), then order the current stream after the transfer."""
        start = checked = time.perf_counter()
        while not work.is_completed():
            now = time.perf_counter()
            if now - start > timeout:
                raise TimeoutError(f"timed out after {timeout:g}s")
            if now - checked > FAILURE_POLL:
                checked = now
                failure = self._transport.first_failure()
                if failure is not None:
                    raise RuntimeError(failure)
            time.sleep(0.0002)
        work.wait()

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def release(self) -> None:
        self._work = None


FAILURE_POLL = 0.5  # seconds between looks at the store for a failure recorded by another rank (NCCL)


class DistTransport:
    """torch.distributed isend/irecv among the ranks of `group` (any backend), over process groups of its
    own (the same ranks), so that a failure can tear them down without touching the caller's groups. Peers
    are ranks in `group`.

    On a failure (`abort`) the rank records it in the job's store, where the first one recorded is the one
    every rank names, drops its requests and destroys its own groups: over gloo that closes its connections,
    so a peer waiting on it fails within about a second even while this process lives on; over NCCL peers
    find the record while they wait (`FAILURE_POLL`).

    NCCL runs both directions of a rank pair on one stream, so a receive posted early could block a send
    queued behind it. With `split_directions` (the default for NCCL) each direction of each pair that
    carries traffic gets its own communicator, which keeps the first-in first-out model that `check`
    proves deadlock-free. Creating them is collective over the default group: every rank gathers every
    pipeline's (global ranks, pairs) and all ranks create the groups in one global order.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                 *, pairs: list[tuple[int, int]] = (), split_directions: bool | None = None,
                 vocabulary: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: launch with torchrun and call "
                               "torch.distributed.init_process_group() first (or pass an in-process transport)")
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        self.global_ranks = (tuple(dist.get_global_rank(group, r) for r in range(self.world_size)) if group is not None
                             else tuple(range(self.world_size)))
        self.aborted: str | None = None  # why this rank tore its communication down
        self._works: weakref.WeakSet[DistWork] = weakref.WeakSet()
        # Groups are held by name and looked up at each call (1 us): an object held past
        # destroy_process_group() sometimes makes gloo abort the process at exit, and one held anywhere keeps
        # its connections open after a failure.
        self._owned: list[str] = []
        self._group: str | None = None
        self._direction_groups: dict[tuple[int, int], str] = {}
        self.vocabulary_groups: list[str] = []  # vocabulary parallelism's collectives, one group per kind
        if self.world_size > 1:
            split = split_directions if split_directions is not None else self.backend == "nccl"
            self._create_groups(sorted(set(pairs)) if split else [], vocabulary)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._failure_key = f"pipetrain/failure/{attempt}/{self._group}"

    def _create_groups(self, pairs: list[tuple[int, int]], vocabulary: bool) -> None:
        """This pipeline's own group (and with `vocabulary` five more over its ranks), and one per direction of
        each rank pair in `pairs`. Creating groups is collective over the default group: every rank gathers
        every pipeline's (global ranks, pairs) and all ranks create the groups in one global order (so their
        names, too, are the same everywhere)."""
        mine = [(self.global_ranks[src], self.global_ranks[dst]) for src, dst in pairs]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.global_ranks, mine, vocabulary))
        me = self.global_ranks[self.rank]
        extra = 5 if any(v for _, _, v in everyone) else 0  # (vocabulary parallelism's collectives)
        for ranks in sorted({tuple(sorted(ranks)) for ranks, _, _ in everyone}):  # non-members: a non-group handle
            group, *more = [dist.new_group(list(ranks)) for _ in range(1 + extra)]
            if me in ranks and ranks == tuple(sorted(self.global_ranks)):
                self._group = group.group_name
                self.vocabulary_groups = [g.group_name for g in more]
                self._owned += [group.group_name, *self.vocabulary_groups]
        to_local = {g: r for r, g in enumerate(self.global_ranks)}
        for src, dst in sorted({pair for _, pipeline_pairs, _ in everyone for pair in pipeline_pairs}):
            group = dist.new_group(sorted((src, dst)))
            if me in (src, dst) and (src, dst) in mine:
                self._direction_groups[(to_local[src], to_local[dst])] = group.group_name
                self._owned.append(group.group_name)

    def _resolve(self, name: str | None) -> dist.ProcessGroup | None:
        if name is None:
            return None
        try:
            return _resolve_process_group(name)
        except RuntimeError as err:
            why = self.aborted or "the process group was destroyed (destroy_process_group)"
            raise RuntimeError(f"the pipeline's communication is gone: {why}") from err

    def _group_for(self, src: int, dst: int) -> dist.ProcessGroup | None:
        return self._resolve(self._direction_groups.get((src, dst), self._group))

    def group(self, name: str) -> dist.ProcessGroup:
        """One of this transport's own groups by name (e.g. `vocabulary_groups`), as the collectives take it."""
        return self._resolve(name)

    def track(self, work) -> DistWork:
        """A request on one of this transport's groups, waited for as the transfers are (released on `abort`)."""
        return self._track(work)

    def _track(self, work) -> DistWork:
        wrapped = DistWork(work, self)
        self._works.add(wrapped)
        return wrapped

    def isend(self, tensor: torch.Tensor, peer: int) -> Work:
        try:
            return self._track(dist.isend(tensor, self.global_ranks[peer], group=self._group_for(self.rank, peer)))
        except RuntimeError as err:  # gloo refuses to post on a connection the peer closed
            raise posting_failed(self, peer, "receive", err) from err  # (this rank sends: the peer receives)

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        try:
            return self._track(dist.irecv(tensor, self.global_ranks[peer], group=self._group_for(peer, self.rank)))
        except RuntimeError as err:
            raise posting_failed(self, peer, "send", err) from err

    def all_reduce(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        refuse_if_stopped(self)
        if self.world_size > 1:
            try:
                work = self._track(dist.all_reduce(tensor, group=self._resolve(self._group), async_op=True))
            except RuntimeError as err:
                raise CommError(led_by_first_failure(
                    self, f"{rank_name(self, self.rank)}: the pipeline's all-reduce failed: {err}")) from err
            wait_or_raise(work, timeout=timeout, transport=self, peer=None, what="the pipeline's all-reduce")
        return tensor

    # --- failures --------------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """This rank failed with `reason`: record it (unless another rank's failure came first), then tear
        down this pipeline's communication on this rank so that no peer waits on it. Idempotent."""
        if self.aborted is not None:
            return
        self.aborted = reason
        store = _default_store()
        if store is not None and self._group is not None:
            try:
                store.compare_set(self._failure_key, "", reason)
            except Exception:  # noqa: BLE001 - the store may be gone with a dead launcher; tear down anyway
                pass
        for work in list(self._works):
            work.release()
        for name in self._owned:
            try:
                group = _resolve_process_group(name)
            except RuntimeError:
                continue
            if self.backend == "nccl":
                dist.distributed_c10d._abort_process_group(group)
            else:
                dist.destroy_process_group(group)
            del group
        gc.collect()  # (a request or group in a reference cycle would keep the connections open)

    def first_failure(self) -> str | None:
        """The failure the pipeline's ranks recorded first (`abort`), if any."""
        store = _default_store()
        if store is None or self._group is None:
            return None
        try:
            if store.check([self._failure_key]):
                return store.get(self._failure_key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - no store, no record: the error names the neighbour only
            return None
        return None


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


def rank_name(transport: Transport, rank: int) -> str:
    """How errors name a pipeline rank: "rank 1", or "global rank 3 (pipeline rank 1)" when the pipeline is
    a subgroup (data parallelism) whose numbering differs from the job's."""
    global_ranks = getattr(transport, "global_ranks", None)
    if global_ranks is None or global_ranks[rank] == rank:
        return f"rank {rank}"
    return f"global rank {global_ranks[rank]} (pipeline rank {rank})"


def abort_others(transport: Transport, rank: int, err: BaseException) -> None:
    """`rank` failed with `err`: record it and tear down its communication (`DistTransport.abort`; in-process:
    wake the other ranks' waits), so every other rank stops within seconds, naming the first failure."""
    abort = getattr(transport, "abort", None)
    if abort is not None:
        what = str(err) if len(str(err)) <= 600 else str(err)[:600] + " ..."
        abort(f"{rank_name(transport, rank)} failed: {type(err).__name__}: {what}")


def _default_store():
    """The job's rendezvous store (where ranks record the first failure), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def refuse_if_stopped(transport: Transport) -> None:
    """CommError if this rank's pipeline stopped at a failure: nothing more can run on it."""
    aborted = getattr(transport, "aborted", None)
    if aborted is not None:
        raise CommError(f"{rank_name(transport, transport.rank)}: this pipeline stopped at a failure and its "
                        f"communication is torn down ({aborted}); build a new Pipeline, or restart the job "
                        "(e.g. from its last checkpoint), to go on")


def _first_failure(transport: Transport) -> str | None:
    """The pipeline's first recorded failure ("rank 3 failed: ValueError: ..."), where the transport keeps one."""
    first_failure = getattr(transport, "first_failure", None)
    return first_failure() if first_failure is not None else None


def led_by_first_failure(transport: Transport, message: str) -> str:
    """`message` ("rank 0: ...") led by the pipeline's first recorded failure, if a rank recorded one that
    the message does not name: "rank 0: the pipeline stopped at its first failure: rank 3 failed: ValueError:
    .... (Here: <the rest of message>)"."""
    failure = _first_failure(transport)
    if not failure or failure in message:
        return message
    me = rank_name(transport, transport.rank)
    return f"{me}: the pipeline stopped at its first failure: {failure}. (Here: {message.removeprefix(me + ': ')})"


def posting_failed(transport: Transport, peer: int, what: str, err: BaseException, doing: str = "") -> CommError:
    """A transfer with `peer` that could not even be posted (a closed connection), in `bounded_wait`'s words."""
    them = rank_name(transport, peer)
    return CommError(led_by_first_failure(
        transport, f"{rank_name(transport, transport.rank)}: {doing + ' ' if doing else ''}waiting on {them} to "
                   f"{what} it failed after 0.0s: {err}. {them[0].upper() + them[1:]} may have crashed or be stuck; "
                   "check its log"))


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


def wait_replicas(work, timeout: float, what: str) -> None:
    """A collective over the replicas, bounded (`bounded_wait`)."""
    bounded_wait(DistWork(work), timeout, me=f"global rank {dist.get_rank()}", them="the other replicas", what=what)


def wait_or_raise(work: Work, *, timeout: float, transport: Transport, peer: int | None, what: str,
                  doing: str = "") -> None:
    """`bounded_wait` for a transfer with `peer` of `transport`'s pipeline (None: a collective over all of it);
    the error also names the pipeline's first failure, if a rank recorded one."""
    them = rank_name(transport, peer) if peer is not None else "the other ranks"
    try:
        bounded_wait(work, timeout, me=rank_name(transport, transport.rank), them=them, what=what, doing=doing)
    except CommError as err:
        led = led_by_first_failure(transport, str(err))
        if led != str(err):
            raise CommError(led) from err.__cause__
        raise


MESSAGE_BYTES = 1000  # of a failing rank's error that `fail_together(..., tell=True)` passes to the others


def fail_together(error: BaseException | None, *, rank: int, world_size: int,
                  sum_all: Callable[[torch.Tensor], torch.Tensor], what: str,
                  payload: torch.Tensor | None = None, name: Callable[[int], str] = "rank {}".format,
                  tell: bool = False) -> torch.Tensor:
    """The one way ranks fail together outside a step: one sum over the ranks (also a barrier) of a flag per rank,
    and of `payload` (float64) if given. A rank whose `error` is set raises it; every other rank raises
    RuntimeError naming the ranks that failed at `what` (with `tell`, also the first one's error, so every
    rank's one line says what was wrong), so no rank goes on to wait for a peer that stopped.
    Returns the summed payload (empty without one) when no rank failed. `sum_all` sums a CPU float64 tensor
    over every rank calling this (a pipeline's ranks, and its replicas: their flags add up)."""
    flags = torch.zeros(world_size, dtype=torch.float64)
    flags[rank] = float(error is not None)
    messages = torch.zeros(world_size, MESSAGE_BYTES if tell else 0, dtype=torch.float64)
    if tell and error is not None:
        text = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        messages[rank, :len(text)] = torch.tensor(list(text), dtype=torch.float64)
    rest = payload.detach().to("cpu", torch.float64).reshape(-1) if payload is not None else flags[:0]
    total = sum_all(torch.cat([flags, messages.reshape(-1), rest])).cpu()
    if error is not None:
        raise error
    failed = [r for r, flag in enumerate(total[:world_size].tolist()) if flag]
    if failed:
        whose = "its" if len(failed) == 1 else "their"
        said = f"see {whose} error"
        if tell:
            row = total[world_size:world_size + world_size * MESSAGE_BYTES].reshape(world_size, -1)[failed[0]]
            said = bytes(int(b) for b in row.tolist() if b).decode(errors="replace")
        raise RuntimeError(f"{what} failed on {', '.join(name(r) for r in failed)} ({said}); {name(rank)} stops too")
    rest = total[world_size + messages.numel():]
    return rest.reshape(payload.shape) if payload is not None else rest
