"""Schedules by name: `names()` and `build(name, num_ranks=, num_microbatches=, stages_per_rank=, **options)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .base import Schedule

Generator = Callable[..., Schedule]
_GENERATORS: dict[str, Generator] = {}
_LISTING: dict[str, float] = {}
_OPTIONS: dict[str, frozenset[str]] = {}  # the keyword-only options a generator takes (zb-auto: costs, ...)


def register(name: str, *, listing: float = 100.0) -> Callable[[Generator], Generator]:
    """Register a generator `fn(num_ranks, num_microbatches, stages_per_rank, *, option=...) -> Schedule`.

    `listing` orders `names()` (lower first; ties in registration order). Keyword-only parameters are the
    generator's options, passed through `build`."""

    def deco(fn: Generator) -> Generator:
        if name in _GENERATORS:
            raise ValueError(f"schedule {name!r} is already registered")
        _GENERATORS[name] = fn
        _LISTING[name] = listing
        _OPTIONS[name] = frozenset(p.name for p in inspect.signature(fn).parameters.values()
                                   if p.kind is inspect.Parameter.KEYWORD_ONLY)
        return fn

    return deco


def names() -> list[str]:
    """Registered schedule names: the classic ones first, then the rest in registration order."""
    return sorted(_GENERATORS, key=lambda n: _LISTING[n])


def options(name: str) -> frozenset[str]:
    """The options `build` passes to a schedule's generator (empty for the fixed ones)."""
    return _OPTIONS[name]


def build(name: str, *, num_ranks: int, num_microbatches: int, stages_per_rank: int | None = None,
          check_schedule: bool = True, **options) -> Schedule:
    """Generate a schedule by name and verify it with `check` before returning it.

    `stages_per_rank=None` takes the schedule's own default (1 for gpipe/1f1b/zb-h1, 2 for the others).
    `check_schedule=False` skips the verification (the planner simulates thousands of registered,
    tested schedules; anything that runs them goes through `check` again).
    `options` go to generators that take them: `zb-auto` takes `costs=` (a `Costs`) and `memory_limit=`.
    """
    from .check import check

    if name not in _GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(names())}")
    sizes = [("num_ranks", num_ranks), ("num_microbatches", num_microbatches)]
    if stages_per_rank is not None:
        sizes.append(("stages_per_rank", stages_per_rank))
    for label, value in sizes:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        takes = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise ValueError(f"schedule {name!r} does not take {', '.join(unknown)} (its options: {takes}); "
                         f"schedules with options: {', '.join(n for n in names() if _OPTIONS[n])}")
    generator = _GENERATORS[name]
    schedule = (generator(num_ranks, num_microbatches, **options) if stages_per_rank is None
                else generator(num_ranks, num_microbatches, stages_per_rank, **options))
    if check_schedule:
        check(schedule)
    return schedule
