"""Stage -> rank placements: looped (stage s on rank s mod P) and V-shape."""

from __future__ import annotations


def looped(num_ranks: int, stages_per_rank: int = 1) -> tuple[int, ...]:
    """Stage s on rank s % P: rank r holds stages r, r+P, r+2P, ... (Megatron's interleaving)."""
    return tuple(s % num_ranks for s in range(num_ranks * stages_per_rank))


def vshape(num_ranks: int) -> tuple[int, ...]:
    """Two stages per rank folded in a V: rank r holds stages r and 2P-1-r (first and last on rank 0)."""
    return tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))
