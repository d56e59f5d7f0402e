"""Regenerate the golden schedule files: `python tests/regen_golden.py` (or `make golden`)."""

from pathlib import Path

import pipetrain.schedule as S

GOLDEN = Path(__file__).parent / "golden"
SIZES = {"gpipe": [(2, 4), (4, 8), (3, 2)], "1f1b": [(2, 4), (4, 8), (3, 5)]}


def golden_cases():
    for name, sizes in SIZES.items():
        for ranks, mbs in sizes:
            yield name, ranks, mbs, GOLDEN / f"{name}_r{ranks}_m{mbs}.csv"


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, ranks, mbs, path in golden_cases():
        sched = S.build(name, num_ranks=ranks, num_microbatches=mbs)
        S.save_csv(sched, path)
        S.save_csv(S.lower(sched), path.with_suffix(".lowered.csv"))
        print("wrote", path)


if __name__ == "__main__":
    main()
