"""Check the planner's predictions: `python benchmarks/validate_planner.py [--steps N]`.

1. Against measurement: plan gpt-8x256 on this machine (2 CPU cores as 2 pipeline ranks, microbatches of
   4 sequences, 8 of them), run each schedule's plan with pipetrain, and compare step times.
2. Against published runs, from their stated configurations (the planner's assumptions, not tuned):
   - Llama 3 405B on 16,384 H100s, TP8 x PP16 x DP128, seq 8192, 16 sequences per replica, interleaved
     1F1B: 400 TFLOP/s per GPU, 41% BF16 MFU (Llama 3 paper, table 4);
   - Megatron-LM's 1T GPT on 3,072 A100s, TP8 x PP64 x DP6, batch 3072, microbatch 1, activation
     recomputation: 163 TFLOP/s per GPU, 52% of peak counting recomputation (Narayanan et al. 2021, table 1).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ranks  # noqa: E402

from pipetrain.planner import CLUSTERS, MODELS, cluster_from, plan  # noqa: E402
from pipetrain.planner.plan import _Candidate, _evaluate  # noqa: E402
from pipetrain.spawn import run_processes  # noqa: E402

LOCAL = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zbv", 2)]
PUBLISHED = [
    # (label, model, cluster, (tp, pp, dp, stages per rank, microbatch, microbatches, schedule, recompute),
    #  published value, which utilization it is)
    ("Llama 3 405B, 16,384 H100 (Dubey et al. 2024)", "llama3-405b", "h100-16k",
     (8, 16, 128, 4, 1, 16, "interleaved-1f1b", True), 0.41, "mfu"),
    ("Megatron-LM 1T, 3,072 A100 (Narayanan et al. 2021)", "dense-1t", "a100-3k",
     (8, 64, 6, 1, 1, 512, "1f1b", True), 0.52, "hfu"),
]


def measure_rank(rank: int, world: int, spec: dict) -> dict:
    import time

    import torch
    import torch.distributed as dist

    from pipetrain.models.gpt import GPTConfig

    torch.set_num_threads(1)
    cfg = GPTConfig(**spec["model"])
    x, y = ranks.fixed_batch(cfg, spec["batch"])
    out = {}
    for name, _ in LOCAL:
        step, _pipe = ranks.pipetrain_runner(cfg, name, world, spec["microbatches"], x, y)
        for _ in range(2):
            step()
        times = []
        for _ in range(spec["steps"]):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        out[name] = times
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="measured steps per schedule")
    args = p.parse_args(argv)
    model = MODELS["gpt-8x256"]
    cluster = cluster_from("local", model, 4)
    print(f"local cluster: {cluster.notes}\n")
    lines = ["| schedule | predicted step | measured step (median) | error |", "|---|---|---|---|"]
    spec = {"model": dict(vocab_size=model.vocab, seq_len=model.seq, d_model=model.hidden, n_layers=model.layers,
                          n_heads=model.heads), "batch": model.global_batch, "microbatches": 8, "steps": args.steps}
    measured = run_processes(2, measure_rank, spec, timeout=1800)
    errors = []
    for name, v in LOCAL:
        best = plan(model, cluster, devices=2, tp=1, pp=2, dp=1, microbatch_size=4, schedule=name,
                    stages_per_rank=v, top=1)[0]
        times = [max(measured[r][name][i] for r in measured) for i in range(args.steps)]
        real = statistics.median(times)
        errors.append(best.step_time / real - 1)
        lines.append(f"| {name} | {best.step_time * 1e3:.0f} ms | {real * 1e3:.0f} ms | {errors[-1]:+.1%} |")
    print("\n".join(lines))
    print(f"\nlargest error {max(map(abs, errors)):.1%} (target <= 15%)\n")
    lines = ["| published run | planner's configuration | predicted | published | error |", "|---|---|---|---|---|"]
    for label, model_name, cluster_name, (t, pp, d, v, b, m, sched, rc), value, kind in PUBLISHED:
        got = _evaluate(MODELS[model_name], CLUSTERS[cluster_name], _Candidate(t, pp, d, v, b, m, sched, rc),
                        exact=True)
        config = f"TP{t} PP{pp} DP{d}, {sched} (v={v}), M={m}, recompute {'on' if rc else 'off'}"
        if got is None:
            lines.append(f"| {label} | {config} | does not fit in memory | {value:.0%} {kind.upper()} | — |")
            continue
        predicted = getattr(got, kind)
        lines.append(f"| {label} | {config} | {predicted:.1%} {kind.upper()} | {value:.0%} {kind.upper()} | "
                     f"{predicted / value - 1:+.0%} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
