"""Vocabulary parallelism against whole-layer splits, torch.distributed.pipelining and one process, in one run.

    python benchmarks/vocabulary.py                        # gpt-8x256-v32k and a 128k vocabulary, 2 ranks, M 8
    python benchmarks/vocabulary.py --vocab 32768 --rounds 5 --json

On 2 gloo ranks (one thread each) the reference GPT (8 blocks, d 256, sequence 128, a batch of 32 in `--microbatches`
microbatches) with a heavy vocabulary trains step by step, the contenders taking turns in the same processes
(A B C, C B A, ...): pipetrain with `vocab_parallel=True` on 1F1B, ZBV and DualPipeV; pipetrain and torch's
Schedule1F1B / ScheduleZBVZeroBubble splitting whole layers (each on the split of the layers' measured times
that simulates fastest, as benchmarks/run.py gives both libraries); and, on rank 0 while rank 1 waits, the same
model in one process on one thread (the same microbatches accumulated). A contender's step is the slower rank's.

Reported per vocabulary: each contender's median step, pipetrain vocabulary parallel's best against one process
and against torch's best; its efficiency (busy time over step time, mean over ranks, from the step's own
timeline); and the peak resident memory of each rank of the best vocabulary-parallel and whole-layer pipetrain
runs, each measured in fresh processes (2 steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `ranks` is imported by the spawned ranks too

import ranks  # noqa: E402

from pipetrain.spawn import run_processes  # noqa: E402

VOCAB_SCHEDULES = ("1f1b", "zbv", "dualpipev")
WHOLE_SCHEDULES = ("1f1b", "zbv")  # (pipetrain's and torch's: the two fastest of benchmarks/run.py here)


def _model(settings: dict) -> dict:
    return dict(vocab_size=settings["vocab"], seq_len=128, d_model=settings["width"], n_layers=settings["layers"],
                n_heads=8)


def _vocabulary_runner(cfg, name: str, world: int, m: int, x, y, costs):
    """pipetrain with vocab_parallel=True on the split of the measured times without the head's projection (it
    runs on every rank)."""
    import pipetrain as pt
    from pipetrain import models
    from pipetrain.models.gpt import gpt_loss

    trunk = [*costs[:-1], (0.0, 0.0, 0.0)]  # (the head's norm: next to nothing)
    plan = ranks.planned(trunk, name, world, m)
    pipe = pt.Pipeline(models.build(cfg), schedule=name, num_microbatches=m, loss_fn=gpt_loss,
                       balance=list(plan.balance), vocab_parallel=True)

    def step() -> None:
        pipe.step(x, y)
        for p in pipe.parameters():
            p.grad = None

    return step, pipe


def _runners(rank: int, world: int, settings: dict, cfg, x, y, costs) -> tuple[dict, dict]:
    import torch

    m = settings["microbatches"]
    runners, pipes = {}, {}
    for name in settings["vocab_schedules"]:
        torch.manual_seed(0)
        runners[f"vocab {name}"], pipes[f"vocab {name}"] = _vocabulary_runner(cfg, name, world, m, x, y, costs)
    for name in settings["whole_schedules"]:
        runners[f"pipetrain {name}"], pipes[f"pipetrain {name}"] = ranks.pipetrain_runner(cfg, name, world, m, x, y,
                                                                                          costs)
        runners[f"torch {name}"] = ranks.torch_runner(cfg, name, world, rank, m, x, y, costs)
    return runners, pipes


def rank_main(rank: int, world: int, settings: dict) -> dict:
    import torch
    import torch.distributed as dist

    from pipetrain.runtime.host_memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = ranks.model_config(settings["model"])
    x, y = ranks.fixed_batch(cfg, settings["batch_size"])
    runners, pipes = _runners(rank, world, settings, cfg, x, y, settings["layer_costs"])
    single = ranks.single_process_step(cfg, x, y) if rank == 0 else None
    for step in runners.values():
        for _ in range(settings["warmup"]):
            step()
    runners["one process"] = (lambda: single(settings["microbatches"])) if single else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(settings["rounds"]):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            dist.barrier()
            start = time.perf_counter()
            runners[name]()
            dist.barrier()  # (the slower rank's step: both leave the barrier when it is done)
            times[name].append(time.perf_counter() - start)
    busy = {}
    for name, pipe in pipes.items():  # each pipeline's own timeline: busy over step time, mean over ranks
        pipe.step(x, y)
        timeline = pipe.gather_timeline()
        if timeline is not None:
            stats = timeline.per_rank()
            busy[name] = statistics.fmean(s.busy_time for s in stats) / timeline.step_time()
        for p in pipe.parameters():
            p.grad = None
    return {"times": times, "efficiency": busy}


def peak_rank(rank: int, world: int, settings: dict, name: str) -> int:
    """Peak resident memory (bytes) of a fresh process running one contender 2 steps."""
    import torch

    from pipetrain.runtime.host_memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = ranks.model_config(settings["model"])
    x, y = ranks.fixed_batch(cfg, settings["batch_size"])
    kind, schedule = name.split(" ")
    m, costs = settings["microbatches"], settings["layer_costs"]
    torch.manual_seed(0)
    step, _ = (_vocabulary_runner(cfg, schedule, world, m, x, y, costs) if kind == "vocab"
               else ranks.pipetrain_runner(cfg, schedule, world, m, x, y, costs))
    for _ in range(2):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(settings: dict) -> dict:
    cfg = ranks.model_config(settings["model"])
    x, y = ranks.fixed_batch(cfg, settings["batch_size"])
    settings = {**settings, "layer_costs": ranks.layer_costs(cfg, x, y, settings["microbatches"])}
    per_rank = run_processes(2, rank_main, settings, timeout=7200)
    steps = {name: statistics.median(t) for name, t in per_rank[0]["times"].items()}
    vocab = min((n for n in steps if n.startswith("vocab")), key=steps.get)
    whole = min((n for n in steps if n.startswith("pipetrain")), key=steps.get)
    torch_best = min((n for n in steps if n.startswith("torch")), key=steps.get)
    memory = {name: run_processes(2, peak_rank, settings, name, timeout=3600) for name in (vocab, whole)}
    return {
        "vocab": settings["vocab"], "steps_ms": {n: round(t * 1000, 1) for n, t in steps.items()},
        "best": vocab, "efficiency": round(per_rank[0]["efficiency"][vocab], 3),
        "efficiency_whole": round(per_rank[0]["efficiency"][whole], 3), "best_whole": whole, "best_torch": torch_best,
        "vs_one_process": round(steps["one process"] / steps[vocab], 3),
        "vs_torch": round(steps[torch_best] / steps[vocab], 3),
        "vs_whole": round(steps[whole] / steps[vocab], 3),
        "peak_mib": {n: [round(memory[n][r] / 2**20) for r in (0, 1)] for n in memory},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vocab-schedules", nargs="+", default=list(VOCAB_SCHEDULES))
    p.add_argument("--whole-schedules", nargs="+", default=list(WHOLE_SCHEDULES))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = []
    for vocab in args.vocab:
        settings = {"vocab": vocab, "width": args.width, "layers": args.layers, "batch_size": args.batch_size,
                    "microbatches": args.microbatches, "rounds": args.rounds, "warmup": args.warmup,
                    "vocab_schedules": args.vocab_schedules, "whole_schedules": args.whole_schedules}
        settings["model"] = _model(settings)
        results.append(measure(settings))
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        print(f"vocabulary {r['vocab']}: " + ", ".join(f"{n} {t:.0f} ms" for n, t in r["steps_ms"].items()))
        print(f"  best vocabulary parallel: {r['best']}, efficiency {r['efficiency']} (whole layers' best "
              f"{r['best_whole']}: {r['efficiency_whole']}); {r['vs_one_process']}x one process, {r['vs_torch']}x "
              f"torch's best ({r['best_torch']}), {r['vs_whole']}x whole-layer pipetrain; peak MiB per rank "
              + ", ".join(f"{n} {m}" for n, m in r["peak_mib"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
