"""Expert parallel's all-to-all: how much of a training step it takes, on ep 2 x pp 2 (4 gloo ranks) or pp 1.

    python benchmarks/moe_all_to_all.py                          # llama-moe-8x256 (8 blocks x 256, 8 experts)
    python benchmarks/moe_all_to_all.py --layers 4 --steps 4 --json
    python benchmarks/moe_all_to_all.py --pp 1 --layers 4                # ep 2 alone: 2 ranks, a core each

Each rank trains the reference Llama with 8 experts per block (top 2) through `pt.Pipeline` on a
(dp 1, ep 2, pp 2) mesh; the all-to-alls are timed where they happen (each blocking
`torch.distributed.all_to_all_single` of the dispatch, the combine and their backward, wall time inside the
call), next to the step. Per rank: the median step time after the first, the all-to-all time of that step
and its share, how many all-to-alls a step makes, and the CPU time the process spent in the step (all its
threads): with more ranks than cores, time one rank waits is time another computes, so only the cores left
idle can be won back. This is the time that overlapping them with another
microbatch's compute could hide: the measurement before that work.
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


def rank_main(rank: int, world: int, settings: dict) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import pipetrain as pt
    from pipetrain.models.gpt import gpt_loss_sum
    from pipetrain.models.llama import LlamaConfig, build_llama

    spent = {"seconds": 0.0, "calls": 0}
    blocking = dist.all_to_all_single

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return blocking(*args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - start
            spent["calls"] += 1

    dist.all_to_all_single = timed  # (expert_parallel calls it through the module: every exchange is timed)
    cfg = LlamaConfig(seq_len=settings["seq"], d_model=settings["d_model"], n_layers=settings["layers"], n_heads=8,
                      n_kv_heads=4, n_experts=8, top_k=2)
    torch.manual_seed(0)
    layers = build_llama(cfg)
    mesh = init_device_mesh("cpu", (1, 2, world // 2), mesh_dim_names=("dp", "ep", "pp"))
    pipe = pt.Pipeline(layers, schedule=settings["schedule"], num_microbatches=settings["microbatches"],
                       loss_fn=gpt_loss_sum, mesh=mesh, timeout=120)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-3)
    rows = settings["microbatches"] * settings["microbatch_size"]
    steps, comm, losses, cpu = [], [], [], []
    for step in range(settings["steps"]):
        g = torch.Generator().manual_seed(1000 * step + pipe.dp_rank)  # each replica its own rows
        ids = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len + 1), generator=g)
        spent["seconds"], spent["calls"] = 0.0, 0
        dist.barrier()
        start, busy = time.perf_counter(), time.process_time()
        losses.append(pipe.step(ids[:, :-1], ids[:, 1:], num_tokens=2 * ids[:, 1:].numel()))
        opt.step()
        opt.zero_grad()
        steps.append(time.perf_counter() - start)
        cpu.append(time.process_time() - busy)  # this process's CPU seconds (all its threads, gloo's too)
        comm.append((spent["seconds"], spent["calls"]))
    later = slice(1, None) if len(steps) > 1 else slice(None)
    step_time = statistics.median(steps[later])
    a2a = statistics.median(s for s, _ in comm[later])
    return {"step": step_time, "all_to_all": a2a, "share": a2a / step_time, "calls": comm[-1][1],
            "cpu": statistics.median(cpu[later]), "losses": losses}


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
    results = run_processes(2 * args.pp, rank_main, settings, timeout=900)
    if args.json:
        print(json.dumps({"settings": settings, "ranks": results}))
        return 0
    print(f"llama MoE {args.layers} x {args.d_model}, 8 experts (top 2), seq {args.seq}, {args.microbatches} x "
          f"{args.microbatch_size} rows per replica, {args.schedule}; ep 2 x pp {args.pp} ({2 * args.pp} gloo ranks, 1 "
          "thread each)")
    print(f"{'rank':>4} {'step':>9} {'all-to-all':>11} {'share':>7} {'calls':>6} {'CPU':>9}")
    for rank, r in sorted(results.items()):
        print(f"{rank:>4} {r['step'] * 1e3:>7.1f}ms {r['all_to_all'] * 1e3:>9.1f}ms {r['share']:>7.1%} {r['calls']:>6} "
              f"{r['cpu'] * 1e3:>7.1f}ms")
    busy = sum(r["cpu"] for r in results.values()) / statistics.median(r["step"] for r in results.values())
    print(f"the {len(results)} ranks kept {busy:.2f} of this machine's {os.cpu_count()} cores busy through a step "
          "(CPU seconds over wall seconds): what an overlap can win is the idle rest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
