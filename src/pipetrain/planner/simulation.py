"""The planner's schedules: each plan's simulated (short runs extended exactly) or, to screen candidates,
estimated from a short uniform simulation at up to 8 ranks; the registered schedules built and placed."""

from __future__ import annotations

import math
from functools import cache

from ..schedule import Costs, build, simulate, with_vocabulary
from ..schedule.placement import looped, vshape
from ..schedule.registry import options, refusal


@cache
def _placement(schedule: str, pp: int, v: int) -> tuple[int, ...]:
    """The schedule's stage -> rank placement on `pp` ranks: read off the registered generator at up to 8
    ranks (looped or a V), so that screening costs nothing per size."""
    small = min(pp, 8)
    built = _build(schedule, small, _accepted(schedule, small, v, small), v, None)
    for kind in (looped(small, v), vshape(small) if v == 2 else None):
        if built.stage_to_rank == kind:
            return looped(pp, v) if kind == looped(small, v) else vshape(pp)
    raise ValueError(f"schedule {schedule!r} places its stages neither looped nor in a V "
                     f"({list(built.stage_to_rank)}); the planner screens those two placements only")


def _build(schedule: str, pp: int, m: int, v: int, costs: Costs | None):
    """A registered schedule, unchecked (registered schedules are tested; the runtime checks what it runs);
    one built from costs (zb-auto) is built for `costs`."""
    extra = {"costs": costs} if costs is not None and "costs" in options(schedule) else {}
    return build(schedule, num_ranks=pp, num_microbatches=m, stages_per_rank=v, check_schedule=False, **extra)


# --- the schedule: simulated (exact) or estimated from a short simulation (screening) ---------------
_SCREEN_CACHE: dict = {}


def _short_m(p: int, v: int, m: int) -> tuple[int, int]:
    """Two microbatch counts, both with a full pipeline, to extend the step time linearly to `m`."""
    base = max(2 * p, 8) if v == 1 else max(3 * p, 8)  # a V's steady state starts later (zbv: from 3p at p = 4)
    step = max(p, 4)
    if m <= base + step:
        return m, m
    return base, base + step


def _simulate(c, costs: Costs) -> tuple[float, float, float]:
    m0, m1 = _short_m(c.pp, c.v, c.m)
    results = []
    for m in sorted({m0, m1}):
        built = _build(c.schedule, c.pp, m, c.v, costs)
        results.append((m, simulate(with_vocabulary(built, costs, delays=(0,)) if c.vocab else built, costs)))
    (ma, ra), (mb, rb) = results[0], results[-1]

    def slope(value) -> float:
        return (value(rb) - value(ra)) / (mb - ma) if mb != ma else 0.0

    def extend(value, at_least: float = 0.0) -> float:  # affine in the microbatch count, from the short runs
        return value(rb) + (c.m - mb) * max(slope(value), at_least)

    # in the steady state each microbatch adds at least the busiest rank's work to the step: with uneven
    # stages that rank may only become the bottleneck after the short runs
    busiest = max(slope(lambda r, i=i: r.per_rank[i].busy_time) for i in range(len(rb.per_rank)))
    step = extend(lambda r: r.step_time, busiest)
    busy = extend(lambda r: max(s.busy_time for s in r.per_rank))
    peak = extend(lambda r: max(s.peak_activations for s in r.per_rank))
    return step, 1.0 - busy / step, peak


def _screen(c, f: float, b: float, w: float, comm: float) -> tuple[float, float, float]:
    """Like _simulate, with uniform stage costs and at most 8 ranks: the part of the step beyond the
    work grows linearly with the ranks; measured at a short pipeline, scaled to `pp`. The cost ratios are
    rounded to 2 decimals, so that layouts alike share one simulation (the plans kept are simulated in full);
    with vocabulary parallelism, whose collectives spread the transfer's ratio over decades, to 1 decimal and
    the transfer's to a quarter of a power of two."""
    every = _holds_every_microbatch(c.schedule, c.v)
    p = min(c.pp, 8)
    if c.vocab:
        ratios = (round(b / f, 1), round(w / f, 1), 2 ** (round(4 * math.log2(max(comm / f, 1e-3))) / 4))
    else:
        ratios = (round(b / f, 2), round(w / f, 2), round(comm / f, 2))
    key = (c.schedule, p, c.v, *ratios)
    if key not in _SCREEN_CACHE:
        m = _accepted(c.schedule, p, c.v, max(2 * p, 4) * 2)
        unit = Costs(f=1.0, b=ratios[0], w=ratios[1], comm=ratios[2])
        r = simulate(_screening_schedule(c.schedule, p, m, c.v), unit)
        work = m * c.v * (1.0 + ratios[0] + ratios[1])
        peak = max(s.peak_activations for s in r.per_rank)
        _SCREEN_CACHE[key] = (m, (r.step_time - work), peak)
    m, extra, peak = _SCREEN_CACHE[key]
    work = c.m * c.v * (f + b + w)
    scale = (c.pp - 1) / (p - 1) if p > 1 else 0.0
    step = work + extra * f * scale
    peak = peak * c.m / m if every else peak * c.pp / p
    return step, 1.0 - work / step, peak


@cache
def _screening_schedule(schedule: str, pp: int, m: int, v: int):
    """The schedule screening simulates, one per size: one built from costs (zb-auto) is built for unit costs
    here (a proxy; the plans kept are built for their own costs)."""
    return _build(schedule, pp, m, v, None)


@cache
def _holds_every_microbatch(schedule: str, v: int) -> bool:
    """Whether a schedule keeps every microbatch's activations at once (GPipe, looped BFS): then its peak
    grows with the microbatch count (the others' with the ranks)."""
    m = _accepted(schedule, 2, v, 8)
    return max(r.peak_activations for r in simulate(_build(schedule, 2, m, v, None)).per_rank) >= m


def _accepted(schedule: str, pp: int, v: int, m: int) -> int:
    """The least of m, 2m, 4m, ... that the schedule takes on `pp` ranks (counts below it may be refused)."""
    while refusal(schedule, num_ranks=pp, num_microbatches=m, stages_per_rank=v):
        m *= 2
    return m
