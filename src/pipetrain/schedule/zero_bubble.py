"""Zero-bubble schedules (Qi et al., 2024): B split into I and W, W delayed to fill the bubbles.

Each is written as a few counted phases per rank, every count a closed formula in the rank (as in
DualPipe), so the action lists can be read straight off the code.
"""

from __future__ import annotations

from .actions import Action, Op
from .base import Schedule
from .placement import looped, vshape
from .registry import register


def _zb_h1_sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank != 1:
        raise ValueError(f"zb-h1 places one stage per rank; got stages_per_rank={stages_per_rank} (try 'zbv')")


@register("zb-h1", listing=3, sizes=_zb_h1_sizes)
def zb_h1(num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """ZB-H1: 1F1B with B split into I and W, rank r running its W passes r microbatches late.

    Phases on rank r (w = min(P-1-r, M) warm-up forwards):
        F x w  |  (F, I, W delayed by r) x (M - w)  |  (I, W delayed by r) x w  |  the r held-back W
    Input gradients travel up the pipeline at the speed of I alone, and the held-back W passes fill the
    cool-down. Every rank holds at most P microbatches, 1F1B's peak (rank 0's). P=3, M=4, f = b = w = 1:

        rank 0: 0F0 0F1 0F2  .   .  0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3
        rank 1:  .  1F0 1F1  .  1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3
        rank 2:  .   .  2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3

    Idle per rank (P-1)(f+b-w): a third of 1F1B's (P-1)(f+b+w) when f = b = w, and the least any
    one-stage-per-rank schedule can have (rank P-1 cannot start before P-1 forwards have run).
    """
    P, M = num_ranks, num_microbatches
    actions = []
    for r in range(P):
        warmup = min(P - 1 - r, M)
        acts = [Action(r, Op.F, m) for m in range(warmup)]
        next_w = 0
        for i in range(M):
            if warmup + i < M:
                acts.append(Action(r, Op.F, warmup + i))
            acts.append(Action(r, Op.I, i))
            if i >= r:
                acts.append(Action(r, Op.W, next_w))
                next_w += 1
        acts += [Action(r, Op.W, m) for m in range(next_w, M)]
        actions.append(acts)
    return Schedule("zb-h1", P, M, 1, looped(P), actions)


def _zbv_sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank != 2:
        raise ValueError(f"zbv places exactly two stages per rank (a V); got stages_per_rank={stages_per_rank}")


@register("zbv", listing=4, sizes=_zbv_sizes)
def zbv(num_ranks: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """ZB-V: two stages per rank folded in a V, split backward, 1F1B's activation memory.

    Rank r holds stage a = r (going down) and b = 2P-1-r (coming back up), so rank 0 holds both the first
    and the last stage. Phases on rank r, with n = max(M, 2P-1) microbatches (those >= M dropped after):
        F_a x (2(P-r)-1)  |  (F_b, F_a) x r  |  (F_b, I_b, W_b) x (P-r)
        steady: (F_a, I_a, W_a, F_b, I_b, W_b) until every F is done
        cool-down: (I_a, I_b) x r  |  (I_a, W_a) x (P-r)  |  the W passes still owed
    P=2, M=4, f = b = w = 1 (stages 0 and 3 on rank 0, 1 and 2 on rank 1):

        rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3  .
        rank 1:  .  1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3

    From M = 2P-1 on every rank idles exactly P-1 stage-forwards: bubble (P-1)/(6M+P-1), the least any
    two-stages-per-rank schedule can have.
    """
    P, M = num_ranks, num_microbatches
    n = max(M, 2 * P - 1)
    actions = [[act for act in _zbv_rank(P, r, n) if act.mb < M] for r in range(P)]
    return Schedule("zbv", P, M, 2, vshape(P), actions)


def _zbv_rank(P: int, r: int, n: int) -> list[Action]:
    """Rank r's zbv actions for n microbatches (the caller drops those past the real count)."""
    a, b = r, 2 * P - 1 - r
    count = {(stage, op): 0 for stage in (a, b) for op in (Op.F, Op.I, Op.W)}
    acts: list[Action] = []

    def emit(*pairs: tuple[int, Op]) -> None:
        for stage, op in pairs:
            acts.append(Action(stage, op, count[(stage, op)]))
            count[(stage, op)] += 1

    for _ in range(2 * (P - r) - 1):
        emit((a, Op.F))
    for _ in range(r):
        emit((b, Op.F), (a, Op.F))
    for _ in range(P - r):
        emit((b, Op.F), (b, Op.I), (b, Op.W))
    while count[(b, Op.F)] < count[(a, Op.F)] or count[(a, Op.F)] < n:
        if count[(a, Op.F)] < n:
            emit((a, Op.F))
        emit((a, Op.I), (a, Op.W), (b, Op.F), (b, Op.I), (b, Op.W))
    for _ in range(r):
        emit((a, Op.I), (b, Op.I))
    for _ in range(P - r):
        emit((a, Op.I), (a, Op.W))
    for stage in (b, a):
        while count[(stage, Op.W)] < count[(stage, Op.I)]:
            emit((stage, Op.W))
    return acts
