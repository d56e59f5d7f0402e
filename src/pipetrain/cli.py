"""The `pipetrain` command line: `simulate` and `compare` (train, plan and bench arrive with their issues)."""

from __future__ import annotations

import argparse
import json
import sys

from . import schedule as schedules
from .schedule import Costs, format_table, format_timeline, simulate


def _simulate(args: argparse.Namespace) -> int:
    try:
        sched = schedules.build(args.schedule, num_ranks=args.ranks, num_microbatches=args.microbatches,
                                stages_per_rank=args.stages_per_rank)
    except ValueError as err:
        print(f"pipetrain simulate: {err}", file=sys.stderr)
        return 2
    result = simulate(sched, Costs(f=args.cost_f, b=args.cost_b, w=args.cost_w, comm=args.cost_comm))
    title = f"{args.schedule}: {sched.num_ranks} ranks, {sched.num_microbatches} microbatches"
    if args.png:
        from .viz import save

        save(result.timeline, args.png, title=title)
    if args.trace:
        from .schedule import save_chrome_trace

        save_chrome_trace(result.timeline, args.trace, time_unit=1e-3)  # one cost unit drawn as 1 ms
    if args.json:
        print(json.dumps({
            "schedule": args.schedule, "ranks": args.ranks, "microbatches": args.microbatches,
            "stages_per_rank": sched.stages_per_rank, "step_time": result.step_time,
            "bubble_fraction": result.bubble_fraction,
            "per_rank": [{"rank": s.rank, "busy_time": s.busy_time, "bubble_fraction": s.bubble_fraction,
                          "peak_activations": s.peak_activations} for s in result.per_rank],
        }))
        return 0
    print(format_table(sched))
    print()
    unit = min(c for c in (args.cost_f, args.cost_b, args.cost_w) if c > 0)
    print(format_timeline(result.timeline, unit=unit))
    print(f"\nstep time {result.step_time:g}, bubble fraction {result.bubble_fraction:.4f}")
    for s in result.per_rank:
        print(f"  rank {s.rank}: busy {s.busy_time:g}, bubble {s.bubble_fraction:.4f}, "
              f"peak activations {s.peak_activations}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .schedule import load_timeline
    from .schedule.compare import compare

    timeline, sched = load_timeline(args.timeline)
    if sched is None:
        print(f"pipetrain compare: {args.timeline} holds no schedule; write it with save_timeline(..., schedule)",
              file=sys.stderr)
        return 2
    result = compare(sched, timeline)
    print(f"{sched.name}: {sched.num_ranks} ranks, {sched.num_microbatches} microbatches")
    print(result.report())
    if args.png:
        from .viz import save_comparison

        save_comparison(result.predicted.timeline, result.measured, args.png, title=sched.name)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate a schedule: step time, bubble, peak activations")
    sim.add_argument("--schedule", required=True, choices=schedules.names())
    sim.add_argument("--ranks", type=_positive_int, required=True)
    sim.add_argument("--microbatches", type=_positive_int, required=True)
    sim.add_argument("--stages-per-rank", type=_positive_int, default=None,
                     help="stages each rank holds (default: the schedule's own, 1 or 2)")
    sim.add_argument("--cost-f", type=_non_negative, default=1.0, help="forward time per stage and microbatch")
    sim.add_argument("--cost-b", type=_non_negative, default=1.0, help="input-gradient (I) time")
    sim.add_argument("--cost-w", type=_non_negative, default=1.0, help="weight-gradient (W) time; B = b + w")
    sim.add_argument("--cost-comm", type=_non_negative, default=0.0, help="one stage-to-stage transfer")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument("--png", metavar="FILE", help="draw the timeline (.png or .svg; needs matplotlib)")
    sim.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (one cost unit = 1 ms)")
    sim.set_defaults(func=_simulate)
    cmp = sub.add_parser("compare", help="simulated vs measured step for a measured timeline (JSON)")
    cmp.add_argument("timeline", help="a timeline JSON written by the example's --trace-dir or save_timeline")
    cmp.add_argument("--png", metavar="FILE", help="draw simulated above measured (.png or .svg)")
    cmp.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
