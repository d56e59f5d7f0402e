"""pipetrain vs torch.distributed.pipelining vs single-process training: `python benchmarks/run.py [--quick]`.

For each workload (reference GPT size) and rank count, every schedule runs in pipetrain and in
torch.distributed.pipelining on the same layers, weights, batch, microbatches and split, alternating block
by block (A B, B A, ...) to cancel machine drift. A single-process run of the same model (1 thread, the
same microbatches accumulated: the fair baseline for P ranks on P cores) is timed before and after.
Peak memory is measured apart from the timing, in fresh processes per library and schedule (peak RSS).
When `jax` is installed (never a pipetrain dependency), the same GPT also runs in JAX (benchmarks/jax_gpt.py):
jit on one device and a shard_map/ppermute GPipe over 2 host devices, with pipetrain's ratio reported.
Writes results.json, results.md and a timeline picture per schedule to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `ranks` is imported by the spawned ranks too

import ranks  # noqa: E402

from pipetrain.spawn import run_processes  # noqa: E402

WORKLOADS = {
    "gpt-8x256": dict(vocab_size=256, seq_len=128, d_model=256, n_layers=8, n_heads=8),
    "gpt-16x512": dict(vocab_size=256, seq_len=128, d_model=512, n_layers=16, n_heads=8),
}
SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "looped-bfs"]


def _single(rank: int, world: int, spec: dict) -> list[float]:
    return ranks.single_process(spec)


def measure(workload: str, world: int, args) -> dict:
    spec = {"model": WORKLOADS[workload], "microbatches": args.microbatches, "batch_size": args.batch_size,
            "schedules": args.schedules, "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps,
            "timelines": True}
    started = time.perf_counter()
    before = run_processes(1, _single, spec, timeout=3600)[0]
    per_rank = run_processes(world, ranks.bench_rank, spec, timeout=3600)
    after = run_processes(1, _single, spec, timeout=3600)[0]
    memory = {}  # (schedule, library) -> peak RSS per rank, each measured in fresh processes
    for name in args.schedules:
        for lib in ("pipetrain", "torch"):
            if lib == "pipetrain" or name in ranks.TORCH_SCHEDULES:
                peaks = run_processes(world, ranks.peak_memory_rank, spec, lib, name, timeout=3600)
                memory[(name, lib)] = [peaks[r] for r in range(world)]
    single = statistics.median(before + after)
    tokens = args.batch_size * WORKLOADS[workload]["seq_len"]
    rows = []
    for name in args.schedules:
        row = {"workload": workload, "ranks": world, "schedule": name, "microbatches": args.microbatches}
        for lib in ("pipetrain", "torch"):
            if lib not in per_rank[0][name]["times"]:
                continue
            blocks = [max(per_rank[r][name]["times"][lib][i] for r in range(world))
                      for i in range(args.rounds)]
            step = statistics.median(blocks)
            row[lib] = {"step_time": step, "blocks": blocks, "tokens_per_s": tokens / step,
                        "efficiency": single / world / step,
                        "peak_memory_per_rank": memory[(name, lib)]}
        row["pipetrain"]["bubble_per_rank"] = [per_rank[r][name]["bubble"] for r in range(world)]
        if "torch" in row:
            pairs = [t / p for p, t in zip(row["pipetrain"]["blocks"], row["torch"]["blocks"], strict=True)]
            row["speedup_vs_torch"] = statistics.median(pairs)  # per A/B pair, then the median
        row["timeline"] = per_rank[0][name]["timeline"]
        if row["timeline"]:
            row.update(timeline_figures(row["timeline"]))
        rows.append(row)
    return {"single_process_step_time": single, "single_blocks": before + after, "rows": rows,
            "seconds": time.perf_counter() - started}


def timeline_figures(data: dict) -> dict:
    """From one measured pipetrain step: the runtime's own overhead (time in a rank's span that is neither
    compute nor waiting for data: posting sends/receives and the executor's Python) as a fraction of the
    step, worst rank; and the simulator's prediction error with costs fitted on that step."""
    from pipetrain.schedule.compare import compare
    from pipetrain.schedule.io import timeline_from_json

    timeline, schedule = timeline_from_json(data)
    step = timeline.step_time()
    overheads = []
    for r in range(timeline.num_ranks):
        events = [e for e in timeline.events if e.rank == r]
        waits = [w for w in timeline.waits if w.rank == r]
        span = max(e.end for e in events) - min(e.start for e in events)
        compute = sum(e.duration for e in events if e.action.op.is_compute)
        overheads.append((span - compute - sum(w.duration for w in waits)) / step)
    return {"runtime_overhead": max(overheads), "sim_error": compare(schedule, timeline).step_time_error}


def measure_jax(workload: str, args) -> dict | None:
    """The optional JAX comparison (benchmarks/jax_gpt.py in its own process); None without jax."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("jax") is None:
        return None
    model = WORKLOADS[workload]
    cmd = [sys.executable, str(Path(__file__).with_name("jax_gpt.py")), "--vocab", str(model["vocab_size"]),
           "--seq-len", str(model["seq_len"]), "--d-model", str(model["d_model"]), "--layers", str(model["n_layers"]),
           "--heads", str(model["n_heads"]), "--batch-size", str(args.batch_size), "--microbatches",
           str(args.microbatches), "--repeats", str(args.rounds * args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        print(f"   (JAX comparison failed: {done.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"version": out["jax"], "single_step": statistics.median(out["single"]),
            "gpipe_step": statistics.median(out["gpipe"])}


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; torch {results['torch']}; {results['date']}.",
             f"Batch {results['batch_size']} sequences in {results['microbatches']} microbatches, fp32, "
             "1 thread per rank; median of A/B blocks; efficiency = (single-process step / P) / step.", "",
             "| workload | P | schedule | pipetrain step | tokens/s | efficiency | torch step | torch eff. | "
             "speed-up | peak RSS pt / torch (MiB, max rank) | pipetrain idle per rank | runtime overhead | "
             "sim. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for block in results["runs"]:
        for r in block["rows"]:
            p, t = r["pipetrain"], r.get("torch")
            mem = f"{max(p['peak_memory_per_rank']) / 2**20:.0f}"
            mem += f" / {max(t['peak_memory_per_rank']) / 2**20:.0f}" if t else " / —"
            lines.append(
                f"| {r['workload']} | {r['ranks']} | {r['schedule']} | {p['step_time'] * 1e3:.0f} ms | "
                f"{p['tokens_per_s']:.0f} | {p['efficiency']:.3f} | "
                + (f"{t['step_time'] * 1e3:.0f} ms | {t['efficiency']:.3f} | {r['speedup_vs_torch']:.2f}× | "
                   if t else "— | — | — | ")
                + f"{mem} | {' '.join(f'{b:.1%}' for b in p['bubble_per_rank'])} | "
                + (f"{r['runtime_overhead']:.1%} | {r['sim_error']:+.1%} |" if "sim_error" in r else "— | — |"))
        lines.append(f"| {block['rows'][0]['workload']} | 1 | single process (1 thread) | "
                     f"{block['single_process_step_time'] * 1e3:.0f} ms | | 1/P | | | | | | | |")
    for block in results["runs"]:
        jax = block.get("jax")
        if jax:
            gpipe = next(r for r in block["rows"] if r["schedule"] == "gpipe")["pipetrain"]["step_time"]
            best = min(r["pipetrain"]["step_time"] for r in block["rows"])
            lines.append(f"\nJAX {jax['version']} on the same GPT ({block['rows'][0]['workload']}, "
                         f"{block['rows'][0]['ranks']} CPU devices, 1 thread each): jit on one device "
                         f"{jax['single_step'] * 1e3:.0f} ms per step, shard_map/ppermute GPipe "
                         f"{jax['gpipe_step'] * 1e3:.0f} ms. pipetrain GPipe {gpipe * 1e3:.0f} ms: "
                         f"{jax['gpipe_step'] / gpipe:.2f}x JAX's GPipe; pipetrain's best schedule "
                         f"{best * 1e3:.0f} ms: {jax['single_step'] / best:.2f}x JAX on one device.")
    return "\n".join(lines) + "\n"


def draw_timelines(results: dict, out: Path) -> list[str]:
    try:
        from pipetrain import viz
        from pipetrain.schedule.io import timeline_from_json
    except ImportError:
        return []
    written = []
    for block in results["runs"]:
        for r in block["rows"]:
            if r.get("timeline"):
                timeline, _ = timeline_from_json(r["timeline"])
                path = out / f"timeline_{r['workload']}_p{r['ranks']}_{r['schedule']}.png"
                viz.save(viz._scaled(timeline, 1e3), path, unit="ms",
                         title=f"{r['schedule']} measured: {r['workload']}, {r['ranks']} ranks")
                written.append(path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="gpt-8x256 on 2 ranks only, fewer blocks (~5 minutes)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    p.add_argument("--ranks", nargs="+", type=int, default=None)
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=SCHEDULES)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None, help="A/B rounds (blocks per library)")
    p.add_argument("--steps", type=int, default=None, help="steps per block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.workloads = args.workloads or (["gpt-8x256"] if args.quick else list(WORKLOADS))
    args.ranks = args.ranks or ([2] if args.quick else [2, 4])
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.steps = args.steps or (2 if args.quick else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    results = {"machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_name()}, "
                          f"{__import__('os').cpu_count()} cores".replace("  ", " "),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size,
               "microbatches": args.microbatches, "runs": []}
    for workload in args.workloads:
        for world in args.ranks:
            print(f"== {workload} on {world} ranks ...", flush=True)
            block = measure(workload, world, args)
            if world == 2 and "gpipe" in args.schedules:  # the JAX pipeline uses 2 host devices
                block["jax"] = measure_jax(workload, args)
            results["runs"].append(block)
            for r in block["rows"]:
                t = f", torch {r['torch']['step_time'] * 1e3:.0f} ms, speed-up {r['speedup_vs_torch']:.2f}x" \
                    if "torch" in r else ""
                print(f"   {r['schedule']:17s} pipetrain {r['pipetrain']['step_time'] * 1e3:.0f} ms "
                      f"(efficiency {r['pipetrain']['efficiency']:.3f}){t}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out / "results.md").write_text(table)
    pictures = draw_timelines(results, out)
    print("\n" + table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(pictures)} timeline pictures")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
