"""GPipe: every forward, then every backward (Huang et al., 2019)."""

from __future__ import annotations

from .actions import B, F
from .base import Schedule
from .placement import looped
from .registry import register


def _sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank != 1:
        raise ValueError(f"gpipe places one stage per rank; got stages_per_rank={stages_per_rank}")


@register("gpipe", listing=0, sizes=_sizes)
def gpipe(num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """All F in microbatch order, then all B in microbatch order. P=3, M=4 (one column per time unit):

        rank 0: 0F0 0F1 0F2 0F3  .   .   .   .  0B0 0B1 0B2 0B3
        rank 1:  .  1F0 1F1 1F2 1F3  .   .  1B0 1B1 1B2 1B3
        rank 2:  .   .  2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3

    Every rank holds all M microbatches' activations at the F/B turn. Bubble (P-1)/(M+P-1).
    """
    m = range(num_microbatches)
    actions = [[F(r, i) for i in m] + [B(r, i) for i in m] for r in range(num_ranks)]
    return Schedule("gpipe", num_ranks, num_microbatches, 1, looped(num_ranks), actions)
