"""Sharded data parallelism: peak memory per rank and steps/s of dp 2 x pp 2, unsharded against ZeRO-1
(`shard="optimizer"`), ZeRO-2 (`shard="gradients"`) and ZeRO-3 (`shard="params"`), side by side in one run,
and how much of the gradient reduction stays exposed.

    python benchmarks/zero.py                     # a GPT of 8 blocks x 512 (25 M parameters), 6 steps each
    python benchmarks/zero.py --layers 4 --d-model 256 --steps 4 --json
    python benchmarks/zero.py --tp 2 --layers 4 --d-model 256 --steps 4   # dp 2 x pp 2 x tp 2: 8 ranks

Each mode runs in fresh spawned gloo processes (4 ranks, 1 thread each) through `pt.Trainer` with AdamW.
Per rank: the optimizer state's bytes, the resident memory before the model was built and at its peak
(ru_maxrss, so it includes torch itself: the difference is what training added; malloc is set to return
freed blocks of 1 MiB and more, so the peak is of live memory) and between steps (after the last optimizer
step, where ZeRO-3 holds only its shards), and the median step time after the first step (which creates
the optimizer state). All modes must give the same losses.

Planner: the peak the planner's memory model predicts for the first stage's rank (`predicted_memory`, gloo,
fp32), next to what was measured of the same: the weights and optimizer state live when the last step
began, plus the most that the tensors allocated during that step held at once (torch.profiler's allocation
events): what a GPU's allocator reports as max_memory_allocated, less the training data (on a GPU it stays
on the host). Resident memory is not the measure: malloc keeps freed blocks of under
1 MiB (activations at these sizes) and the arenas of other threads, and it grew ~4 MiB a step here with
constant live tensors (malloc_trim gave it back).

Exposed reduction: the median over steps of the time the step waited on its stages' reductions after their
REDUCE actions launched them (`pipe.last_step.waits`), next to the time the same collectives take alone
(each stage's all-reduce or reduce-scatter, blocking, on the same ranks after training).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipetrain as pt  # noqa: E402
from pipetrain.planner.plan import predicted_memory  # noqa: E402
from pipetrain.planner.specs import ModelSpec  # noqa: E402
from pipetrain.runtime.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD  # noqa: E402
from pipetrain.runtime.tensor_parallel import local  # noqa: E402
from pipetrain.spawn import run_processes  # noqa: E402

MODES = ("none", "optimizer", "gradients", "params")


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _track_live_memory() -> None:
    """Make resident memory follow live tensors: pipetrain's CPU stages keep freed memory mapped (fast,
    but then the peak RSS counts every buffer ever freed); here blocks of 1 MiB and more get pages of their
    own, returned when freed."""
    os.environ["PIPETRAIN_KEEP_FREED_MEMORY"] = "0"
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)


def _unique_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storage = local(t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _live_peak(step, model_bytes: int) -> int:
    """`model_bytes` (weights and optimizer state, live when `step()` begins) plus the most the tensors
    allocated during `step()` held at once: the allocator's events in torch.profiler's memory profile."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    held = most = 0
    for event in events:  # (frees are negative sizes)
        held += event.extra_fields.alloc_size
        most = max(most, held)
    return model_bytes + most


def zero_rank(rank: int, world: int, settings: dict) -> dict:
    torch.set_num_threads(1)
    _track_live_memory()
    before = _rss()
    trainer = pt.trainer_from_config(pt.TrainConfig.from_dict(settings))
    built = _rss_now()  # (torch, the data, the model's weights: before any step)
    pipe = trainer.pipe
    params = sum(local(p).numel() for p in pipe.parameters())  # (before the first step: ZeRO-3 releases them)
    sizes = [sum(local(p).numel() for p in stage.module.parameters() if p.requires_grad)  # (tp: this rank's part)
             for stage in pipe.stages.values()]
    times, losses, exposed = [], [], []
    for _ in range(settings["steps"] - 1):
        start = time.perf_counter()
        record = trainer.train_step()
        times.append(time.perf_counter() - start)
        losses.append(record["loss"])
        exposed.append(sum(w.duration for w in pipe.last_step.waits if w.action.op is pt.Op.REDUCE))
    optimizer = trainer.optimizer
    model_bytes = _unique_bytes([*pipe.parameters(), *(p for g in optimizer.param_groups for p in g["params"]),
                                 *(v for s in optimizer.state.values() for v in s.values())])
    records = []
    live_peak = _live_peak(lambda: records.append(trainer.train_step()), model_bytes)  # (the last step, profiled)
    losses.append(records[0]["loss"])
    state = sum(local(v).numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim())
    info = trainer.model_info
    return {"model": {k: info[k] for k in ("n_layers", "d_model", "n_heads", "vocab_size", "seq_len")},
            "stages_per_rank": pipe.schedule.stages_per_rank,
            "losses": losses, "step_time": statistics.median(times[1:]),
            "state_bytes": state,
            "rss_before": before, "rss_built": built, "rss_peak": _rss(),
            "rss_between": _rss_now(), "params": params, "live_peak": live_peak,
            "exposed": statistics.median(exposed[1:]), "alone": _reductions_alone(pipe, sizes, settings["shard"])}


def _reductions_alone(pipe: pt.Pipeline, sizes: list[int], shard: str) -> float:
    """The time this rank's stages' gradient reductions take alone: one blocking collective per stage, of
    the stage's size, the kind its shard mode runs (median of 3)."""
    import torch.distributed as dist

    group, dp = pipe.dp_group, pipe.dp_size
    buffers = [torch.zeros(-(-n // dp) * dp) for n in sizes]
    runs = []
    for _ in range(3):
        dist.barrier(group=group)
        start = time.perf_counter()
        for flat in buffers:
            if shard in ("none", "optimizer"):
                dist.all_reduce(flat, group=group)
            else:
                scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
                scatter(flat[:flat.numel() // dp], flat, group=group)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def measure(layers: int = 8, d_model: int = 512, steps: int = 6, batch_size: int = 8, microbatches: int = 4,
            schedule: str = "1f1b", tp: int = 1, sequence_parallel: bool = False, seq_len: int = 64) -> dict:
    base = {"preset": "small", "layers": layers, "d_model": d_model, "heads": 8, "seq_len": seq_len, "dp": 2, "tp": tp,
            "sequence_parallel": sequence_parallel,
            "batch_size": batch_size, "microbatches": microbatches, "schedule": schedule, "steps": steps,
            "eval_batches": 1, "log_every": 1000, "progress": False, "warmup": 1, "timeout": 600}
    rows = {}
    for mode in MODES:
        out = run_processes(4 * tp, zero_rank, {**base, "shard": mode}, timeout=3600)
        rows[mode] = [out[r] for r in range(4 * tp)]
    model = rows["none"][0]["model"]
    spec = ModelSpec("benchmark", model["n_layers"], model["d_model"], model["n_heads"], 4 * model["d_model"],
                     model["vocab_size"], model["seq_len"], gated_mlp=False, global_batch=batch_size)
    predicted = {mode: predicted_memory(spec, pp=2, dp=2, microbatch_size=batch_size // (2 * microbatches),
                                        microbatches=microbatches, schedule=schedule, shard=mode, precision="fp32",
                                        backend="gloo", stages_per_rank=rows["none"][0]["stages_per_rank"],
                                        tp=tp, sequence_parallel=sequence_parallel).peak
                 for mode in MODES}
    same = all(max(abs(a - b) for a, b in zip(rows[m][0]["losses"], rows["none"][0]["losses"], strict=True))
               < 1e-4 for m in MODES)
    return {"model": f"gpt {layers} x {d_model}", "settings": base, "same_losses": same,
            "planner_MiB": {mode: {"predicted": predicted[mode] / 2**20,
                                   "measured": rows[mode][0]["live_peak"] / 2**20} for mode in MODES}, "ranks": {
        mode: [{"state_MiB": r["state_bytes"] / 2**20, "rss_before_MiB": r["rss_before"] / 2**20,
                "rss_peak_MiB": r["rss_peak"] / 2**20, "rss_between_steps_MiB": r["rss_between"] / 2**20,
                "rss_built_MiB": r["rss_built"] / 2**20, "live_peak_MiB": r["live_peak"] / 2**20,
                "added_MiB": (r["rss_peak"] - r["rss_before"]) / 2**20,
                "params_M": r["params"] / 1e6, "steps_per_s": 1 / r["step_time"],
                "reduce_exposed_ms": 1e3 * r["exposed"], "reduce_alone_ms": 1e3 * r["alone"]} for r in rs]
        for mode, rs in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage (dp 2 x pp 2 x tp: 4 x tp ranks)")
    p.add_argument("--sequence-parallel", action="store_true", help="with --tp: activations split by sequence")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (activations grow with it)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = measure(args.layers, args.d_model, args.steps, schedule=args.schedule, tp=args.tp,
                     sequence_parallel=args.sequence_parallel, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    layout = f"dp 2 x pp 2 x tp {args.tp}" if args.tp > 1 else "dp 2 x pp 2"
    layout += " with sequence parallelism" if args.sequence_parallel else ""
    print(f"{result['model']}, {layout} ({args.schedule}), {4 * args.tp} gloo ranks; same losses: "
          f"{result['same_losses']}")
    print(f"{'shard':<10} {'rank':>4} {'params M':>9} {'opt state MiB':>14} {'peak RSS MiB':>13} "
          f"{'added MiB':>10} {'between steps':>14} {'steps/s':>8} {'reduce exposed / alone ms':>26}")
    for mode, rs in result["ranks"].items():
        for rank, r in enumerate(rs):
            print(f"{mode:<10} {rank:>4} {r['params_M']:>9.2f} {r['state_MiB']:>14.1f} {r['rss_peak_MiB']:>13.0f} "
                  f"{r['added_MiB']:>10.0f} {r['rss_between_steps_MiB']:>14.0f} {r['steps_per_s']:>8.3f} "
                  f"{r['reduce_exposed_ms']:>13.1f} / {r['reduce_alone_ms']:<10.1f}")
    print("\nthe planner's memory model, rank 0 (predicted; measured: weights + optimizer state + the most the "
          "last step's tensors held at once):")
    for mode, both in result["planner_MiB"].items():
        print(f"{mode:<10} predicted {both['predicted']:6.1f} MiB, measured {both['measured']:6.1f} MiB "
              f"({both['predicted'] / both['measured'] - 1:+.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
