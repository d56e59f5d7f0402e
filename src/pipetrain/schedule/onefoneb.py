"""1F1B: a short warm-up of forwards, then one forward / one backward (PipeDream-Flush, Megatron)."""

from __future__ import annotations

from .actions import B, F
from .base import Schedule
from .placement import looped
from .registry import register


def _sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank != 1:
        raise ValueError(
            f"1f1b places one stage per rank; got stages_per_rank={stages_per_rank} "
            "(interleaved-1f1b runs several stages per rank)"
        )
    if num_microbatches < num_ranks:
        raise ValueError(
            f"1f1b needs at least as many microbatches as ranks (got {num_microbatches} microbatches "
            f"for {num_ranks} ranks): raise the microbatch count to >= {num_ranks}, or use 'gpipe', "
            "which runs any microbatch count"
        )


@register("1f1b", listing=1, sizes=_sizes)
def one_f_one_b(num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """Rank r runs P-1-r warm-up forwards, alternates F and B, then drains its backwards. P=3, M=4:

        rank 0: 0F0 0F1 0F2  .   .  0B0 0F3 0B1  .  0B2  .  0B3
        rank 1:  .  1F0 1F1  .  1B0 1F2 1B1 1F3 1B2  .  1B3
        rank 2:  .   .  2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3

    Same bubble as GPipe, (P-1)/(M+P-1), but rank r holds at most P-r microbatches' activations.
    Needs M >= P: with fewer microbatches every rank is still warming up (use gpipe instead).
    """
    actions = []
    for r in range(num_ranks):
        warmup = num_ranks - 1 - r
        steady = num_microbatches - warmup
        acts = [F(r, i) for i in range(warmup)]
        for i in range(steady):
            acts += [F(r, warmup + i), B(r, i)]
        acts += [B(r, i) for i in range(steady, num_microbatches)]
        actions.append(acts)
    return Schedule("1f1b", num_ranks, num_microbatches, 1, looped(num_ranks), actions)
