"""Generation's schedule: groups of sequences circulate through the stages, the last stage's picked tokens
going back to the first.

    round t of group g at stage s runs at virtual time  tau = t * L + g + s      (L = max(groups, stages))

Every rank runs its stages' passes in the order of (tau, stage): each pass's inputs come from passes with a
smaller tau (the stage before, or for stage 0 its own or the last stage's round before), so the order
cannot deadlock (`check` proves it like any schedule's), and with at least as many groups as stages every
stage has a pass at every tau (steady state: every rank busy). A group's first rounds prefill its prompts a
piece at a time (P: the first stage's next pieces overlap the later stages' work instead of one long prefill
holding the pipeline); each round after the last piece decodes one token (D).
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Op
from .base import Schedule


def circulation(stage_to_rank: Sequence[int], *, prefill_rounds: Sequence[int], rounds: Sequence[int]) -> Schedule:
    """The generation schedule of `len(rounds)` groups over stages placed by `stage_to_rank`: group g runs
    `rounds[g]` rounds, the first `prefill_rounds[g]` of them prefill (P) and the rest decode (D)."""
    if len(prefill_rounds) != len(rounds) or not rounds:
        raise ValueError(f"give every group its prefill rounds and rounds; got {len(prefill_rounds)} and {len(rounds)}")
    for g, (p, n) in enumerate(zip(prefill_rounds, rounds, strict=True)):
        if not 1 <= p <= n:
            raise ValueError(f"group {g}: {p} prefill rounds of {n}; a group prefills in 1 to all of its rounds")
    num_stages = len(stage_to_rank)
    num_ranks = max(stage_to_rank) + 1
    period = max(len(rounds), num_stages)
    last = max((n - 1) * period + g for g, n in enumerate(rounds)) + num_stages - 1
    actions: list[list[Action]] = [[] for _ in range(num_ranks)]
    for tau in range(last + 1):
        for s in range(num_stages):
            t, g = divmod(tau - s, period)
            if tau >= s and g < len(rounds) and t < rounds[g]:
                actions[stage_to_rank[s]].append(Action(s, Op.P if t < prefill_rounds[g] else Op.D, g, t))
    return Schedule("circulation", num_ranks, len(rounds), num_stages // num_ranks, tuple(stage_to_rank), actions)
