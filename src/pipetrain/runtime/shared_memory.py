"""Point-to-point transfers between the pipeline's ranks on one host through shared memory, not sockets.

Each direction of each rank pair has a byte ring in a shared mapping (under /dev/shm, unlinked once both ends
have it open) and a pipe (a FIFO) that wakes the receiver when it sleeps. A send copies the tensor's bytes into
the ring and publishes them by advancing the ring's `written` count: it is complete at once, so sends never
wait for the receiver (the first-in first-out model `schedule.check` proves deadlock-free). A receive is
matched, in order, to the next message of its direction, and copied out once its bytes are published. A
message larger than a quarter of the ring travels in a file of its own, which the sender reuses once the
receiver copied it out (the ring carries its number), so the ring never has to drain for a send to go.
Receivers spin for a few microseconds, then sleep on the pipe; a peer that closes its end (it failed, or its
process ended) ends every wait on it at once.

This replaces gloo's TCP loopback for the pipeline's own transfers when every rank of the pipeline is on one
host (x86-64 Linux: its stores are seen in program order, which the rings rely on); collectives stay on
torch.distributed. `PIPETRAIN_SHARED_MEMORY=0` turns it off.
"""

from __future__ import annotations

import glob
import mmap
import os
import platform
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

RING_BYTES = 4 << 20  # data bytes per direction
INLINE_MAX = RING_BYTES // 4  # larger messages travel in a file of their own
RECORD = struct.Struct("qq")  # a message's header in the ring: its bytes, its file's number (-1: in the ring)
ALIGN = 16
CONTROL = 192  # the ring's counters, each on a cache line: written (byte 0), read (64), the receiver sleeps (128)
WRITTEN, READ, SLEEPING = 0, 8, 16  # their indices as int64
SPIN_S = 2e-3  # how long a receiver polls before it sleeps on the pipe (when the host has a core per rank)
FAILURE_POLL = 0.5  # seconds between looks for a failure another rank recorded
ENV = "PIPETRAIN_SHARED_MEMORY"


def host_key() -> tuple[str, str, int] | None:
    """Who shares this process's /dev/shm (host, boot, the mount), or None where the rings cannot run here or
    `PIPETRAIN_SHARED_MEMORY=0` turns them off."""
    if os.environ.get(ENV, "1") == "0" or sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return socket.gethostname(), boot, os.stat("/dev/shm").st_dev
    except OSError:
        return None


_FENCE = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a locked instruction: the lock's atomic exchange): the stores before it are seen
    by every core before the loads after it. The receiver's "I sleep" and the sender's "written" each pass one
    before reading the other's, so a message never arrives unnoticed while its receiver sleeps."""
    _FENCE.acquire()
    _FENCE.release()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes, in place (numpy's views: a microsecond; torch's for dtypes numpy lacks)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("shared-memory transfers take contiguous CPU tensors")
    try:
        return tensor.numpy().reshape(-1).view(np.uint8)
    except (TypeError, RuntimeError):  # (bfloat16; a tensor that requires grad)
        return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def _mapped(path: str, size: int | None) -> mmap.mmap:
    """A shared mapping of the file at `path`: made with `size` bytes, its space reserved now (a full /dev/shm
    fails here, with OSError, not later with SIGBUS when a page is first touched), or (None) opened as it is."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0), 0o600)
    try:
        if size is not None:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.unlink(path)
                raise
        return mmap.mmap(fd, size if size is not None else os.fstat(fd).st_size)
    finally:
        os.close(fd)


class _Ring:
    """One direction's mapping: the two counters, then `RING_BYTES` of data (a numpy view of them)."""

    def __init__(self, path: str, *, create: bool) -> None:
        self.map = _mapped(path, CONTROL + RING_BYTES if create else None)
        self.counters = memoryview(self.map).cast("q")
        self.bytes = np.frombuffer(self.map, dtype=np.uint8, offset=CONTROL, count=RING_BYTES)

    def put(self, at: int, raw: np.ndarray) -> None:
        """Copy `raw` in from byte `at` of the stream, wrapping at the end (numpy's copies: a small message's
        microseconds are the library's calls, not its bytes)."""
        pos, n = at % RING_BYTES, raw.size
        first = min(n, RING_BYTES - pos)
        self.bytes[pos:pos + first] = raw[:first]
        if n > first:
            self.bytes[:n - first] = raw[first:]

    def get(self, at: int, raw: np.ndarray) -> None:
        pos, n = at % RING_BYTES, raw.size
        first = min(n, RING_BYTES - pos)
        raw[:first] = self.bytes[pos:pos + first]
        if n > first:
            raw[first:] = self.bytes[:n - first]


class _Segment:
    """A file of its own for messages too large for the ring, reused: `busy` (int64 at byte 0) is set by the
    sender while it holds a message and cleared by the receiver once it copied it out; data from byte 64."""

    def __init__(self, path: str, capacity: int | None) -> None:
        try:
            self.map = _mapped(path, 64 + capacity if capacity is not None else None)
        except OSError as err:
            raise RuntimeError(f"no room in /dev/shm for a {capacity} byte message ({err}): give it more (e.g. docker "
                               "--shm-size) or set PIPETRAIN_SHARED_MEMORY=0 to send over gloo") from err
        self.capacity = len(self.map) - 64
        self.busy = memoryview(self.map).cast("q")
        self.bytes = np.frombuffer(self.map, dtype=np.uint8, offset=64, count=self.capacity)


class ShmWork:
    """A send or receive on a ring. `wait` drives the rings (a full ring's sends; this receive's copy) and fails
    once this rank's links are closed (`SharedMemoryLinks.close`)."""

    def __init__(self, links: SharedMemoryLinks, peer: int, tensor: np.ndarray, *, receive: bool) -> None:
        self._links = links
        self.peer, self.receive = peer, receive
        self.tensor = tensor  # what is still to be sent, or the receive's bytes
        self.done = False

    def is_completed(self) -> bool:
        links = self._links
        if links.closed is not None:
            return True  # (dropped: nothing will move it)
        if not self.done:
            links.progress(self.peer)
        return self.done

    def wait(self, timeout: float) -> None:
        self._links.wait(self, timeout)


class _Out:
    """This rank's sending end of one direction."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ring = _Ring(base, create=False)
        self.fifo = os.open(base + ".fifo", os.O_WRONLY | os.O_NONBLOCK)
        self.written = self.ring.counters[WRITTEN]
        self.segments: list[_Segment] = []  # (numbered by position)
        self.pending: deque[ShmWork] = deque()  # sends that found the ring full, in order

    def push(self) -> None:
        """Publish the pending sends that fit, in order; wake the receiver if any did and it sleeps."""
        sent = False
        while self.pending and self._try(self.pending[0]):
            work = self.pending.popleft()
            work.done, work.tensor, sent = True, None, True
        if sent:
            _fence()
            if not self.ring.counters[SLEEPING]:
                return
            try:
                os.write(self.fifo, b"\0")
            except BlockingIOError:  # (the pipe is full of wake-ups the receiver has not read: it will look)
                pass

    def _try(self, work: ShmWork) -> bool:
        src = work.tensor
        n = src.size
        spill = n > INLINE_MAX
        need = RECORD.size + (0 if spill else _aligned(n))
        if RING_BYTES - (self.written - self.ring.counters[READ]) < need:
            return False
        number = -1
        if spill:
            number = self._segment(n)
            segment = self.segments[number]
            segment.bytes[:n] = src
            segment.busy[0] = 1
        else:
            self.ring.put(self.written + RECORD.size, src)
        pos = CONTROL + self.written % RING_BYTES
        RECORD.pack_into(self.ring.map, pos, n, number)
        self.written += need
        self.ring.counters[WRITTEN] = self.written  # (x86-64: seen after the bytes above)
        return True

    def _segment(self, n: int) -> int:
        """The number of a free segment of at least `n` bytes (the smallest), made if there is none."""
        free = [(s.capacity, i) for i, s in enumerate(self.segments) if not s.busy[0] and s.capacity >= n]
        if free:
            return min(free)[1]
        capacity = -(-n // INLINE_MAX) * INLINE_MAX
        self.segments.append(_Segment(f"{self.base}.{len(self.segments)}", capacity))
        return len(self.segments) - 1


class _In:
    """This rank's receiving end of one direction."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ring = _Ring(base, create=True)
        os.mkfifo(base + ".fifo", 0o600)
        self.fifo = os.open(base + ".fifo", os.O_RDONLY | os.O_NONBLOCK)
        self.read = 0
        self.posted: deque[ShmWork] = deque()
        self.segments: dict[int, _Segment] = {}

    def pull(self) -> None:
        """Copy out every published message that has a receive posted, in order."""
        counters = self.ring.counters
        while self.posted and counters[WRITTEN] - self.read >= RECORD.size:
            n, number = RECORD.unpack_from(self.ring.map, CONTROL + self.read % RING_BYTES)
            work = self.posted[0]
            dst = work.tensor
            if dst.size != n:
                raise RuntimeError(f"a receive of {dst.size} bytes met a message of {n} bytes: the two ranks "
                                   "disagree on what crosses between them")
            if number < 0:
                self.ring.get(self.read + RECORD.size, dst)
                self.read += RECORD.size + _aligned(n)
            else:
                segment = self.segments.get(number)
                if segment is None:  # (its first message: map it, and drop its name)
                    path = f"{self.base}.{number}"
                    segment = self.segments[number] = _Segment(path, None)
                    os.unlink(path)
                dst[:] = segment.bytes[:n]
                segment.busy[0] = 0
                self.read += RECORD.size
            counters[READ] = self.read
            self.posted.popleft()
            work.done, work.tensor = True, None

    def sleep(self, timeout: float) -> bool:
        """Sleep on the pipe until a sender wakes this end, at most `timeout` s, unless a message is already
        published; False if the sender closed its end."""
        counters = self.ring.counters
        counters[SLEEPING] = 1
        _fence()
        try:
            if counters[WRITTEN] - self.read >= RECORD.size:
                return True
            ready, _, _ = select.select([self.fifo], [], [], timeout)
            return self.drain() if ready else True
        finally:
            counters[SLEEPING] = 0

    def drain(self) -> bool:
        """Read the pipe's wake-ups; False if the sender closed its end."""
        try:
            return bool(os.read(self.fifo, 65536))
        except BlockingIOError:
            return True


class Unavailable(RuntimeError):
    """Some rank could not make its rings (no room in /dev/shm, ...): the pipeline sends over gloo instead."""


class SharedMemoryLinks:
    """One rank's rings to and from every other rank of its pipeline (see the module's docstring), made
    collectively: `agree(ok)` is True when every rank's `ok` is (a barrier too); `first_failure` says what
    another rank recorded (polled while waiting). Unavailable (on every rank alike) if a rank could not make
    its rings."""

    def __init__(self, rank: int, world_size: int, prefix: str, agree: Callable[[bool], bool],
                 first_failure: Callable[[], str | None]) -> None:
        self.rank = rank
        self.prefix = prefix
        self.spin = SPIN_S if world_size <= len(os.sched_getaffinity(0)) else 0.0  # (no core to spare: sleep)
        self.first_failure = first_failure
        self.closed: str | None = None
        peers = [p for p in range(world_size) if p != rank]
        self.incoming, self.outgoing, why = {}, {}, ""
        try:
            for p in peers:
                self.incoming[p] = _In(f"{prefix}-{p}-{rank}")
        except OSError as err:
            why = str(err)
        if not agree(not why):  # every ring and pipe exists and its reader has the pipe open
            self._remove_names()
            self.close("shared memory unavailable")
            raise Unavailable(why or "another rank could not make its rings")
        self.outgoing = {p: _Out(f"{prefix}-{rank}-{p}") for p in peers}
        agree(True)  # every end is open: the names can go
        self._remove_names()

    def _remove_names(self) -> None:
        for link in self.incoming.values():
            for path in (link.base, link.base + ".fifo"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    # --- posting -----------------------------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor, peer: int) -> ShmWork:
        self._refuse_if_closed()
        out = self.outgoing[peer]
        work = ShmWork(self, peer, _as_bytes(tensor), receive=False)
        out.pending.append(work)
        self._push(peer, out)
        return work

    def irecv(self, tensor: torch.Tensor, peer: int) -> ShmWork:
        self._refuse_if_closed()
        link = self.incoming[peer]
        work = ShmWork(self, peer, _as_bytes(tensor), receive=True)
        link.posted.append(work)
        link.pull()
        return work

    # --- progress and waiting -----------------------------------------------------------------------------
    def progress(self, peer: int) -> None:
        """Move what can move: every direction's sends that found a full ring, and `peer`'s messages in."""
        self._refuse_if_closed()
        for other, out in self.outgoing.items():
            if out.pending:
                self._push(other, out)
        self.incoming[peer].pull()

    @staticmethod
    def _push(peer: int, out: _Out) -> None:
        try:
            out.push()
        except BrokenPipeError as err:
            raise RuntimeError(_closed_by(peer)) from err

    def wait(self, work: ShmWork, timeout: float) -> None:
        start = time.perf_counter()
        checked = start
        link = self.incoming[work.peer]
        while not work.done:
            self.progress(work.peer)  # (raises once this rank's links are closed)
            if work.done:
                return
            now = time.perf_counter()
            if now - start >= timeout:
                raise TimeoutError(f"timed out after {timeout:g}s")
            if now - checked >= FAILURE_POLL:
                checked = now
                failure = self.first_failure()
                if failure is not None:
                    raise RuntimeError(failure)
            if now - start < self.spin:
                continue
            if not work.receive:  # a send waiting for room in the ring: the receiver frees it as it copies out
                time.sleep(min(1e-3, 10 * (now - start)))
                continue
            if not link.sleep(min(FAILURE_POLL, timeout - (now - start))):
                link.pull()  # (what it published before closing still counts)
                if not work.done:
                    raise RuntimeError(_closed_by(work.peer))

    # --- teardown -----------------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Close every pipe end (a peer waiting on this rank fails at once) and drop what is in flight."""
        if self.closed is not None:
            return
        self.closed = reason
        for link in [*self.incoming.values(), *self.outgoing.values()]:
            try:
                os.close(link.fifo)
            except OSError:
                pass
        for link in self.incoming.values():
            for path in glob.glob(glob.escape(link.base) + ".*"):  # (files of messages never received)
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _refuse_if_closed(self) -> None:
        if self.closed is not None:
            raise RuntimeError(f"the pipeline's communication was torn down ({self.closed})")


def _closed_by(peer: int) -> str:
    return f"rank {peer} closed its shared-memory link (it stopped, or its process ended)"
