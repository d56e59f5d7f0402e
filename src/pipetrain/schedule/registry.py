"""Schedules by name: `names()` and `build(name, num_ranks=, num_microbatches=, stages_per_rank=)`."""

from __future__ import annotations

from collections.abc import Callable

from .base import Schedule

Generator = Callable[[int, int, int], Schedule]
_GENERATORS: dict[str, Generator] = {}


def register(name: str) -> Callable[[Generator], Generator]:
    """Register a generator `fn(num_ranks, num_microbatches, stages_per_rank) -> Schedule`."""

    def deco(fn: Generator) -> Generator:
        if name in _GENERATORS:
            raise ValueError(f"schedule {name!r} is already registered")
        _GENERATORS[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Registered schedule names, in registration order."""
    return list(_GENERATORS)


def build(name: str, *, num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """Generate a schedule by name and verify it with `check` before returning it."""
    from .check import check

    if name not in _GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(names())}")
    for label, value in (("num_ranks", num_ranks), ("num_microbatches", num_microbatches),
                         ("stages_per_rank", stages_per_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    schedule = _GENERATORS[name](num_ranks, num_microbatches, stages_per_rank)
    check(schedule)
    return schedule
