"""Choosing a schedule from measured costs: every registered schedule, at every stages-per-rank it accepts,
on the best split of the measured layers, simulated; the fastest first.

    ranked = rank_schedules(num_ranks=2, num_microbatches=8, layer_costs=[(f, i, w), ...], comm=0.001)
    ranked[0].schedule, ranked[0].balance      # what to run and how to split the layers

Each layer's cost is (F, I, W) seconds for one microbatch (a schedule without W runs B = I + W). Each
schedule is simulated on two splits of F + I + W for its placement, and keeps the faster: the one that
evens out the ranks (`rank_partition`: an uneven model such as a heavy output head) and the one that evens
out the stages (`partition`: where a rank holds several stages, a lopsided stage lengthens the chain
through them even when the ranks' totals are even, e.g. a V split 5 | 2 | 2 | 1 layers); `comm` is one
stage-to-stage transfer. `zb-auto` is built for those very costs, within `memory_limit` (or, without one,
at 1F1B's memory P and at 2P). Memory:
`peak_microbatches` is the most activations a rank holds at once, in microbatches of all its layers (a V
schedule's stage holds half a rank's layers); `memory_limit` drops the candidates above it.

With `projection` (the share of the last layer's F, I and W that is its output projection, which vocabulary
parallelism splits over every rank), each schedule is also simulated that way: the last layer without the
projection, each rank's S (1/P of the projection's F) and T (1/P of its I + W) placed by `with_vocabulary`
(the candidate's schedule holds them, and `vocab_parallel` says so); the E and G lookups cost nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import Schedule
from .partition import candidate_splits, stage_costs
from .registry import build, names, options, refusal
from .simulate import Costs, simulate
from .vocabulary import with_vocabulary


@dataclass(frozen=True)
class Candidate:
    name: str
    stages_per_rank: int
    balance: tuple[int, ...]  # layers per stage
    step_time: float  # simulated, seconds
    bubble_fraction: float
    peak_microbatches: float  # the most a rank holds at once, in microbatches of all its layers
    schedule: Schedule = field(repr=False, compare=False)  # the schedule itself, ready to run
    vocab_parallel: bool = False  # the projection split over every rank (the schedule holds the passes)

    def describe(self) -> str:
        vocabulary = ", vocabulary parallel" if self.vocab_parallel else ""
        return (f"{self.name}{vocabulary} (stages per rank {self.stages_per_rank}, balance {list(self.balance)}): step "
                f"{self.step_time * 1e3:.1f} ms, bubble {self.bubble_fraction:.1%}, peak {self.peak_microbatches:g} "
                "microbatches")


def rank_schedules(*, num_ranks: int, num_microbatches: int, layer_costs: Sequence[tuple[float, float, float]],
                   comm: float = 0.0, memory_limit: float | None = None, schedules: Sequence[str] | None = None,
                   max_stages_per_rank: int = 4, projection: float | None = None,
                   whole: bool = True) -> list[Candidate]:
    """Every schedule that can run these sizes, simulated with the measured costs, fastest first (ties: the
    one holding less, then the registry's order); with `projection`, each also with vocabulary parallelism (and
    only so with `whole=False`). Raises ValueError if none fits."""
    if not layer_costs:
        raise ValueError("layer_costs is empty: measure at least one layer")
    found = []
    if projection is not None:
        *rest, (f, i, w) = layer_costs
        share = min(max(projection, 0.0), 1.0)
        split = [*rest, (f * (1 - share), i * (1 - share), w * (1 - share))]
        passes = dict(s=f * share / num_ranks, t=(i + w) * share / num_ranks, e=0.0, g=0.0)
        found += _ranked(num_ranks, num_microbatches, split, comm, memory_limit, schedules, max_stages_per_rank,
                         passes)
    if whole or projection is None:
        found += _ranked(num_ranks, num_microbatches, layer_costs, comm, memory_limit, schedules, max_stages_per_rank)
    if not found:
        raise ValueError(f"no registered schedule runs {num_ranks} ranks x {num_microbatches} microbatches on "
                         f"{len(layer_costs)} layers within memory_limit={memory_limit} microbatches")
    return [c for *_, c in sorted(found, key=lambda t: t[:3])]


def _ranked(num_ranks, num_microbatches, layer_costs, comm, memory_limit, schedules, max_stages_per_rank,
            passes: dict | None = None) -> list[tuple]:
    """(step, peak, order, Candidate) of each schedule's best split; with `passes` (the vocabulary passes' costs)
    the passes placed into each."""
    found = []
    totals = [f + i + w for f, i, w in layer_costs]
    splits: dict[tuple[int, ...], list[list[int]]] = {}  # placement -> balances (many schedules share them)
    for order, name in enumerate(schedules or names()):
        for per_rank in range(1, max_stages_per_rank + 1):
            num_stages = num_ranks * per_rank
            if num_stages > len(layer_costs):
                break
            if refusal(name, num_ranks=num_ranks, num_microbatches=num_microbatches, stages_per_rank=per_rank):
                continue  # sizes this schedule does not take
            # (built as registered first, for its placement)
            sched = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, stages_per_rank=per_rank)
            placement = sched.stage_to_rank
            if placement not in splits:
                splits[placement] = candidate_splits(totals, placement)
            best = None
            for balance in splits[placement]:
                f, i, w = (stage_costs([c[k] for c in layer_costs], balance) for k in range(3))
                costs = Costs(f=f, b=i, w=w, comm=comm, **(passes or {}))  # (a B costs I + W)
                for candidate in _built_for(sched, costs, num_microbatches, per_rank, memory_limit):
                    if passes is not None:
                        candidate = with_vocabulary(candidate, costs)
                    result = simulate(candidate, costs)
                    peak = max(r.peak_activations for r in result.per_rank) / per_rank
                    key = (result.step_time, peak, order)
                    if (memory_limit is None or peak <= memory_limit) and (best is None or key < best[:3]):
                        best = (*key, Candidate(name, per_rank, tuple(balance), result.step_time,
                                                result.bubble_fraction, peak, candidate, passes is not None))
            if best is not None:
                found.append(best)
    return found


def _built_for(sched: Schedule, costs: Costs, num_microbatches: int, per_rank: int,
               memory_limit: float | None) -> list[Schedule]:
    """The schedule itself, or, for one built from costs (zb-auto), built for these: within `memory_limit`,
    or without one at 1F1B's memory P and at 2P."""
    if "costs" not in options(sched.name):
        return [sched]
    P = sched.num_ranks
    built = []
    for limit in [memory_limit] if memory_limit is not None else [P, 2 * P]:
        try:
            built.append(build(sched.name, num_ranks=P, num_microbatches=num_microbatches, stages_per_rank=per_rank,
                               costs=costs, memory_limit=limit))
        except ValueError:  # a limit below what it can run in
            continue
    return built
