"""What every transport shares: the request and transport protocols, DistWork, and the one bounded wait, with
how ranks name each other and fail together."""

from __future__ import annotations

import time
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
    """A torch.distributed request. `release()` drops it (the pipeline's communication was torn down): a
    request still referenced would keep its process group, and so its connections, alive."""

    def __init__(self, work, transport=None) -> None:  # (a DistTransport, whose backend and failures it reads)
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


def default_store():
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


def posting_failed(transport: Transport, peer: int, what: str, err: BaseException, doing: object = "") -> CommError:
    """A transfer with `peer` that could not even be posted (a closed connection), in `bounded_wait`'s words."""
    them = rank_name(transport, peer)
    return CommError(led_by_first_failure(
        transport, f"{rank_name(transport, transport.rank)}: {str(doing) + ' ' if doing else ''}waiting on {them} to "
                   f"{what} it failed after 0.0s: {err}. {them[0].upper() + them[1:]} may have crashed or be stuck; "
                   "check its log"))


def bounded_wait(work: Work, timeout: float, *, me: str, them: str, what: str, doing: object = "") -> None:
    """The one bounded wait: wait for `work` at most `timeout` seconds; if it fails or times out, raise
    CommError "{me}: {doing} waiting on {them} for {what} timed out after 3s: ..." ("failed after 0.4s" when a
    closed connection ended it sooner), naming who waited, on whom, for what, and what to check (`doing`:
    anything that prints as what the rank was doing, e.g. an Action, formatted only on failure)."""
    start = time.perf_counter()
    try:
        work.wait(timeout)
    except Exception as err:  # gloo raises RuntimeError, in-process TimeoutError
        waited = time.perf_counter() - start
        how = f"timed out after {timeout:g}s" if waited >= 0.99 * timeout else f"failed after {waited:.1f}s"
        logs = "their logs" if them.startswith("the ") else "its log"
        raise CommError(f"{me}: {str(doing) + ' ' if doing else ''}waiting on {them} for {what} {how}: {err}. "
                        f"{them[0].upper() + them[1:]} may have crashed or be stuck; check {logs}") from err


def wait_replicas(work, timeout: float, what: str) -> None:
    """A collective over the replicas, bounded (`bounded_wait`)."""
    bounded_wait(DistWork(work), timeout, me=f"global rank {dist.get_rank()}", them="the other replicas", what=what)


def wait_or_raise(work: Work, *, timeout: float, transport: Transport, peer: int | None, what: str,
                  doing: object = "") -> None:
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
