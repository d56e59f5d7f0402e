"""Weights tied across ranks (one nn.Parameter in layers on two ranks): their gradients are summed after a step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .comm import Transport, wait_or_raise


@dataclass(frozen=True)
class Tie:
    peer: int  # the other rank using the weight
    owner: bool  # this rank holds its first use
    param: nn.Parameter


class TiedWeights:
    """The parameters this rank shares with another rank (as with tied input/output embeddings). At the end
    of each accumulation window (a step that syncs gradients) each tied gradient gets the peer's contribution
    added, so both copies see the single-process gradient and stay equal under the same optimizer."""

    def __init__(self, layers: Sequence[nn.Module], rank_of_layer: Mapping[int, int], rank: int, *,
                 local: set[int] = frozenset()) -> None:
        """`local`: ids of parameters every rank holds its own part of (vocabulary parallelism's tables): no tie."""
        first_use: dict[int, int] = {}
        self.ties: list[Tie] = []
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                if id(p) in local:
                    continue
                if id(p) not in first_use:
                    first_use[id(p)] = i
                    continue
                a, b = rank_of_layer[first_use[id(p)]], rank_of_layer[i]
                if a != b and rank in (a, b):
                    self.ties.append(Tie(peer=b if rank == a else a, owner=rank == a, param=p))

    def __bool__(self) -> bool:
        return bool(self.ties)

    @property
    def params(self) -> list[nn.Parameter]:
        return [t.param for t in self.ties]

    def materialized(self, replaced: Mapping[int, torch.Tensor]) -> None:
        """Point at this rank's real tensors after layers built on the meta device got storage."""
        self.ties = [Tie(t.peer, t.owner, replaced.get(id(t.param), t.param)) for t in self.ties]

    def share_values(self, transport: Transport, timeout: float) -> None:
        """Copy each tied weight from the rank of its first use to the other, so both start from one value
        however each rank built or initialized its layers (both ranks, same order)."""
        for tie in self.ties:
            value = tie.param.detach().contiguous() if tie.owner else torch.empty_like(tie.param)
            work = transport.isend(value, tie.peer) if tie.owner else transport.irecv(value, tie.peer)
            wait_or_raise(work, timeout=timeout, transport=transport, peer=tie.peer, what="tied-weight value")
            if not tie.owner:
                with torch.no_grad():
                    tie.param.copy_(value)

    def copies(self) -> set[int]:
        """ids of the parameters whose first use is on another rank (count each weight once)."""
        return {id(t.param) for t in self.ties if not t.owner}

    def sync(self, transport: Transport, timeout: float) -> None:
        """Add the peer's gradient to each tied weight's (both ranks, same order). Called once per accumulation
        window, when the gradients hold the window's contributions only (`Window` set the earlier ones aside)."""
        for tie in self.ties:
            p = tie.param
            mine = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
            theirs = torch.empty_like(mine)
            works = [(transport.isend(mine, tie.peer), "send"), (transport.irecv(theirs, tie.peer), "recv")]
            for work, what in works:
                wait_or_raise(work, timeout=timeout, transport=transport, peer=tie.peer,
                              what=f"tied-weight gradient {what}")
            first, second = (mine, theirs) if tie.owner else (theirs, mine)  # same sum order on both ranks
            p.grad = first + second
