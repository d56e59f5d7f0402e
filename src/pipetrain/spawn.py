"""Run a function on N local gloo ranks (spawned processes) and collect what each returns: for tests,
benchmarks and quick experiments without torchrun.

Ranks are forked from a forkserver that has imported torch once (and pipetrain, the module of the function,
and transformers if the caller has imported it): a call starts its ranks in about 0.2 s, where each rank
importing torch afresh took 2-3 s on a small machine. Each rank gets the caller's environment variables as
they are at the call (as a spawned process would), though what torch read from them when the server
imported it stays (e.g. OMP_NUM_THREADS; the rank's thread count is set by `threads=`). Where there is no
forkserver (not POSIX), ranks are spawned.
"""

from __future__ import annotations

import gc
import io
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_main(rank, world, port, threads, fn, args, queue, environ):
    os.environ.clear()
    os.environ.update(environ)
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
    ctx = _context(fn)
    results_queue = ctx.Queue()
    port = _free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_process_main, args=(r, world, port, threads, fn, args, results_queue, environ))
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


def _context(fn):
    """The forkserver context, its server told (before its first start) to import torch and what `fn` needs."""
    import torch.multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    preload = ["torch", "torch.distributed", "pipetrain", "pipetrain.spawn"]
    if fn.__module__ not in ("__main__", "__mp_main__"):  # (the main script is run again in each rank, as spawn does)
        preload.append(fn.__module__)
    if "transformers" in sys.modules:
        preload.append("transformers")
    ctx.set_forkserver_preload(preload)  # (no effect once the server runs: it keeps what it imported)
    return ctx
