"""Regenerate the schedule pictures and the bubble table in the README: `python docs/make_figures.py`."""

from pathlib import Path

import pipetrain as pt
from pipetrain import viz

OUT = Path(__file__).parent / "schedules"
SIZES = [(2, 8), (4, 8), (4, 16), (8, 32)]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name in pt.schedules.names():
        sched = pt.schedules.build(name, num_ranks=4, num_microbatches=8)
        split = any(a.op is pt.Op.W for acts in sched.actions for a in acts)
        costs = pt.Costs(f=1.0, b=1.0, w=1.0) if split else pt.Costs(f=1.0, b=2.0, w=0.0)
        viz.save(pt.simulate(sched, costs).timeline, OUT / f"{name}.png",
                 title=f"{name}: 4 ranks, 8 microbatches, {sched.stages_per_rank} stage(s) per rank")
    print("| schedule | stages per rank | " + " | ".join(f"P={p}, M={m}" for p, m in SIZES) + " | peak activations (P=4, M=8) |")
    print("|---|---|" + "---|" * len(SIZES) + "---|")
    for name in pt.schedules.names():
        cells, peak, per_rank = [], "", 1
        for p, m in SIZES:
            sched = pt.schedules.build(name, num_ranks=p, num_microbatches=m)
            res = pt.simulate(sched, pt.Costs(f=1.0, b=1.0, w=1.0))
            cells.append(f"{res.bubble_fraction:.3f}")
            per_rank = sched.stages_per_rank
            if (p, m) == (4, 8):
                peak = ", ".join(str(s.peak_activations) for s in res.per_rank)
        print(f"| {name} | {per_rank} | " + " | ".join(cells) + f" | {peak} |")


if __name__ == "__main__":
    main()
