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

from .actions import Action, Op, Value, consumes, produces
from .base import Schedule, ScheduleError
from .placement import looped, vshape
from .registry import register
from .simulate import Costs, simulate
from .timeline import peak_activations
from .zero_bubble import zb_h1, zbv


def _sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank not in (1, 2):
        raise ValueError(f"zb-auto places one stage per rank or two in a V; got stages_per_rank={stages_per_rank}")


@register("zb-auto", listing=7, sizes=_sizes)
def zb_auto(num_ranks: int, num_microbatches: int, stages_per_rank: int = 1, *, costs: Costs | None = None,
            memory_limit: float | None = None) -> Schedule:
    """The fastest schedule the search finds for `costs` (unit costs if None) within `memory_limit`
    (microbatches of all a rank's layers; default P). One stage per rank, or two folded in a V."""
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
    done: dict[Value, float] = {}  # value -> the time it is ready on its own rank
    clock, held = [0.0] * P, [0] * P  # held: activations alive plus places reserved for them
    left = [3 * M * len(stages) for stages in stages_of]
    acts: list[list[Action]] = [[] for _ in range(P)]
    parked: set[int] = set()  # ranks waiting at the earliest clock for another rank to act first

    inputs = {op: [[consumes(Action(s, op, m), S) for m in range(M)] for s in range(S)] for op in (Op.F, Op.I)}

    def ready(op: Op, s: int, m: int, r: int) -> float | None:
        """When the inputs of `{s}{op}{m}` (`consumes`) have all arrived on rank r (a transfer between ranks
        takes `comm`), or None while one is not computed yet."""
        at = 0.0
        for value in inputs[op][s][m]:
            t = done.get(value)
            if t is None:
                return None
            at = max(at, t + costs.comm if placement[value.stage] != r else t)
        return at

    def ready_f(s: int, r: int) -> float | None:
        m = next_f[s]
        if m >= M or (s == entry[r] and held[r] + len(stages_of[r]) > cap):
            return None
        return ready(Op.F, s, m, r)

    def ready_i(s: int, r: int) -> float | None:
        return ready(Op.I, s, next_i[s], r) if next_i[s] < M else None

    while any(left):
        free = [q for q in range(P) if left[q] and q not in parked]
        if not free:  # (cannot happen: every rank can always finish what it started; a bug if it does)
            raise ScheduleError(f"zb-auto's list scheduler is stuck with every rank waiting (last actions per rank: "
                                f"{[[str(a) for a in acts_of[-2:]] for acts_of in acts]}); please report this "
                                "with the costs and sizes that caused it")
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
        done[produces(action)] = now + costs.of(action)
        if action.op is Op.F:
            next_f[s] += 1
            held[r] += len(stages_of[r]) if s == entry[r] else 0
        elif action.op is Op.I:
            next_i[s] += 1
            owed_w[s].append(m)
        else:
            owed_w[s].popleft()
            held[r] -= 1
        clock[r] = now + costs.of(action)
        acts[r].append(action)
        left[r] -= 1
        parked.clear()
    return acts
