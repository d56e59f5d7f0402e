"""Several stages per rank, looped placement: interleaved 1F1B (Megatron) and looped BFS."""

from __future__ import annotations

from .actions import B, F
from .base import Schedule
from .placement import looped
from .registry import register


def microbatch_rounds(num_ranks: int, num_microbatches: int) -> list[list[int]]:
    """Split microbatches into rounds of at least P, sizes differing by at most one, larger rounds first.

    (Larger rounds last would let a round's first backward reach a stage before its forward has; the
    warm-up below is sized by the first, largest round.)"""
    rounds = max(1, num_microbatches // num_ranks)
    base, extra = divmod(num_microbatches, rounds)
    sizes = [base + 1] * extra + [base] * (rounds - extra)
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def _sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank < 2:
        raise ValueError(f"interleaved-1f1b needs stages_per_rank >= 2, got {stages_per_rank}; "
                         "with one stage per rank use '1f1b'")
    if num_microbatches < num_ranks:
        raise ValueError(f"interleaved-1f1b needs at least as many microbatches as ranks (got "
                         f"{num_microbatches} for {num_ranks} ranks): use >= {num_ranks} microbatches, or "
                         "'looped-bfs' / 'gpipe' for fewer")


@register("interleaved-1f1b", listing=2, sizes=_sizes)
def interleaved_1f1b(num_ranks: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: rank r holds stages r, r+P, ..., r+(V-1)P and runs 1F1B over them.

    Microbatches go in rounds of R >= P: forwards visit every local stage for a round before the next
    round; backwards visit them in reverse. Rank r warms up with 2(P-1-r) + (V-1)R forwards. P=2, V=2, M=4
    (f = b = 1; stages 0,1 on ranks 0,1 and stages 2,3 on ranks 0,1):

        rank 0: 0F0 0F1 2F0 2F1  .  0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2  .  2B3 0B2  .  0B3
        rank 1:  .  1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2  .  1B3

    Bubble (P-1)/(V*M + P-1): V times smaller than 1F1B's, for V times more transfers. Needs M >= P;
    any M >= P works (rounds of unequal size when P does not divide M).
    """
    P, V = num_ranks, stages_per_rank
    rounds = microbatch_rounds(P, num_microbatches)
    forward = [(c, m) for mbs in rounds for c in range(V) for m in mbs]
    backward = [(c, m) for mbs in rounds for c in reversed(range(V)) for m in mbs]
    total = len(forward)
    actions = []
    for r in range(P):
        warmup = min(2 * (P - 1 - r) + (V - 1) * len(rounds[0]), total)
        acts = [F(c * P + r, m) for c, m in forward[:warmup]]
        for i in range(total - warmup):
            c, m = forward[warmup + i]
            acts.append(F(c * P + r, m))
            c, m = backward[i]
            acts.append(B(c * P + r, m))
        acts += [B(c * P + r, m) for c, m in backward[total - warmup:]]
        actions.append(acts)
    return Schedule("interleaved-1f1b", P, num_microbatches, V, looped(P, V), actions)


@register("looped-bfs", listing=5)
def looped_bfs(num_ranks: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Breadth-first over looped stages: every microbatch through a rank's first stage, then its next...

    Like GPipe on a looped placement: any microbatch count, all activations held at the turn. P=2, M=2:

        rank 0: 0F0 0F1 2F0 2F1  .   .  2B0 2B1 0B0 0B1
        rank 1:  .  1F0 1F1 3F0 3F1 3B0 3B1 1B0 1B1  .
    """
    P, V = num_ranks, stages_per_rank
    actions = []
    for r in range(P):
        acts = [F(c * P + r, m) for c in range(V) for m in range(num_microbatches)]
        acts += [B(c * P + r, m) for c in reversed(range(V)) for m in range(num_microbatches)]
        actions.append(acts)
    return Schedule("looped-bfs", P, num_microbatches, V, looped(P, V), actions)
