"""Decoding on the pipeline against the same KV-cached decoding of the whole model in one process.

    python benchmarks/generation.py                      # gpt-8x256, 64 prompts of 8-32 tokens, 64 new tokens
    python benchmarks/generation.py --model llama-8x256 --prompts 128 --json

On 2 gloo ranks (1 thread each) `pipe.generate` runs greedy decoding (no EOS: every sequence makes
`--new-tokens` tokens) with its default groups (2 per rank). The baselines are `generate` on a one-rank
pipeline of the same weights (one group: every sequence in one batch), in one process on rank 0 while the
other rank waits, on 1 thread and on 2 threads; and, to show what the groups cost without pipelining, on
1 thread with the pipeline's groups. They take turns round by round (A B C D, D C B A, ...); tokens/s are
new tokens over the median round, and the pipelined run's idle per rank is read from its measured
timeline (`gather_timeline(of="generate")`). All must give the same tokens.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `ranks` is imported by the spawned ranks too

import ranks  # noqa: E402
from run import WORKLOADS  # noqa: E402

import pipetrain as pt  # noqa: E402
from pipetrain import models  # noqa: E402
from pipetrain.models.gpt import gpt_loss  # noqa: E402
from pipetrain.runtime.host_memory import keep_freed_memory  # noqa: E402
from pipetrain.spawn import run_processes  # noqa: E402


def bench_prompts(n: int, vocab: int, shortest: int, longest: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (int(torch.randint(shortest, longest + 1, (), generator=gen)),), generator=gen)
            for _ in range(n)]


def generation_rank(rank: int, world: int, spec: dict) -> dict:
    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = ranks.model_config(spec["model"])
    prompts = bench_prompts(spec["prompts"], cfg.vocab_size, *spec["prompt_lengths"])
    new = spec["new_tokens"]

    def pipeline(transport=None, num_ranks=world):
        torch.manual_seed(0)
        sched = pt.schedules.build("1f1b", num_ranks=num_ranks, num_microbatches=num_ranks)
        return pt.Pipeline(models.build(cfg), schedule=sched, loss_fn=gpt_loss, transport=transport, timeout=600)

    pipe = pipeline()
    single = pipeline(pt.InProcessHub(1).transport(0), 1) if rank == 0 else None
    outputs = {}

    chunk = spec.get("prefill_chunk") or 16
    whole = max(len(p) for p in prompts)  # one process: every prompt in one prefill pass, its fastest

    def run_pipe():
        outputs["pipeline"] = pipe.generate(prompts, new, num_groups=spec["groups"], prefill_chunk=chunk)

    def run_single(threads: int, groups: int | None = None):
        if single is not None:
            torch.set_num_threads(threads)
            outputs[f"single_{threads}_{groups}"] = single.generate(prompts, new, num_groups=groups,
                                                                     prefill_chunk=whole)
            torch.set_num_threads(1)

    runners = {"pipeline": run_pipe, "single_1_thread": lambda: run_single(1),
               "single_2_threads": lambda: run_single(world),
               "single_1_thread_groups": lambda: run_single(1, len(pipe.last_generation_groups))}
    for fn in runners.values():  # warm-up
        fn()
    times = {name: [] for name in runners}
    for r in range(spec["rounds"]):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            dist.barrier()
            start = time.perf_counter()
            runners[name]()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    timeline = pipe.gather_timeline(of="generate")
    if timeline is not None and spec.get("timeline"):
        from pipetrain.viz import save_generation

        save_generation(timeline, spec["timeline"], num_groups=len(pipe.last_generation_groups),
                        title=f"generate on {world} ranks: {len(prompts)} prompts, {new} new tokens")
    same = rank != 0 or all([t.tolist() for t in outputs[k]] == [t.tolist() for t in outputs["pipeline"]]
                            for k in outputs if k != "pipeline")
    return {"times": times, "same_tokens": same, "tokens": sum(len(t) for t in outputs["pipeline"]),
            "idle": [s.bubble_fraction for s in timeline.per_rank()] if timeline is not None else None,
            "groups": len(pipe.last_generation_groups)}


def measure(model: str = "gpt-8x256", *, world: int = 2, prompts: int = 64, new_tokens: int = 64,
            prompt_lengths: tuple[int, int] = (8, 32), rounds: int = 5, groups: int | None = None,
            timeline: str | None = None, prefill_chunk: int | None = None) -> dict:
    spec = {"model": WORKLOADS[model], "prompts": prompts, "new_tokens": new_tokens, "prompt_lengths": prompt_lengths,
            "rounds": rounds, "groups": groups, "timeline": str(Path(timeline).resolve()) if timeline else None,
            "prefill_chunk": prefill_chunk}
    out = run_processes(world, generation_rank, spec, timeout=3600)
    first = out[0]
    med = {name: statistics.median(v) for name, v in first["times"].items()}
    tokens = first["tokens"]
    ratio = [s / p for s, p in zip(first["times"]["single_1_thread"], first["times"]["pipeline"], strict=True)]
    ratio2 = [s / p for s, p in zip(first["times"]["single_2_threads"], first["times"]["pipeline"], strict=True)]
    return {"model": model, "ranks": world, "prompts": prompts, "new_tokens": new_tokens,
            "prompt_lengths": list(prompt_lengths), "groups": first["groups"], "rounds": rounds, "tokens": tokens,
            "tokens_per_s": {name: tokens / t for name, t in med.items()},
            "speedup_vs_1_thread": statistics.median(ratio), "speedup_vs_2_threads": statistics.median(ratio2),
            "grouping_cost": statistics.median(g / s for g, s in zip(first["times"]["single_1_thread_groups"],
                                                                      first["times"]["single_1_thread"], strict=True)),
            "idle_per_rank": first["idle"], "same_tokens": all(o["same_tokens"] for o in out.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt-8x256", choices=sorted(WORKLOADS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-lengths", type=int, nargs=2, default=(8, 32), metavar=("SHORTEST", "LONGEST"))
    p.add_argument("--groups", type=int, default=None, help="groups in circulation (default: 2 per rank)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per prefill pass (default 16)")
    p.add_argument("--timeline", default=None, metavar="PNG", help="draw the last pipelined call's timeline")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args.model, world=args.ranks, prompts=args.prompts, new_tokens=args.new_tokens,
                prompt_lengths=tuple(args.prompt_lengths), rounds=args.rounds, groups=args.groups,
                timeline=args.timeline, prefill_chunk=args.prefill_chunk)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    tps = r["tokens_per_s"]
    print(f"{r['model']}: {r['prompts']} prompts of {r['prompt_lengths'][0]}-{r['prompt_lengths'][1]} tokens, "
          f"{r['new_tokens']} new tokens each, {r['ranks']} ranks, {r['groups']} groups, {r['rounds']} rounds")
    print(f"  pipeline:            {tps['pipeline']:8.0f} tokens/s (idle per rank "
          + " ".join(f"{i:.1%}" for i in r["idle_per_rank"]) + ")")
    print(f"  one process, 1 thread:  {tps['single_1_thread']:8.0f} tokens/s -> pipeline "
          f"{r['speedup_vs_1_thread']:.2f}x")
    print(f"  one process, 2 threads: {tps['single_2_threads']:8.0f} tokens/s -> pipeline "
          f"{r['speedup_vs_2_threads']:.2f}x")
    print(f"  one process, 1 thread, {r['groups']} groups: {tps['single_1_thread_groups']:8.0f} tokens/s "
          f"({r['grouping_cost']:.2f}x the time of one group)")
    print(f"  same tokens in all: {r['same_tokens']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
