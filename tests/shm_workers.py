"""Shared-memory transport scenarios run on spawned gloo ranks (one host): sizes, order, full rings, failures."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from pipetrain.runtime.comm import wait_or_raise
from pipetrain.runtime.dist_transport import DistTransport
from pipetrain.runtime.shared_memory import INLINE_MAX, RING_BYTES

# (bytes, dtype): empty, odd, a page, the largest message the ring carries, the smallest a file of its own
# carries, a large one; every dtype as its bytes
MESSAGES = [(0, torch.float32), (3, torch.bool), (255, torch.uint8), (4096, torch.bfloat16), (INLINE_MAX, torch.uint8),
            (INLINE_MAX + 8, torch.float64), (3 * INLINE_MAX + 4, torch.float32), (17, torch.int64)]


def _message(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    count = n // dtype.itemsize
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.rand(count, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(count, generator=g).to(dtype)
    return torch.randint(0, 100, (count,), generator=g).to(dtype)


def sizes_order_and_wrapping(rank: int, world: int) -> dict:
    """Rank 0 sends every kind of message, then enough to wrap the ring several times, then more than the
    ring holds before rank 1 receives any of it; rank 1 posts its receives ahead and checks every byte."""
    transport = DistTransport()
    assert transport.shared_memory is not None
    wrap = [(100_000 + 16 * i, torch.float32) for i in range(4 * RING_BYTES // 100_000)]
    full = [(INLINE_MAX, torch.uint8)] * 8  # twice the ring, nothing received yet
    plan = MESSAGES + wrap
    checked = 0
    if rank == 0:
        for i, (n, dtype) in enumerate(plan + full):
            transport.isend(_message(n, dtype, i), 1)
        pending = len(transport.shared_memory.outgoing[1].pending)  # (sends the full ring holds back)
        reply = torch.empty(1, dtype=torch.int64)
        wait_or_raise(transport.irecv(reply, 1), timeout=60, transport=transport, peer=1, what="the reply")
        return {"pending_before_reply": pending, "checked": int(reply)}
    time.sleep(1.0)  # (rank 0 has filled the ring by now and waits with sends pending)
    bufs = [torch.empty(n // d.itemsize, dtype=d) for n, d in plan + full]
    works = [transport.irecv(b, 0) for b in bufs[:len(MESSAGES)]]  # posted ahead, then the rest as they come
    for i, (n, dtype) in enumerate(plan + full):
        if i >= len(MESSAGES):
            works.append(transport.irecv(bufs[i], 0))
        wait_or_raise(works[i], timeout=60, transport=transport, peer=0, what=f"message {i}")
        assert torch.equal(bufs[i], _message(n, dtype, i)), f"message {i} ({n} bytes, {dtype}) differs"
        checked += 1
    transport.isend(torch.tensor([checked]), 0)
    return {"checked": checked}


def all_reduce_in_rank_order(rank: int, world: int) -> list[float]:
    """Values whose float sum depends on the order: every rank must get the same bits, the rank-order sum."""
    transport = DistTransport()
    values = torch.tensor([1e16, 1.0, -1e16, 3.0], dtype=torch.float64)[rank:rank + 1].repeat(3).contiguous()
    values[1] = 0.1 * (rank + 1)
    return transport.all_reduce(values, 30).tolist()


def peer_closes(rank: int, world: int, how: str) -> dict:
    """Rank 1 stops (tears its links down, or its process ends) while rank 0 waits on it."""
    transport = DistTransport()
    dist.barrier()
    if rank == 1:
        time.sleep(0.5)
        if how == "exit":
            os._exit(0)
        transport.abort("rank 1 failed: RuntimeError: on purpose")
        time.sleep(5)
        return {}
    start = time.perf_counter()
    try:
        wait_or_raise(transport.irecv(torch.empty(4), 1), timeout=60, transport=transport, peer=1, what="a tensor")
    except Exception as err:  # noqa: BLE001 - what the test checks
        return {"error": str(err), "seconds": time.perf_counter() - start}
    return {"error": None}


def turned_off(rank: int, world: int) -> list:
    os.environ["PIPETRAIN_SHARED_MEMORY"] = "0"
    transport = DistTransport()
    return [transport.shared_memory is None, _zero_one_two(transport, rank)]


def _zero_one_two(transport: DistTransport, rank: int) -> list[float]:
    """Rank 0 sends [0, 1, 2] to rank 1: what each holds after (rank 0: zeros)."""
    received = torch.zeros(3)
    if rank == 0:
        transport.isend(torch.arange(3.0), 1).wait(30)
    else:
        transport.irecv(received, 0).wait(30)
    return received.tolist()


def no_room_on_rank_1(rank: int, world: int) -> list:
    """/dev/shm full on rank 1 (its reservations fail): every rank sends over gloo, and says so; then a pipeline
    whose rings exist but whose large message finds no room fails with the fix named."""
    import contextlib
    import errno
    from unittest import mock

    full = mock.patch("os.posix_fallocate", side_effect=OSError(errno.ENOSPC, "No space left on device"))
    with full if rank == 1 else contextlib.nullcontext():
        transport = DistTransport()
    received = _zero_one_two(transport, rank)
    rings = DistTransport()
    error = None
    if rank == 0:
        with full:
            try:
                rings.isend(torch.zeros(INLINE_MAX + 8, dtype=torch.uint8), 1)
            except Exception as err:  # noqa: BLE001 - what the test checks
                error = str(err)
    dist.barrier()
    return [transport.shared_memory is None, received, rings.shared_memory is not None, error]
