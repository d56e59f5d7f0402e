"""Vocabulary parallelism's input end on one rank: its rows of the token embedding, and their passes E and G.

Every pipeline rank holds rows `start .. start + rows` of the first layer's token embedding (the same rows as its
part of the head's projection: with tied embeddings one DTensor serves both). For each microbatch

    E(r, m): the shard's rows of the microbatch's tokens (zero for tokens outside the shard), summed over the
             ranks (a reduce) into the first stage, whose token embedding (`VocabularyEmbedding`) returns that sum;
    G(r, m): the gradient of the first stage's input (the embedding), broadcast from the first stage, added to
             the shard's rows of the tokens it holds.

The token ids are the microbatch itself, or its "input_ids".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Work
from .tensor_parallel import local, placed_as
from .vocabulary import VocabularyCollectives


class VocabularyEmbedding(nn.Module):
    """A first layer's token embedding split by vocabulary over the pipeline ranks: `weight` (vocab, d) is a
    DTensor of which this rank holds rows `start .. start + rows`. On the first stage its forward returns the
    embedding the ranks' E passes summed for these token ids (`provide`); given the whole table (`whole`, for
    generation) it looks the tokens up in it."""

    def __init__(self, weight: nn.Parameter, start: int) -> None:
        super().__init__()
        self.weight = weight
        self.start = start
        self.vocab = weight.shape[0]
        self._provided: dict[int, torch.Tensor] = {}  # id(token ids) -> their summed embedding
        self.whole: torch.Tensor | None = None

    def provide(self, ids: torch.Tensor, embedding: torch.Tensor) -> None:
        self._provided[id(ids)] = embedding

    def release(self, ids: torch.Tensor) -> None:
        self._provided.pop(id(ids), None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self._provided.get(id(ids))  # (a checkpointed stage's recomputation asks again)
        if embedding is not None:
            return embedding
        if self.whole is not None:
            return F.embedding(ids, self.whole)
        raise RuntimeError("a vocabulary-parallel embedding runs inside its pipeline's steps only (its E passes sum "
                           "the shards' rows); outside them use the layers of a model without vocab_parallel")


def token_ids(inputs) -> torch.Tensor:
    """The token ids of a microbatch: itself, or its "input_ids"."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise ValueError("vocab_parallel=True looks up the first layer's tokens on every rank: the microbatch must be "
                         "the token ids (an integer tensor) or a dict with \"input_ids\"")
    return ids


@dataclass
class _Sum:
    embedding: torch.Tensor  # this rank's rows, then (on the first stage's rank) their sum over the ranks
    work: Work


class EmbeddingShard:
    """This rank's E and G over its `embedding` rows; `root` is the rank of the first stage."""

    def __init__(self, embedding: VocabularyEmbedding, *, collectives: VocabularyCollectives, root: int) -> None:
        self.embedding = embedding
        self.collectives = collectives
        self.rank, self.root = collectives.rank, root
        self._sums: dict[int, _Sum] = {}  # mb -> its embedding's sum in flight
        self._sent: dict[int, tuple[torch.Tensor, Work | None]] = {}  # mb -> its input gradient (root: broadcast)
        self._given: dict[int, torch.Tensor] = {}  # mb -> the token ids the first stage's embedding was given

    def tables(self) -> list[nn.Parameter]:
        """The shard's parameters (reduced over data-parallel replicas after the step)."""
        return [self.embedding.weight]

    def lookup(self, mb: int, inputs) -> None:
        """E: this shard's rows of microbatch `mb`'s tokens (zero elsewhere), summed into the first stage."""
        ids = token_ids(inputs).to(self.collectives.device)
        weight = local(self.embedding.weight).detach()
        index = ids - self.embedding.start
        inside = (index >= 0) & (index < weight.shape[0])
        rows = F.embedding(index.clamp(0, max(weight.shape[0] - 1, 0)), weight) if weight.shape[0] else \
            weight.new_zeros(*ids.shape, weight.shape[1])
        rows = rows * inside[..., None]
        for done in [m for m, s in self._sums.items() if self.rank != self.root and s.work.is_completed()]:
            del self._sums[done]  # (another rank's part, summed into the root: let it go)
        self._sums[mb] = _Sum(rows, self.collectives.reduce(VocabularyCollectives.EMBEDDING, rows, self.root))

    def first_input(self, mb: int, inputs, *, grad: bool) -> torch.Tensor:
        """The root, before the first stage's forward of `mb`: the summed embedding (a leaf collecting the first
        stage's input gradient), handed to the first layer's embedding for these token ids."""
        done = self._sums.pop(mb)
        self.collectives.wait(done.work, f"the shards' input embedding of microbatch {mb}")
        summed = self.collectives.sum_over_tp(done.embedding, f"the tp ranks' input embedding of microbatch {mb}")
        leaf = summed.requires_grad_(grad)
        ids = token_ids(inputs)
        self.embedding.provide(ids, leaf)
        self._given[mb] = ids
        return leaf

    def send_gradient(self, mb: int, grad: torch.Tensor) -> None:
        """The root, after the first stage's backward of `mb`: broadcast its input's gradient to every shard."""
        self.embedding.release(self._given.pop(mb))
        grad = grad.detach().contiguous()
        self._sent[mb] = (grad, self.collectives.broadcast(VocabularyCollectives.EMBEDDING_GRADIENT, grad, self.root))

    def backward(self, mb: int, inputs) -> None:
        """G: add the first stage's input gradient of `mb` to this shard's rows of its tokens."""
        ids = token_ids(inputs).to(self.collectives.device)
        weight = self.embedding.weight
        if self.rank == self.root:  # (its broadcast is waited for at the step's end: the others' G may come later)
            grad = self._sent[mb][0]
        else:
            grad = torch.empty(*ids.shape, weight.shape[1], dtype=weight.dtype, device=self.collectives.device)
            work = self.collectives.broadcast(VocabularyCollectives.EMBEDDING_GRADIENT, grad, self.root)
            self.collectives.wait(work, f"the first stage's input gradient of microbatch {mb}")
        index = ids - self.embedding.start
        inside = (index >= 0) & (index < local(weight).shape[0])
        if weight.grad is None:
            weight.grad = placed_as(torch.zeros_like(local(weight)), weight)
        local(weight.grad).index_add_(0, index[inside], grad[inside].to(weight.dtype))

    def finish(self) -> None:
        """After the step's last action: every launched sum done (an evaluation's, and the other ranks')."""
        for mb, done in sorted(self._sums.items()):
            self.collectives.wait(done.work, f"the shards' input embedding of microbatch {mb}")
        for mb, (_, work) in sorted(self._sent.items()):
            self.collectives.wait(work, f"the first stage's input gradient of microbatch {mb}")
        self.clear()

    def clear(self) -> None:
        for ids in self._given.values():
            self.embedding.release(ids)
        self._sums.clear()
        self._sent.clear()
        self._given.clear()
