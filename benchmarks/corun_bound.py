"""The best any 2-rank pipeline can do on this machine: each rank's share of the model, run at the same time
with no pipeline at all (no communication, no waiting, no runtime), against the whole model in one process.

    python benchmarks/corun_bound.py                        # gpt-8x256, 8 microbatches, 15 rounds
    python benchmarks/corun_bound.py --workload llama-8x256 --microbatches 4 --json

Each rank builds the whole model (the same weights), keeps its layers of the rank-balanced split of the
measured F + I + W (what `schedule="auto"` starts from), and precomputes its input (the output of the
layers before it) and, but on the last rank, a fixed gradient for its output. One step is what the single
process does: for each microbatch, forward then backward, gradients accumulated. Three contenders rotate,
round by round (A B C, C B A, ...), between barriers:
- **single**: the whole model on rank 0, 1 thread (the benchmark suite's baseline), the others waiting;
- **alone**: each rank's share by itself, one rank after the other;
- **together**: every rank's share at once, on its own core: a pipeline with no bubble and a free runtime.
**ideal efficiency** = (single / P) / max over ranks of *together*, per round, then the median: no pipeline
on this split and machine can beat it, whatever its schedule (it would have to compute faster than its
ranks do with nothing else to do). **co-run slowdown** = together / alone per rank: what the ranks lose to
each other (shared caches and memory), which no runtime can remove; **split** = sum of alone / single.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `ranks` is imported by the spawned ranks too

import ranks  # noqa: E402
from run import WORKLOADS  # noqa: E402

from pipetrain import models  # noqa: E402
from pipetrain.models.gpt import gpt_loss  # noqa: E402
from pipetrain.runtime.host_memory import keep_freed_memory  # noqa: E402
from pipetrain.schedule.partition import rank_partition  # noqa: E402
from pipetrain.spawn import run_processes  # noqa: E402


def share_step(cfg, balance: list[int], rank: int, x: torch.Tensor, y: torch.Tensor, m: int):
    """Rank `rank`'s layers of `balance` as one training step over `m` microbatches, with no communication."""
    torch.manual_seed(0)
    layers = models.build(cfg)
    start = sum(balance[:rank])
    before, mine = nn.Sequential(*layers[:start]), nn.Sequential(*layers[start:start + balance[rank]])
    last = rank == len(balance) - 1
    inputs, grads = [], []
    with torch.no_grad():
        for xm in x.tensor_split(m):
            h = before(xm) if start else xm
            inputs.append(h)
            grads.append(None if last else torch.randn_like(mine(h)))

    def step() -> None:
        for h, g, ym in zip(inputs, grads, y.tensor_split(m), strict=True):
            h = h.requires_grad_(True) if h.is_floating_point() else h
            out = mine(h)
            if last:
                (gpt_loss(out, ym) / m).backward()
            else:
                out.backward(g)
            h.grad = None
        mine.zero_grad(set_to_none=True)

    step()  # warm-up
    return step


def corun_rank(rank: int, world: int, spec: dict) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = ranks.model_config(spec["model"])
    x, y = ranks.fixed_batch(cfg, spec["batch_size"])
    m = spec["microbatches"]
    share = share_step(cfg, spec["balance"], rank, x, y, m)
    single = ranks.single_process_step(cfg, x, y) if rank == 0 else None

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def alone() -> float:
        took = 0.0
        for r in range(world):
            dist.barrier()
            if r == rank:
                took = timed(share)
            else:
                dist.barrier()
        return took

    runners = {"single": lambda: timed(lambda: single(m)) if single else timed(lambda: None),
               "alone": alone, "together": lambda: timed(share)}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(spec["rounds"]):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            times[name].append(runners[name]())
    return times


def measure(workload: str, *, world: int = 2, microbatches: int = 8, batch_size: int = 32, rounds: int = 15) -> dict:
    cfg = ranks.model_config(WORKLOADS[workload])
    costs = ranks.layer_costs(cfg, *ranks.fixed_batch(cfg, batch_size), microbatches)
    balance = rank_partition([sum(c) for c in costs], list(range(world)))
    spec = {"model": WORKLOADS[workload], "microbatches": microbatches, "batch_size": batch_size,
            "rounds": rounds, "balance": balance}
    results = run_processes(world, corun_rank, spec, timeout=3600)
    per_rank = [results[r] for r in range(world)]
    single = per_rank[0]["single"]
    together = [max(p["together"][r] for p in per_rank) for r in range(rounds)]
    ideal = [s / world / t for s, t in zip(single, together, strict=True)]
    slowdown = [[t / a for t, a in zip(p["together"], p["alone"], strict=True)] for p in per_rank]
    split = [sum(p["alone"][r] for p in per_rank) / single[r] for r in range(rounds)]
    med = statistics.median
    return {"workload": workload, "ranks": world, "microbatches": microbatches, "balance": balance,
            "rounds": rounds, "single_ms": med(single) * 1e3,
            "alone_ms": [med(p["alone"]) * 1e3 for p in per_rank],
            "together_ms": [med(p["together"]) * 1e3 for p in per_rank],
            "ideal_efficiency": med(ideal), "ideal_efficiency_range": [min(ideal), max(ideal)],
            "corun_slowdown": [med(s) for s in slowdown], "split": med(split)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="gpt-8x256", choices=sorted(WORKLOADS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args.workload, world=args.ranks, microbatches=args.microbatches, batch_size=args.batch_size,
                rounds=args.rounds)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['workload']}, {r['ranks']} ranks, M = {r['microbatches']}, split {r['balance']}, "
          f"{r['rounds']} rounds (medians):")
    print(f"  single process, 1 thread: {r['single_ms']:.0f} ms")
    for rank, (a, t, s) in enumerate(zip(r["alone_ms"], r["together_ms"], r["corun_slowdown"], strict=True)):
        print(f"  rank {rank}: alone {a:.0f} ms, together {t:.0f} ms (co-run slowdown {s:.3f})")
    lo, hi = r["ideal_efficiency_range"]
    print(f"  split: sum of alone / single = {r['split']:.3f}")
    print(f"  ideal efficiency (single / P / slowest together): {r['ideal_efficiency']:.3f} "
          f"(rounds {lo:.3f}-{hi:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
