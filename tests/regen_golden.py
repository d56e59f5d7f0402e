"""Regenerate the golden schedule files: `python tests/regen_golden.py` (or `make golden`)."""

from pathlib import Path

import pipetrain.schedule as S

GOLDEN = Path(__file__).parent / "golden"
# (ranks, microbatches, stages per rank) for each schedule
SIZES = {
    "gpipe": [(2, 4, 1), (4, 8, 1), (3, 2, 1)],
    "1f1b": [(2, 4, 1), (4, 8, 1), (3, 5, 1)],
    "interleaved-1f1b": [(2, 4, 2), (4, 8, 2), (3, 7, 3)],
    "looped-bfs": [(2, 3, 2), (4, 8, 2)],
    "zb-h1": [(2, 4, 1), (4, 8, 1), (3, 5, 1)],
    "zbv": [(2, 4, 2), (4, 8, 2), (3, 4, 2)],
    "dualpipev": [(2, 4, 2), (4, 8, 2), (3, 7, 2)],
    "zb-auto": [(2, 4, 1), (4, 8, 1), (2, 4, 2), (4, 8, 2)],  # built for equal costs
}


def golden_cases():
    for name, sizes in SIZES.items():
        for ranks, mbs, per_rank in sizes:
            yield name, ranks, mbs, per_rank, GOLDEN / f"{name}_r{ranks}_m{mbs}_v{per_rank}.csv"


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for old in GOLDEN.glob("*.csv"):
        old.unlink()
    for name, ranks, mbs, per_rank, path in golden_cases():
        sched = S.build(name, num_ranks=ranks, num_microbatches=mbs, stages_per_rank=per_rank)
        S.save_csv(sched, path)
        S.save_csv(S.lower(sched), path.with_suffix(".lowered.csv"))
        print("wrote", path)


if __name__ == "__main__":
    main()
