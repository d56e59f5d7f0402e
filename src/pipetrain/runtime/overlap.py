"""An overlapped pair's two lanes: a forward and a backward of one rank taking turns at their all-to-alls.

`Lanes.run(forward, backward)` runs the forward on the calling thread and the backward on the lanes' own
thread, one at a time (a baton), the backward first: a lane that has launched an all-to-all (`exchange`)
hands over and waits for it only when it gets the turn back, so the exchange is in flight while the other
lane computes (DualPipe's overlapped forward-backward chunks, in eager PyTorch). Every rank hands over at
the same points (its lanes run the same code on the same schedule), so the all-to-alls launch in one order
on every rank: no two ranks wait on each other's other collective (Megatron-LM#1810), and NCCL's
communicators see the same sequence everywhere. Each lane keeps its own random-number state across turns (a
forward's dropout draws what it would alone); after the pair the global state is the forward's, as if the
two had run one after the other. Outside a pair an exchange waits at once.

Every wait on another rank is bounded: an all-to-all by `timeout` (on NCCL by the process group's timeout, the
host not waiting for the device), so a lane waiting for its turn gets it back or learns the other lane failed.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from .comm import CommError, DistWork, bounded_wait

FORWARD, BACKWARD = 0, 1


class Lanes:
    """One rank's lanes (and the bounded wait of every all-to-all it makes). `stalls` collects, as
    (lane, start, end) in `time.perf_counter()` seconds, the waits on an all-to-all that nothing hid: the
    lane is FORWARD or BACKWARD inside a pair, None outside one."""

    def __init__(self, timeout: float, device: torch.device | None = None) -> None:
        self.timeout = float(timeout)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:  # (the lane thread sets it: it needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stalls: list[tuple[int | None, float, float]] = []
        self.paired = False  # whether pairs will run (each layer's experts then run in two pieces: `pause`)
        self._turn: int | None = None  # the lane that runs (None: no pair)
        self._live = [False, False]
        self._rng: list[tuple | None] = [None, None]
        self._failed: BaseException | None = None
        self._turns = threading.Condition()
        self._jobs: queue.SimpleQueue | None = None

    # --- inside a lane -------------------------------------------------------------------------------
    def exchange(self, launch: Callable[[], object], what: str) -> None:
        """Launch a collective (`launch() -> Work`, async), let the other lane run until it hands back, then wait
        for the collective (bounded), recording the time this lane stood still."""
        lane = self._turn
        if lane is not None and self._failed is not None:  # (no collective after the other lane failed)
            raise CommError(f"the {_NAMES[1 - lane]} lane of this overlapped pair failed") from self._failed
        start = time.perf_counter()
        work = launch()
        if lane is not None and self._live[1 - lane]:
            self.stalls.append((lane, start, time.perf_counter()))  # (the launch)
            self._hand_over(lane)
            start = time.perf_counter()
        if self.device.type == "cuda":  # the compute stream waits for NCCL's; the host goes on (NCCL's watchdog
            work.wait()  # bounds the collective by the process group's timeout)
        else:
            me = f"global rank {dist.get_rank()}" if dist.is_initialized() else "this rank"
            bounded_wait(DistWork(work), self.timeout, me=me, them="its peers in the collective", what=what)
        self.stalls.append((lane, start, time.perf_counter()))

    def pause(self) -> None:
        """Inside a pair's lane, give the other lane a turn without a collective of one's own (a point that
        evens out the two lanes' turns: a backward has fewer all-to-alls than its forward); else nothing."""
        lane = self._turn
        if lane is not None and self._live[1 - lane]:
            self._hand_over(lane)

    def _hand_over(self, lane: int) -> None:
        """Give the turn to the other lane, if it is still running, and wait to get it back."""
        with self._turns:
            other = 1 - lane
            if not self._live[other]:
                return
            self._rng[lane] = _rng_state(self.device)
            self._turn = other
            self._turns.notify_all()
            self._await(lane)
        _set_rng_state(self._rng[lane], self.device)

    def _await(self, lane: int) -> None:
        """(holding the condition) Wait for `lane`'s turn (the other lane computes, or waits a bounded time);
        raise if the other lane failed."""
        self._turns.wait_for(lambda: self._turn == lane or self._failed is not None)
        if self._failed is not None:  # the other lane failed: this one stops too (its peers are told by the step)
            raise CommError(f"the {_NAMES[1 - lane]} lane of this overlapped pair failed") from self._failed

    # --- the pair ------------------------------------------------------------------------------------
    def run(self, forward: Callable[[], object], backward: Callable[[], object]) -> tuple[object, object]:
        """Run an overlapped pair: `forward()` here and `backward()` on the lanes' thread, the backward first;
        return both results, or raise the first lane's error.

        The backward starts so the turns fall well: per MoE layer a forward hands over after its counts, its
        dispatch and its combine, a backward after its combine's backward, halfway through its experts'
        backward (`pause`: the experts run in two pieces under pairs) and after its dispatch's backward; started
        so, each lane's all-to-all is in flight while the other runs its attention or (half) its experts."""
        if self._turn is not None:
            raise RuntimeError("an overlapped pair is already running on this rank")
        results: list[object] = [None, None]
        done = threading.Event()
        start_state = _rng_state(self.device)
        self._rng = [start_state, start_state]
        self._live, self._failed = [True, True], None
        self._turn = BACKWARD
        self._lane_thread().put((backward, results, done))
        try:
            self._lane(FORWARD, forward, results)
            done.wait()  # (its waits on other ranks are bounded)
        finally:
            forward_state = self._rng[FORWARD]
            with self._turns:
                self._turn = None
        _set_rng_state(forward_state, self.device)
        if self._failed is not None:
            raise self._failed
        return results[FORWARD], results[BACKWARD]

    def _lane(self, lane: int, work: Callable[[], object], results: list) -> None:
        try:
            with self._turns:
                self._await(lane)
            if lane == BACKWARD and self.device.type == "cuda":  # (the lane thread's own current device)
                torch.cuda.set_device(self.device)
            _set_rng_state(self._rng[lane], self.device)
            results[lane] = work()
            self._rng[lane] = _rng_state(self.device)
        except BaseException as err:
            with self._turns:
                self._failed = self._failed or err
        finally:
            with self._turns:
                self._live[lane] = False
                self._turn = 1 - lane if self._live[1 - lane] else lane
                self._turns.notify_all()

    def _lane_thread(self) -> queue.SimpleQueue:
        """The backward lane's thread, started at the first pair; it ends when these lanes are collected."""
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(self._jobs, weakref.ref(self)), name="pipetrain-backward-lane",
                             daemon=True).start()
            # (not at interpreter exit: a daemon thread woken while Python finalizes can abort the process)
            weakref.finalize(self, self._jobs.put, None).atexit = False
        return self._jobs


def _serve(jobs: queue.SimpleQueue, lanes: weakref.ref) -> None:
    """Run backward lanes until the Lanes object is gone (a None job)."""
    while (job := jobs.get()) is not None:
        backward, results, done = job
        try:
            lanes()._lane(BACKWARD, backward, results)
        finally:
            done.set()


_NAMES = ("forward", "backward")


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
