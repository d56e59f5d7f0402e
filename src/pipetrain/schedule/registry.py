"""Schedules by name: `names()`, `build(name, num_ranks=, num_microbatches=, stages_per_rank=, **options)`, and
which sizes each takes (`refusal`), asked without building (the planner searches thousands of sizes)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .base import Schedule

Generator = Callable[..., Schedule]
Sizes = Callable[[int, int, int], None]  # (num_ranks, num_microbatches, stages_per_rank): raises ValueError if refused
_GENERATORS: dict[str, Generator] = {}
_SIZES: dict[str, Sizes] = {}
_DEFAULT_V: dict[str, int] = {}
_LISTING: dict[str, float] = {}
_OPTIONS: dict[str, frozenset[str]] = {}  # the keyword-only options a generator takes (zb-auto: costs, ...)


def register(name: str, *, listing: float = 100.0, sizes: Sizes | None = None) -> Callable[[Generator], Generator]:
    """Register a generator `fn(num_ranks, num_microbatches, stages_per_rank=default, *, option=...) -> Schedule`.

    `listing` orders `names()` (lower first; ties in registration order). Keyword-only parameters are the
    generator's options, passed through `build`. `sizes(num_ranks, num_microbatches, stages_per_rank)` raises
    ValueError, naming the fix, for sizes the generator cannot build; `build` calls it first, and the
    planner and `refusal` call it alone."""

    def deco(fn: Generator) -> Generator:
        if name in _GENERATORS:
            raise ValueError(f"schedule {name!r} is already registered")
        _GENERATORS[name] = fn
        _LISTING[name] = listing
        parameters = inspect.signature(fn).parameters
        _OPTIONS[name] = frozenset(p.name for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        _DEFAULT_V[name] = parameters["stages_per_rank"].default
        _SIZES[name] = sizes or (lambda num_ranks, num_microbatches, stages_per_rank: None)
        return fn

    return deco


def names() -> list[str]:
    """Registered schedule names: the classic ones first, then the rest in registration order."""
    return sorted(_GENERATORS, key=lambda n: _LISTING[n])


def default_stages_per_rank(name: str) -> int:
    """The stages per rank a schedule places when `build` is not told."""
    _known(name)
    return _DEFAULT_V[name]


def refusal(name: str, *, num_ranks: int, num_microbatches: int, stages_per_rank: int | None = None) -> str | None:
    """Why `build(name, ...)` would refuse these sizes (its message), or None if it takes them. Cheap: nothing
    is built."""
    _known(name)
    try:
        _SIZES[name](num_ranks, num_microbatches, _DEFAULT_V[name] if stages_per_rank is None else stages_per_rank)
    except ValueError as err:
        return str(err)
    return None


def _known(name: str) -> None:
    if name not in _GENERATORS:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(names())}")


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

    _known(name)
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
    stages_per_rank = _DEFAULT_V[name] if stages_per_rank is None else stages_per_rank
    _SIZES[name](num_ranks, num_microbatches, stages_per_rank)
    schedule = _GENERATORS[name](num_ranks, num_microbatches, stages_per_rank, **options)
    if check_schedule:
        check(schedule)
    return schedule
