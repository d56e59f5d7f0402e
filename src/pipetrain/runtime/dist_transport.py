"""The pipeline's transfers over torch.distributed (any backend), over groups of its own that a failure tears
down; between ranks of one host, over shared-memory rings (`shared_memory`)."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import weakref

import torch
import torch.distributed as dist

try:
    from torch._C._distributed_c10d import _resolve_process_group
except ImportError:  # a torch built without distributed: only in-process transports work
    _resolve_process_group = None

from .comm import (
    CommError,
    DistWork,
    Work,
    default_store,
    led_by_first_failure,
    posting_failed,
    rank_name,
    refuse_if_stopped,
    wait_or_raise,
)
from .shared_memory import SharedMemoryLinks, Unavailable, host_key

logger = logging.getLogger("pipetrain")


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

    With `shared_memory` (None: wherever it can, the default) the transfers between CPU ranks of one host go
    through shared-memory rings (`SharedMemoryLinks`) instead of gloo's sockets: a send is a copy, a receive
    of a message already there another; `PIPETRAIN_SHARED_MEMORY=0` or `shared_memory=False` keeps gloo.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                 *, pairs: list[tuple[int, int]] = (), split_directions: bool | None = None,
                 vocabulary: bool = False, shared_memory: bool | None = None) -> None:
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
        self.shared_memory: SharedMemoryLinks | None = None  # the rings, where the transfers use them
        hosts, token = [], ""
        if self.world_size > 1:
            split = split_directions if split_directions is not None else self.backend == "nccl"
            hosts, token = self._create_groups(sorted(set(pairs)) if split else [], vocabulary)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._failure_key = f"pipetrain/failure/{attempt}/{self._group}"
        usable = (self.backend == "gloo" and self.device.type == "cpu" and hosts[0] is not None
                  and all(h == hosts[0] for h in hosts)) if hosts else False
        if shared_memory and not usable:
            raise ValueError("shared_memory=True needs every rank of the pipeline on one x86-64 Linux host, on CPU "
                             f"over gloo (here: backend {self.backend}, device {self.device}, "
                             f"{len(set(hosts))} host(s)); leave it None to use it where it can")
        if usable and shared_memory is not False:
            try:
                self.shared_memory = SharedMemoryLinks(self.rank, self.world_size, f"/dev/shm/pipetrain-{token}",
                                                       agree=self._agree, first_failure=self.first_failure)
            except Unavailable as err:
                if shared_memory:
                    raise ValueError(f"shared_memory=True, but the rings could not be made: {err}") from err
                logger.warning("pipetrain: transfers over gloo, not shared memory: %s", err)

    def _create_groups(self, pairs: list[tuple[int, int]], vocabulary: bool) -> tuple[list, str]:
        """This pipeline's own group (and with `vocabulary` five more over its ranks), and one per direction of
        each rank pair in `pairs`. Creating groups is collective over the default group: every rank gathers
        every pipeline's (global ranks, pairs) and all ranks create the groups in one global order (so their
        names, too, are the same everywhere). Returns each pipeline rank's `host_key` and its rank 0's token."""
        mine = [(self.global_ranks[src], self.global_ranks[dst]) for src, dst in pairs]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.global_ranks, mine, vocabulary, host_key(), secrets.token_hex(8)))
        me = self.global_ranks[self.rank]
        extra = 5 if any(v for _, _, v, _, _ in everyone) else 0  # (vocabulary parallelism's collectives)
        for ranks in sorted({tuple(sorted(ranks)) for ranks, *_ in everyone}):  # non-members: a non-group handle
            group, *more = [dist.new_group(list(ranks)) for _ in range(1 + extra)]
            if me in ranks and ranks == tuple(sorted(self.global_ranks)):
                self._group = group.group_name
                self.vocabulary_groups = [g.group_name for g in more]
                self._owned += [group.group_name, *self.vocabulary_groups]
        to_local = {g: r for r, g in enumerate(self.global_ranks)}
        for src, dst in sorted({pair for _, pipeline_pairs, *_ in everyone for pair in pipeline_pairs}):
            group = dist.new_group(sorted((src, dst)))
            if me in (src, dst) and (src, dst) in mine:
                self._direction_groups[(to_local[src], to_local[dst])] = group.group_name
                self._owned.append(group.group_name)
        return [everyone[g][3] for g in self.global_ranks], everyone[self.global_ranks[0]][4]

    def _agree(self, ok: bool) -> bool:
        """Whether every rank of the pipeline says `ok` (a MIN all-reduce over its group: a barrier too)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._resolve(self._group))
        return bool(flag.item())

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
            if self.shared_memory is not None:
                return self.shared_memory.isend(tensor, peer)  # (its works end with its `close`)
            group = self._group_for(self.rank, peer)
            return self._track(dist.isend(_raw(tensor), self.global_ranks[peer], group=group))
        except RuntimeError as err:  # gloo refuses to post on a connection the peer closed
            raise posting_failed(self, peer, "receive", err) from err  # (this rank sends: the peer receives)

    def irecv(self, tensor: torch.Tensor, peer: int) -> Work:
        try:
            if self.shared_memory is not None:
                return self.shared_memory.irecv(tensor, peer)
            group = self._group_for(peer, self.rank)
            return self._track(dist.irecv(_raw(tensor), self.global_ranks[peer], group=group))
        except RuntimeError as err:
            raise posting_failed(self, peer, "send", err) from err

    def all_reduce(self, tensor: torch.Tensor, timeout: float) -> torch.Tensor:
        refuse_if_stopped(self)
        if self.world_size > 1 and self.shared_memory is not None and tensor.is_contiguous():
            self._all_reduce_by_transfers(tensor, timeout)
        elif self.world_size > 1:
            try:
                work = self._track(dist.all_reduce(tensor, group=self._resolve(self._group), async_op=True))
            except RuntimeError as err:
                raise CommError(led_by_first_failure(
                    self, f"{rank_name(self, self.rank)}: the pipeline's all-reduce failed: {err}")) from err
            wait_or_raise(work, timeout=timeout, transport=self, peer=None, what="the pipeline's all-reduce")
        return tensor

    def _all_reduce_by_transfers(self, tensor: torch.Tensor, timeout: float) -> None:
        """The sum through rank 0, added in rank order (the same bits on every rank), over the shared-memory
        rings: for the step's few numbers, a copy each way instead of a collective's round trips (1 ms on gloo).
        Each ring is first in, first out: this queues behind the transfers before it, and no receive may be left
        posted across it (none is between steps)."""
        what = "its part of the pipeline's all-reduce"
        if self.rank == 0:
            parts = [torch.empty_like(tensor) for _ in range(1, self.world_size)]
            works = [self.irecv(part, peer) for peer, part in enumerate(parts, 1)]
            for peer, (work, part) in enumerate(zip(works, parts, strict=True), 1):
                wait_or_raise(work, timeout=timeout, transport=self, peer=peer, what=what)
                tensor += part
            for peer in range(1, self.world_size):
                self.isend(tensor, peer)
        else:
            self.isend(tensor, 0)
            wait_or_raise(self.irecv(tensor, 0), timeout=timeout, transport=self, peer=0, what="the sum of " + what[4:])

    # --- failures --------------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """This rank failed with `reason`: record it (unless another rank's failure came first), then tear
        down this pipeline's communication on this rank so that no peer waits on it. Idempotent."""
        if self.aborted is not None:
            return
        self.aborted = reason
        store = default_store()
        if store is not None and self._group is not None:
            try:
                store.compare_set(self._failure_key, "", reason)
            except Exception:  # noqa: BLE001 - the store may be gone with a dead launcher; tear down anyway
                pass
        for work in list(self._works):
            work.release()
        if self.shared_memory is not None:
            self.shared_memory.close(reason)
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
        store = default_store()
        if store is None or self._group is None:
            return None
        try:
            if store.check([self._failure_key]):
                return store.get(self._failure_key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - no store, no record: the error names the neighbour only
            return None
        return None


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as its bytes, which every backend moves (whatever its dtype)."""
    return tensor if tensor.dtype is torch.uint8 else tensor.reshape(-1).view(torch.uint8)
