"""Expert parallel's all-to-all, exposed and overlapped: a training step with and without overlapped pairs.

    python benchmarks/moe_all_to_all.py --pp 1                  # ep 2 alone: 2 ranks, a core each (the goal)
    python benchmarks/moe_all_to_all.py                          # ep 2 x pp 2 (4 ranks on this machine's 2 cores)
    python benchmarks/moe_all_to_all.py --schedule dualpipev --layers 4 --steps 4 --json

Each rank trains the reference Llama with 8 experts per block (top 2) through `pt.Pipeline` on a (dp 1, ep 2,
pp) mesh, twice over: the schedule as built ("before") and with `overlap=True` ("after": forwards paired with
backwards of other microbatches, each pair's two lanes taking turns at their all-to-alls). The two pipelines
(the same weights, the same batches) take turns step by step, so both see the same machine. Per rank and
configuration: the median step time (after the first step of each), the exposed all-to-all time of that step
(`Pipeline.last_step.all_to_all`: the time a compute action stood waiting on an all-to-all that no other work
hid; without pairs, every all-to-all's whole wait), its share of the step, and the CPU seconds the process
spent in the step (all its threads): with more ranks than cores, one rank's wait is another's compute, and only
idle cores can be won back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pipetrain.spawn import run_processes  # noqa: E402

CONFIGS = ("before", "after")


def rank_main(rank: int, world: int, settings: dict) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import pipetrain as pt
    from pipetrain.models.gpt import gpt_loss_sum
    from pipetrain.models.llama import LlamaConfig, build_llama

    cfg = LlamaConfig(seq_len=settings["seq"], d_model=settings["d_model"], n_layers=settings["layers"], n_heads=8,
                      n_kv_heads=4, n_experts=8, top_k=2)
    mesh = init_device_mesh("cpu", (1, 2, world // 2), mesh_dim_names=("dp", "ep", "pp"))
    pipes, optimizers = {}, {}
    for config in CONFIGS:
        torch.manual_seed(0)
        pipes[config] = pipe = pt.Pipeline(build_llama(cfg), schedule=settings["schedule"],
                                           num_microbatches=settings["microbatches"], loss_fn=gpt_loss_sum, mesh=mesh,
                                           timeout=120, overlap=config == "after")
        optimizers[config] = torch.optim.AdamW(pipe.parameters(), lr=1e-3)
    rows = settings["microbatches"] * settings["microbatch_size"]
    measured = {config: {"step": [], "exposed": [], "cpu": [], "losses": []} for config in CONFIGS}
    for step in range(settings["steps"]):
        g = torch.Generator().manual_seed(1000 * step + pipes["before"].dp_rank)  # each replica its own rows
        ids = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=g)
        for config in (CONFIGS if step % 2 == 0 else CONFIGS[::-1]):  # (each goes first every other step)
            pipe, m = pipes[config], measured[config]
            dist.barrier()
            start, busy = time.perf_counter(), time.process_time()
            m["losses"].append(pipe.step(ids[:, :-1], ids[:, 1:], num_tokens=2 * ids[:, 1:].numel()))
            optimizers[config].step()
            optimizers[config].zero_grad()
            m["step"].append(time.perf_counter() - start)
            m["cpu"].append(time.process_time() - busy)  # this process's CPU seconds (all its threads, gloo's too)
            m["exposed"].append(sum(e.duration for e in pipe.last_step.all_to_all))
    out = {}
    for config, m in measured.items():
        later = slice(1, None) if len(m["step"]) > 1 else slice(None)
        step_time, exposed = statistics.median(m["step"][later]), statistics.median(m["exposed"][later])
        out[config] = {"step": step_time, "exposed": exposed, "share": exposed / step_time,
                       "cpu": statistics.median(m["cpu"][later]), "losses": m["losses"],
                       "pairs": sum(a.paired for a in pipes[config].schedule.actions[pipes[config].rank])}
    return out


def summary(results: dict) -> dict:
    """Over the ranks, per configuration: the median step, exposed all-to-all and cores kept busy; and
    after / before of each."""
    out = {}
    for config in CONFIGS:
        ranks = [r[config] for r in results.values()]
        step = statistics.median(r["step"] for r in ranks)
        out[config] = {"step": step, "exposed": statistics.median(r["exposed"] for r in ranks),
                       "busy_cores": sum(r["cpu"] for r in ranks) / step}
    out["exposed_after_over_before"] = out["after"]["exposed"] / out["before"]["exposed"]
    out["step_after_over_before"] = out["after"]["step"] / out["before"]["step"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (the job: 2 x pp ranks)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = {"layers": args.layers, "d_model": args.d_model, "seq": args.seq, "microbatches": args.microbatches,
                "microbatch_size": args.microbatch_size, "schedule": args.schedule, "steps": args.steps}
    results = run_processes(2 * args.pp, rank_main, settings, timeout=1800)
    total = summary(results)
    if args.json:
        print(json.dumps({"settings": settings, "ranks": results, "summary": total}))
        return 0
    print(f"llama MoE {args.layers} x {args.d_model}, 8 experts (top 2), seq {args.seq}, {args.microbatches} x "
          f"{args.microbatch_size} rows per replica, {args.schedule}; ep 2 x pp {args.pp} ({2 * args.pp} gloo ranks, 1 "
          f"thread each); before: as built, after: overlap=True")
    print(f"{'rank':>4} {'config':>7} {'pairs':>5} {'step':>9} {'exposed all-to-all':>19} {'share':>7} {'CPU':>9}")
    for rank, r in sorted(results.items()):
        for config in CONFIGS:
            c = r[config]
            print(f"{rank:>4} {config:>7} {c['pairs']:>5} {c['step'] * 1e3:>7.1f}ms {c['exposed'] * 1e3:>17.1f}ms "
                  f"{c['share']:>7.1%} {c['cpu'] * 1e3:>7.1f}ms")
    for config in CONFIGS:
        c = total[config]
        print(f"{config}: step {c['step'] * 1e3:.1f} ms, exposed all-to-all {c['exposed'] * 1e3:.1f} ms, "
              f"{c['busy_cores']:.2f} of {os.cpu_count()} cores busy")
    print(f"after / before: exposed all-to-all {total['exposed_after_over_before']:.0%}, step "
          f"{total['step_after_over_before']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
