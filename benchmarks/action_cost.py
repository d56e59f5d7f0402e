"""The runtime's own cost per action and per message, on a pipeline that computes almost nothing.

    python benchmarks/action_cost.py                     # 16 x Linear(64, 64), 1-row microbatches, M = 64, 2 ranks
    python benchmarks/action_cost.py --layers 32 --microbatches 128 --runs 5 --json

Each of 2 gloo ranks (one thread each) holds half of `--layers` Linear(d, d) layers and trains them with 1F1B
on microbatches of one row, in pipetrain (its transfers over shared memory, as it runs on one host by
default), in pipetrain over gloo's sockets (`pipetrain-gloo`: the same runtime, torch's transport) and in
torch.distributed.pipelining (`Schedule1F1B`), the three taking turns step by step in the same processes
(the same weights, inputs and split). What the layers themselves
cost is measured apart, in the same processes and taking turns with the two: a plain loop running the rank's
layers forward and backward on each microbatch (**work**). Per rank and library: the step (median), and

**per action**: (step - work) / compute actions, the microseconds the library adds around each forward and
backward (its Python, posting and waiting for the transfers, waiting for the other rank's share of the same).
For pipetrain the step's own timeline (`Pipeline.last_step`) splits that time: per action, inside the compute
actions beyond the work (the stage's call, autograd's bookkeeping) and between actions (the executor); per
message (each activation or gradient sent or received), posting it (`comms`) and waiting for it (`waits`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pipetrain.spawn import run_processes  # noqa: E402

LIBRARIES = ("pipetrain", "pipetrain-gloo", "torch")


def _square_sum(out, target):
    return ((out - target) ** 2).sum()


def rank_main(rank: int, world: int, settings: dict) -> dict:
    import torch
    from torch import nn
    from torch.distributed import pipelining

    import pipetrain as pt
    from pipetrain.runtime.dist_transport import DistTransport

    torch.set_num_threads(1)
    d, n, m = settings["width"], settings["layers"], settings["microbatches"]

    def build() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Linear(d, d) for _ in range(n)]

    x, y = torch.randn(m, d, generator=torch.Generator().manual_seed(1)), torch.zeros(m, d)
    pipes = {"pipetrain": pt.Pipeline(build(), schedule="1f1b", num_microbatches=m, loss_fn=_square_sum,
                                      balance=[n // 2] * 2),
             "pipetrain-gloo": pt.Pipeline(build(), schedule="1f1b", num_microbatches=m, loss_fn=_square_sum,
                                           balance=[n // 2] * 2, transport=DistTransport(shared_memory=False))}
    mine = nn.Sequential(*build()[rank * n // 2:(rank + 1) * n // 2])
    stage = pipelining.PipelineStage(mine, rank, world, torch.device("cpu"))
    schedule = pipelining.Schedule1F1B(stage, m, loss_fn=_square_sum)

    def run(library: str) -> float | None:
        """One step; its loss (torch's: on the last rank, the mean over microbatches)."""
        if library in pipes:
            pipe = pipes[library]
            loss = pipe.step(x, y)
            for p in pipe.parameters():
                p.grad = None
            return loss
        losses = []
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        mine.zero_grad(set_to_none=True)
        return float(torch.stack(losses).detach().mean()) if losses else None

    measured = {lib: {"step": [], "inside": [], "comms": [], "waits": [], "losses": []} for lib in LIBRARIES}
    works = []  # this rank's layers, forward and backward per microbatch in a plain loop: what they cost alone
    for step in range(settings["warmup"] + settings["steps"]):
        torch.distributed.barrier()
        start = time.perf_counter()
        _work(mine, x)
        works.append(time.perf_counter() - start)
        for library in LIBRARIES[step % 3:] + LIBRARIES[:step % 3]:  # (each library first in turn)
            torch.distributed.barrier()
            start = time.perf_counter()
            loss = run(library)
            elapsed = time.perf_counter() - start
            if step < settings["warmup"]:
                continue
            got = measured[library]
            got["step"].append(elapsed)
            got["losses"].append(loss)
            if library in pipes:
                last = pipes[library].last_step
                got["inside"].append(sum(e.duration for e in last.events))
                got["comms"].append(sum(e.duration for e in last.comms))
                got["waits"].append(sum(e.duration for e in last.waits))
    work = statistics.median(works[settings["warmup"]:])
    for library in pipes:
        measured[library]["inside"] = [t - work for t in measured[library]["inside"]]
    actions, messages = 2 * m, 2 * m  # an F and a B per microbatch; one activation or gradient each way
    out = {"work": work, "actions": actions, "messages": messages}
    for library, got in measured.items():
        step = statistics.median(got["step"])
        out[library] = {"step": step, "per_action": (step - work) / actions, "losses": got["losses"]}
        if library in pipes:  # its timeline: per action inside and between, per message posting and waiting
            parts = {k: statistics.median(got[k]) for k in ("inside", "comms", "waits")}
            out[library].update(inside=parts["inside"] / actions, posting=parts["comms"] / messages,
                                waiting=parts["waits"] / messages,
                                between=(step - work - sum(parts.values())) / actions)
    return out


def _work(layers, x) -> None:
    """One step's forwards and backwards of `layers`, one row at a time, in a plain loop."""
    import torch

    for row in x.split(1):
        out = layers(row.detach().requires_grad_())
        out.backward(torch.ones_like(out))
    layers.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="fresh process pairs (this machine's runs differ more "
                        "than its steps)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.layers % 2:
        parser.error("--layers must be even (two ranks, half each)")
    settings = vars(args).copy()
    runs = [run_processes(2, rank_main, settings, timeout=1800) for _ in range(args.runs)]
    ratios = [_ratio(results) for results in runs]
    over_gloo = [_ratio(results, "pipetrain-gloo") for results in runs]
    if args.json:
        print(json.dumps({"settings": settings, "runs": runs, "ratios": ratios, "ratios_over_gloo": over_gloo}))
        return 0
    print(f"{args.layers} x Linear({args.width}, {args.width}), 1-row microbatches, M = {args.microbatches}, 1F1B, "
          f"2 gloo ranks (1 thread each); medians of {args.steps} steps, the libraries taking turns")
    print(f"{'run':>3} {'rank':>4} {'library':>14} {'step':>9} {'work':>8} {'per action':>11}   pipetrain's timeline: "
          "per action inside + between, per message posting + waiting")
    for n, results in enumerate(runs, 1):
        for rank, r in sorted(results.items()):
            for library in LIBRARIES:
                c = r[library]
                parts = ("   " + " + ".join(f"{c[k] * 1e6:.0f}" for k in ("inside", "between")) + " us, "
                         + " + ".join(f"{c[k] * 1e6:.0f}" for k in ("posting", "waiting")) + " us"
                         ) if "inside" in c else ""
                print(f"{n:>3} {rank:>4} {library:>14} {c['step'] * 1e3:>7.1f}ms {r['work'] * 1e3:>6.1f}ms "
                      f"{c['per_action'] * 1e6:>9.0f}us{parts}")
    print(f"pipetrain / torch, runtime per action: {statistics.median(ratios):.2f} (median of {len(ratios)} runs, "
          f"each in fresh processes: {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"pipetrain over gloo / torch: {statistics.median(over_gloo):.2f} "
          f"({', '.join(f'{x:.2f}' for x in over_gloo)}): the same runtime on torch's transport")
    return 0


def _ratio(results: dict, library: str = "pipetrain") -> float:
    """`library`'s runtime per action over torch's, the mean over the ranks."""
    return statistics.mean(r[library]["per_action"] / r["torch"]["per_action"] for r in results.values())

if __name__ == "__main__":
    sys.exit(main())
