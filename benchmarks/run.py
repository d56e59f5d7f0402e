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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `ranks` is imported by the spawned ranks too

import ranks  # noqa: E402

from pipetrain.spawn import run_processes  # noqa: E402

WORKLOADS = {
    "gpt-8x256": dict(vocab_size=256, seq_len=128, d_model=256, n_layers=8, n_heads=8),
    "gpt-8x256-v32k": dict(vocab_size=32768, seq_len=128, d_model=256, n_layers=8, n_heads=8),  # a heavy head
    "llama-8x256": dict(family="llama", vocab_size=256, seq_len=128, d_model=256, n_layers=8, n_heads=8,
                        n_kv_heads=4),
    "gpt-16x512": dict(vocab_size=256, seq_len=128, d_model=512, n_layers=16, n_heads=8),
}
SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "looped-bfs", "dualpipev", "zb-auto"]


def measure(workload: str, world: int, args) -> dict:
    large = WORKLOADS[workload]["d_model"] >= 512  # ~8x the compute per step: fewer, shorter blocks
    spec = {"model": WORKLOADS[workload], "microbatches": args.microbatches, "batch_size": args.batch_size,
            "schedules": args.schedules, "warmup": 1 if large else args.warmup,
            "rounds": min(args.rounds, 3) if large else args.rounds, "steps": 1 if large else args.steps,
            "sweep": [] if large else [m for m in args.sweep if m != args.microbatches and m >= world],
            "timelines": True}
    started = time.perf_counter()
    cfg = ranks.model_config(WORKLOADS[workload])  # both libraries get the split of these measured times
    spec["layer_costs"] = ranks.layer_costs(cfg, *ranks.fixed_batch(cfg, args.batch_size), args.microbatches)
    per_rank = run_processes(world, ranks.bench_rank, spec, timeout=3600)
    # (schedule, library) -> peak RSS per rank, each measured in fresh processes; two such runs at a time
    # (a peak does not depend on how the cores are shared; the timing above is done by then)
    runs = [(name, lib) for name in args.schedules for lib in ("pipetrain", "torch")
            if lib == "pipetrain" or name in ranks.TORCH_SCHEDULES]
    with ThreadPoolExecutor(2) as pool:
        peaks = pool.map(lambda run: run_processes(world, ranks.peak_memory_rank, spec, *run[::-1], timeout=3600),
                         runs)
        memory = {run: [peak[r] for r in range(world)] for run, peak in zip(runs, peaks, strict=True)}
    tokens = args.batch_size * WORKLOADS[workload]["seq_len"]
    rows = []
    for name in args.schedules:
        times = _blocks(per_rank, name, world)
        row = {"workload": workload, "ranks": world, "schedule": name, "microbatches": args.microbatches,
               "tokens_per_step": tokens,
               "single_process_step_time": statistics.median(times["single"]),
               "single_process_p_threads_step_time": statistics.median(times["single_p_threads"]),
               "bound": schedule_bound(name, world, args.microbatches)}
        for lib in ("pipetrain", "torch"):
            if lib in times:
                step = statistics.median(times[lib])
                row[lib] = {"step_time": step, "blocks": times[lib], "tokens_per_s": tokens / step,
                            "efficiency": _efficiency(times, lib, world),
                            "peak_memory_per_rank": memory[(name, lib)]}
        row["pipetrain"]["bubble_per_rank"] = [per_rank[r][name]["bubble"] for r in range(world)]
        row["speedup_vs_single_p_threads"] = statistics.median(
            s / p for p, s in zip(times["pipetrain"], times["single_p_threads"], strict=True))
        if "torch" in row:
            pairs = [t / p for p, t in zip(times["pipetrain"], times["torch"], strict=True)]
            row["speedup_vs_torch"] = statistics.median(pairs)  # per A/B pair, then the median
            row["max_speedup_vs_torch"] = row["bound"] / row["torch"]["efficiency"]
        row["timeline"] = per_rank[0][name]["timeline"]
        if row["timeline"]:
            row.update(timeline_figures(row["timeline"]))
        rows.append(row)
    sweep = {}  # efficiency per microbatch count, schedule and library (one block each), with the bound
    for m in [*spec["sweep"], args.microbatches]:
        for name in args.schedules:
            if m == args.microbatches:
                row = next(r for r in rows if r["schedule"] == name)
                effs = {lib: row[lib]["efficiency"] for lib in ("pipetrain", "torch") if lib in row}
            else:
                times = _blocks([per_rank[r]["sweep"][m] for r in range(world)], name, world)
                effs = {lib: _efficiency(times, lib, world) for lib in ("pipetrain", "torch") if lib in times}
            sweep.setdefault(name, {})[m] = {**effs, "bound": schedule_bound(name, world, m)}
    return {"rows": rows, "sweep": sweep, "seconds": time.perf_counter() - started,
            "settings": {k: spec[k] for k in ("warmup", "rounds", "steps", "sweep")}}


def _blocks(per_rank: list[dict], name: str, world: int) -> dict[str, list[float]]:
    """Per library, the block times of one schedule: the slowest rank's, block by block."""
    libs = per_rank[0][name]["times"]
    return {lib: [max(per_rank[r][name]["times"][lib][i] for r in range(world)) for i in range(len(libs[lib]))]
            for lib in libs}


def _efficiency(times: dict[str, list[float]], lib: str, world: int) -> float:
    """(single-process step / P) / pipeline step, per rotation round (both timed side by side), median."""
    return statistics.median(s / world / t for s, t in zip(times["single"], times[lib], strict=True))


def schedule_bound(name: str, world: int, microbatches: int) -> float:
    """The schedule's efficiency bound: 1 - its bubble, simulated with equal stages, B = 2F (I = W = F) and
    free communication. With per-rank compute no less than the single-process step / P (measured: equal),
    no runtime of this schedule can beat it; bound / torch's efficiency caps the speed-up over torch."""
    from pipetrain.schedule import build
    from pipetrain.schedule.simulate import Costs, simulate

    return 1.0 - simulate(build(name, num_ranks=world, num_microbatches=microbatches),
                          Costs(f=1.0, b=1.0, w=1.0)).bubble_fraction


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

    model = WORKLOADS[workload]
    if importlib.util.find_spec("jax") is None or model.get("family", "gpt") != "gpt":
        return None
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
             "1 thread per rank; medians of blocks rotating pipetrain, torch and the single-process baseline; "
             "efficiency = (single-process step / P) / step, per round; bound = 1 - the schedule's simulated "
             "bubble (equal stages, free communication); max speed-up = bound / torch's efficiency.", "",
             "| workload | P | schedule | pipetrain step | tokens/s | efficiency | bound | torch step | "
             "torch eff. | speed-up | max speed-up | peak RSS pt / torch (MiB, max rank) | "
             "pipetrain idle per rank | runtime overhead | sim. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for block in results["runs"]:
        for r in block["rows"]:
            p, t = r["pipetrain"], r.get("torch")
            mem = f"{max(p['peak_memory_per_rank']) / 2**20:.0f}"
            mem += f" / {max(t['peak_memory_per_rank']) / 2**20:.0f}" if t else " / —"
            torch_cols = (f"{t['step_time'] * 1e3:.0f} ms | {t['efficiency']:.3f} | {r['speedup_vs_torch']:.2f}× | "
                          f"{r['max_speedup_vs_torch']:.2f}× | " if t else "— | — | — | — | ")
            lines.append(
                f"| {r['workload']} | {r['ranks']} | {r['schedule']} | {p['step_time'] * 1e3:.0f} ms | "
                f"{p['tokens_per_s']:.0f} | {p['efficiency']:.3f} | {r['bound']:.3f} | " + torch_cols
                + f"{mem} | {' '.join(f'{b:.1%}' for b in p['bubble_per_rank'])} | "
                + (f"{r['runtime_overhead']:.1%} | {r['sim_error']:+.1%} |" if "sim_error" in r else "— | — |"))
        single = statistics.median(r["single_process_step_time"] for r in block["rows"])
        lines.append(f"| {block['rows'][0]['workload']} | 1 | single process (1 thread) | {single * 1e3:.0f} ms | "
                     f"{block['rows'][0]['tokens_per_step'] / single:.0f} | 1/P | | | | | | | | | |")
        first = block["rows"][0]
        threads = statistics.median(r["single_process_p_threads_step_time"] for r in block["rows"])
        lines.append(f"| {first['workload']} | 1 | single process ({first['ranks']} threads) | "
                     f"{threads * 1e3:.0f} ms | {first['tokens_per_step'] / threads:.0f} |" + " |" * 10)
    lines.append("")
    for block in results["runs"]:  # best against best: what each library's user would pick
        rows = block["rows"]
        ours = max(rows, key=lambda r: r["pipetrain"]["efficiency"])
        theirs = [r for r in rows if "torch" in r]
        line = (f"Best schedules, {rows[0]['workload']} on {rows[0]['ranks']} ranks: pipetrain {ours['schedule']} "
                f"(efficiency {ours['pipetrain']['efficiency']:.3f}, "
                f"{ours['pipetrain']['efficiency'] * rows[0]['ranks']:.2f}x one process on 1 thread, "
                f"{ours['speedup_vs_single_p_threads']:.2f}x one process on {rows[0]['ranks']} threads)")
        if theirs:
            best = max(theirs, key=lambda r: r["torch"]["efficiency"])
            line += (f", torch {best['schedule']} ({best['torch']['efficiency']:.3f}): "
                     f"{best['torch']['step_time'] / ours['pipetrain']['step_time']:.2f}x torch's best")
        lines.append(line + ".")
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


def draw_efficiency(results: dict, out: Path) -> list[str]:
    """Per workload and rank count: efficiency vs microbatches, one panel per schedule (pipetrain, torch,
    the schedule's bound)."""
    try:
        from pipetrain.viz import _pyplot
        plt = _pyplot()
    except ImportError:
        return []
    written = []
    for block in results["runs"]:
        sweep = block["sweep"]
        if len(next(iter(sweep.values()))) < 2:
            continue
        names = list(sweep)
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
        for ax, name in zip(axes.flat, names, strict=False):
            ms = sorted(sweep[name], key=int)
            for key, style in (("bound", dict(color="0.6", ls=":", label="bound (simulated)")),
                               ("torch", dict(color="tab:orange", marker="s", label="torch.distributed.pipelining")),
                               ("pipetrain", dict(color="tab:blue", marker="o", label="pipetrain"))):
                points = [(int(m), sweep[name][m][key]) for m in ms if key in sweep[name][m]]
                if points:
                    ax.plot(*zip(*points, strict=True), **style)
            ax.set_title(name)
            ax.set_xscale("log", base=2)
            ax.set_xticks([int(m) for m in ms], [str(m) for m in ms])
            ax.set_xlabel("microbatches")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("efficiency")
        first = block["rows"][0]
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
        fig.suptitle(f"Pipeline efficiency vs microbatches: {first['workload']}, {first['ranks']} CPU ranks, "
                     f"batch {results['batch_size']}")
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        path = out / f"efficiency_{first['workload']}_p{first['ranks']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


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
    p.add_argument("--quick", action="store_true", help="gpt-8x256 on 2 ranks only, fewer blocks (~6 minutes)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    p.add_argument("--ranks", nargs="+", type=int, default=None)
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=SCHEDULES)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--sweep", nargs="*", type=int, default=[4, 16],
                   help="extra microbatch counts for the efficiency curve (one block each; not for gpt-16x512)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None, help="A/B rounds (blocks per library)")
    p.add_argument("--steps", type=int, default=None, help="steps per block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-jax", action="store_true", help="skip the JAX comparison even when jax is installed")
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
            if world == 2 and "gpipe" in args.schedules and not args.no_jax:  # the JAX pipeline uses 2 host devices
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
    pictures = draw_timelines(results, out) + draw_efficiency(results, out)
    print("\n" + table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(pictures)} pictures")
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
