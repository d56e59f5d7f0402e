"""Run a function on N local gloo ranks (spawned processes) and collect what each returns: for tests,
benchmarks and quick experiments without torchrun."""

from __future__ import annotations

import gc
import io
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_main(rank, world, port, threads, fn, args, queue):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        # results go back as bytes: torch's queue would share memory owned by this (exiting) process
        buffer = io.BytesIO()
        torch.save(fn(rank, world, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - sent to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        gc.collect()  # what fn built (pipelines in reference cycles) goes before the process group
        dist.destroy_process_group()


def run_processes(world: int, fn, *args, timeout: float = 180, expect: int | None = None,
                  threads: int = 1) -> dict[int, object]:
    """Spawn `world` gloo ranks running `fn(rank, world, *args)` (fn must be importable, i.e. defined at
    module level); return {rank: result} once `expect` ranks (default all) reported. A rank's exception is
    re-raised here with its traceback; ranks still running after that are killed."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_process_main, args=(r, world, port, threads, fn, args, results_queue))
             for r in range(world)]
    for p in procs:
        p.start()
    wanted = world if expect is None else expect
    results, deadline = {}, time.time() + timeout
    try:
        while len(results) < wanted and time.time() < deadline:
            try:
                rank, status, value = results_queue.get(timeout=1)
            except queue_module.Empty:
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        some_ranks_die = wanted < world  # the rest are dead or deliberately hung
        for p in procs:
            p.join(2 if some_ranks_die or not results else 20)
            if p.is_alive():
                p.kill()
    if len(results) < wanted:
        raise TimeoutError(f"only ranks {sorted(results)} reported within {timeout}s")
    return results
