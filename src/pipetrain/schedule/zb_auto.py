"""zb-auto: a zero-bubble schedule built for measured costs (the zero-bubble paper's automatic scheduler, in
the form of a list scheduler searched over a few knobs).

    sched = build("zb-auto", num_ranks=4, num_microbatches=8, costs=Costs(f=[...], b=[...], w=[...], comm=0.1),
                  memory_limit=4)

A list scheduler plays the step on the model clock of `simulate`: whenever a rank is free it runs, among
the actions whose inputs have arrived, an I (the backward chain is the critical path), else an F if the
rank's activations in flight stay under the cap, else a W (a deferred weight gradient fills what would be a
bubble), else it waits for the next arrival. Knobs searched: the cap (the limit, and one less: a rank that
holds less can start its backward sooner), F before I when both are ready, and whether a W may fill a gap
shorter than itself (on 150 random uneven cases, searching every lower cap too found nothing faster). The
fastest simulated result wins; the hand-written zero-bubble schedule of the same placement (zb-h1, zbv)
competes too, so zb-auto is never slower than it under the same memory.
Everything is then checked like every other schedule.

Memory is counted as the simulator counts it: a (stage, microbatch) activation lives from its F to its W.
`memory_limit` is in microbatches of all a rank's layers (as `Pipeline(memory_limit=)`); the default is
1F1B's, P. A microbatch entering a rank reserves a place for each of the rank's stages it will visit, so a
full rank can always finish what it started.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from .actions import Action, Op
from .base import Schedule
from .placement import looped, vshape
from .registry import register
from .simulate import Costs, simulate
from .timeline import peak_activations
from .zero_bubble import zb_h1, zbv


@register("zb-auto", listing=7)
def zb_auto(num_ranks: int, num_microbatches: int, stages_per_rank: int = 1, *, costs: Costs | None = None,
            memory_limit: float | None = None) -> Schedule:
    """The fastest schedule the search finds for `costs` (unit costs if None) within `memory_limit`
    (microbatches of all a rank's layers; default P). One stage per rank, or two folded in a V."""
    if stages_per_rank not in (1, 2):
        raise ValueError(f"zb-auto places one stage per rank or two in a V; got stages_per_rank={stages_per_rank}")
    P, M, V = num_ranks, num_microbatches, stages_per_rank
    placement = looped(P) if V == 1 else vshape(P)
    costs = _checked_costs(costs or Costs(), len(placement))
    limit = P if memory_limit is None else memory_limit
    cap = math.floor(limit * V + 1e-9)  # in (stage, microbatch) activations
    if cap < V:
        raise ValueError(f"memory_limit={memory_limit} is below one microbatch through the rank's {V} stage(s); "
                         "zb-auto needs memory_limit >= 1")
    tried = [_list_schedule(P, M, placement, costs, c, f_first, fill_any)
             for c in sorted({cap, max(cap - 1, V)}) for f_first in (False, True) for fill_any in (True, False)]
    hand = zb_h1(P, M) if V == 1 else zbv(P, M)
    if max(peak_activations(list(acts)) for acts in hand.actions) <= cap:
        tried.append(hand.actions)
    best = min(tried, key=lambda acts: simulate(Schedule("zb-auto", P, M, V, placement, acts), costs).step_time)
    return Schedule("zb-auto", P, M, V, placement, best)


def _checked_costs(costs: Costs, num_stages: int) -> Costs:
    for label in ("f", "b", "w"):
        value = getattr(costs, label)
        values = [value] if isinstance(value, int | float) else list(value)
        if not isinstance(value, int | float) and len(values) != num_stages:
            raise ValueError(f"costs.{label} has {len(values)} entries for {num_stages} stages: give one per stage "
                             "(or one number for all)")
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"costs.{label} must be finite and >= 0, got {value!r}")
    if not math.isfinite(costs.comm) or costs.comm < 0:
        raise ValueError(f"costs.comm must be finite and >= 0, got {costs.comm!r}")
    return costs


def _list_schedule(P: int, M: int, placement: Sequence[int], costs: Costs, cap: int, f_first: bool,
                   fill_any: bool) -> list[list[Action]]:
    """One list-scheduling pass (see the module docstring); returns the compute actions per rank."""
    S = len(placement)
    stages_of = [[s for s in range(S) if placement[s] == r] for r in range(P)]
    entry = [min(stages) for stages in stages_of]  # where a microbatch enters each rank
    next_f, next_i = [0] * S, [0] * S
    owed_w: list[deque[int]] = [deque() for _ in range(S)]
    done: dict[tuple[str, int, int], float] = {}  # value -> the time it is ready on its own rank
    clock, held = [0.0] * P, [0] * P  # held: activations alive plus places reserved for them
    left = [3 * M * len(stages) for stages in stages_of]
    acts: list[list[Action]] = [[] for _ in range(P)]
    parked: set[int] = set()  # ranks waiting at the earliest clock for another rank to act first

    def arrival(value: tuple[str, int, int], rank: int) -> float | None:
        if value not in done:
            return None
        return done[value] + (costs.comm if placement[value[1]] != rank else 0.0)

    def ready_f(s: int, r: int) -> float | None:
        m = next_f[s]
        if m >= M or (s == entry[r] and held[r] + len(stages_of[r]) > cap):
            return None
        return 0.0 if s == 0 else arrival(("act", s - 1, m), r)

    def ready_i(s: int, r: int) -> float | None:
        m = next_i[s]
        if m >= next_f[s]:
            return None
        own = done[("act", s, m)]
        if s == S - 1:
            return own
        grad = arrival(("grad", s + 1, m), r)
        return None if grad is None else max(own, grad)

    while any(left):
        free = [q for q in range(P) if left[q] and q not in parked]
        if not free:
            raise AssertionError(f"zb-auto's list scheduler is stuck: {[a[-2:] for a in acts]}")
        r = min(free, key=lambda q: clock[q])
        now = clock[r]
        fs = [(t, -s, s) for s in stages_of[r] if (t := ready_f(s, r)) is not None]
        is_ = [(t, -s, s) for s in stages_of[r] if (t := ready_i(s, r)) is not None]
        f_now = [s for t, _, s in sorted(fs) if t <= now]
        i_now = [s for t, _, s in sorted(is_) if t <= now]
        owed = [s for s in stages_of[r] if owed_w[s]]
        later = [t for t, _, _ in fs + is_ if t > now]
        if i_now and not (f_first and f_now):
            action = Action(i_now[0], Op.I, next_i[i_now[0]])
        elif f_now:
            action = Action(f_now[0], Op.F, next_f[f_now[0]])
        elif owed and (fill_any or not later or min(later) - now >= costs.of(Action(owed[0], Op.W, 0))):
            action = Action(owed[0], Op.W, owed_w[owed[0]][0])
        else:  # nothing to do before the next arrival, or before another rank may produce one
            others = [clock[q] for q in range(P) if q != r and left[q] and clock[q] > now]
            if later or others:
                clock[r] = min(later + others)
            else:
                parked.add(r)
            continue
        s, m = action.stage, action.mb
        if action.op is Op.F:
            next_f[s] += 1
            held[r] += len(stages_of[r]) if s == entry[r] else 0
            done[("act", s, m)] = now + costs.of(action)
        elif action.op is Op.I:
            next_i[s] += 1
            owed_w[s].append(m)
            done[("grad", s, m)] = now + costs.of(action)
        else:
            owed_w[s].popleft()
            held[r] -= 1
        clock[r] = now + costs.of(action)
        acts[r].append(action)
        left[r] -= 1
        parked.clear()
    return acts
