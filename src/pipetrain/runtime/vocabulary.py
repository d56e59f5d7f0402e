"""Vocabulary parallelism on one rank: its shard of the output projection, and its part of the cross-entropy.

Every pipeline rank holds rows `start .. start + rows` of the output projection (`VocabularyProjection`, a
DTensor sharded by rows over the pipeline's ranks). For each microbatch the last stage's output (the hidden
state before the projection) is broadcast to every rank, and

    S(r, m): logits z = h W_r^T (+ b_r) for the shard's rows, and per token their log-sum-exp and the target's
             logit where the target falls in the shard (else 0), all-gathered;
    T(r, m): from every shard's statistics the log-sum-exp and the loss, the gradient softmax - one-hot of the
             shard's logits, which gives the shard's weight gradient and its part of the hidden state's
             gradient, summed over the ranks (a reduce) into the last stage's backward.

The statistics combine the online-softmax way (`lse = log sum_r exp(lse_r)`, taken from the largest), in rank
order on every rank, so every rank computes the same loss; no rank holds or sends whole logits. With tensor
parallel each pipeline rank's rows split again over its tp ranks: its statistics, its part of the output
gradient and of the embedding are then combined over them too (`sum_over_tp`, `gather_over_tp`). The pieces
of the split cross-entropy (each part's target logits, softmax minus one-hot) are the tensor-parallel head's
(cross_entropy.py): one vocabulary-split cross-entropy, in two passes here, in one there. The input
embedding is split the same way (vocabulary_embedding.py). Each kind of collective (`VocabularyCollectives`)
runs in a group of its own, so each kind matches by microbatch order (`schedule.check`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import Work, wait_or_raise, wait_replicas
from .cross_entropy import CrossEntropy, check_targets, subtract_one_hot_, target_logits
from .stage import LossWeights
from .tensor_parallel import local

LSE, TARGET = range(2)  # rows of a shard's statistics
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.11)


class VocabularyProjection(nn.Module):
    """A head's output projection, split by vocabulary over the pipeline ranks: `weight` (vocab, d) and `bias`
    are DTensors of which this rank holds rows `start .. start + rows`. Its forward is the identity: the
    head runs without it on the last stage (giving the hidden state), and `VocabularyShard` applies this rank's
    rows to that hidden state on every rank. Given the whole projection (`whole`: (weight, bias), for
    generation) it applies it."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, start: int) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.start = start
        self.vocab = weight.shape[0]
        self.whole: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.whole is None else F.linear(hidden, *self.whole)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, rows {self.start}..{self.start + local(self.weight).shape[0]} on this rank"


def shard_rows(vocab: int, num_shards: int, shard: int) -> tuple[int, int]:
    """(start, rows) of `shard`'s part of `vocab` rows: DTensor's Shard(0) split (torch.chunk's: the first
    shards take ceil(vocab / num_shards) rows)."""
    size = math.ceil(vocab / num_shards)
    start = min(shard * size, vocab)
    return start, min(size, vocab - start)


@dataclass
class _Microbatch:
    hidden: torch.Tensor  # the last stage's output, a leaf collecting this shard's part of its gradient
    logits: torch.Tensor  # (n, rows) float, in the graph of `hidden` and the shard's weights
    targets: torch.Tensor  # (n,)
    inside: torch.Tensor  # (n,) whether each counted target falls in this shard
    gathered: torch.Tensor  # (ranks x 2, n): every shard's statistics, once `gathering` is done
    gathering: Work
    sending: Work | None = None  # the root's broadcast of the hidden state


class _All:
    """Several requests as one; `then` runs once they are all done (the root's sum of a reduce)."""

    def __init__(self, works: list[Work], then=None) -> None:
        self.works, self.then = works, then

    def wait(self, timeout: float) -> None:
        for work in self.works:
            work.wait(timeout)
        if self.then is not None:
            self.then, then = None, self.then
            then()

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


class VocabularyCollectives:
    """Vocabulary parallelism's collectives over a pipeline's ranks, launched asynchronously, each kind in a group
    of its own (`DistTransport(vocabulary=True)` makes them); every wait is bounded and names what it waited for.

    Broadcasts and reduces are point-to-point messages to and from the root: a rank's wait then depends on the
    root alone, as the schedule's dataflow says (a tree algorithm would also wait for ranks that relay, at
    places of their own schedules). The reduce sums in rank order on the root."""

    HIDDEN, STATISTICS, OUTPUT_GRADIENT, EMBEDDING, EMBEDDING_GRADIENT = range(5)  # the kinds, one group each

    def __init__(self, transport, timeout: float, tp_group: dist.ProcessGroup | None = None) -> None:
        self.transport = transport
        self.timeout = timeout
        self.rank, self.ranks, self.device = transport.rank, transport.world_size, transport.device
        self._groups = list(transport.vocabulary_groups)
        self.tp_group = tp_group  # with tensor parallel: this rank's tp ranks, which hold the rest of its rows

    def sum_over_tp(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """With tensor parallel, `tensor` summed over this rank's tp ranks (in place; they run the same passes in
        the same order, so these meet as the tp layers' own collectives do)."""
        if self.tp_group is not None:
            wait_replicas(dist.all_reduce(tensor, group=self.tp_group, async_op=True), self.timeout, what)
        return tensor

    def gather_over_tp(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """With tensor parallel, every tp rank's `tensor` (n, ...) stacked (tp x n, ...), in tp rank order."""
        if self.tp_group is None:
            return tensor
        out = torch.empty(dist.get_world_size(self.tp_group) * tensor.shape[0], *tensor.shape[1:],
                          dtype=tensor.dtype, device=tensor.device)
        wait_replicas(_ALL_GATHER(out, tensor.contiguous(), group=self.tp_group, async_op=True), self.timeout, what)
        return out

    def broadcast(self, kind: int, tensor: torch.Tensor, root: int) -> Work:
        """`root`'s `tensor` into every other rank's."""
        if self.rank != root:
            return self._launch(dist.irecv, kind, tensor, self._global(root))
        return _All([self._launch(dist.isend, kind, tensor, self._global(r)) for r in range(self.ranks) if r != root])

    def reduce(self, kind: int, tensor: torch.Tensor, root: int) -> Work:
        """The sum over the ranks (in rank order) into `root`'s `tensor`, once its wait returns."""
        if self.rank != root:
            return self._launch(dist.isend, kind, tensor, self._global(root))
        parts = [tensor if r == root else torch.empty_like(tensor) for r in range(self.ranks)]
        works = [self._launch(dist.irecv, kind, part, self._global(r)) for r, part in enumerate(parts) if r != root]

        def add() -> None:
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            tensor.copy_(total)

        return _All(works, add)

    def all_gather(self, kind: int, out: torch.Tensor, tensor: torch.Tensor) -> Work:
        """Every rank's `tensor` (n, ...) into `out` (ranks x n, ...), in rank order."""
        return self._launch(_ALL_GATHER, kind, out, tensor)

    def wait(self, work: Work, what: str) -> None:
        wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=None, what=what)

    def _global(self, rank: int) -> int:
        return self.transport.global_ranks[rank]

    def _launch(self, collective, kind: int, *args) -> Work:
        group = self.transport.group(self._groups[kind])
        if collective is dist.isend or collective is dist.irecv:
            return self.transport.track(collective(*args, group=group))
        return self.transport.track(collective(*args, group=group, async_op=True))


class VocabularyShard:
    """This rank's S and T over its `projection` rows. `root` is the rank of the last stage (it broadcasts
    the hidden states, receives the summed gradients and records the losses); `loss` the pipeline's
    CrossEntropy (its ignore_index, token mean, shift)."""

    def __init__(self, projection: VocabularyProjection, *, loss: CrossEntropy, collectives: VocabularyCollectives,
                 root: int, autocast: torch.dtype | None = None) -> None:
        self.projection = projection
        self.loss = loss
        self.collectives = collectives
        self.rank, self.ranks, self.root = collectives.rank, collectives.ranks, root
        self.autocast = autocast
        self.device = collectives.device
        self._hidden: dict[int, tuple[torch.Tensor, Work | None]] = {}  # mb -> the hidden state (root: sent)
        self._pending: dict[int, _Microbatch] = {}
        self._gradients: dict[int, tuple[torch.Tensor, Work]] = {}  # mb -> its summed output gradient (root)
        self._reducing: list[Work] = []  # other ranks' reductions in flight
        self.losses: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # root: (loss, count) as a Stage's

    def tables(self) -> list[nn.Parameter]:
        """The shard's parameters (reduced over data-parallel replicas after the step)."""
        return [p for p in (self.projection.weight, self.projection.bias) if p is not None]

    # --- the last stage's output --------------------------------------------------------------------
    def send_hidden(self, mb: int, hidden: torch.Tensor) -> None:
        """The root, right after the last stage's forward of `mb`: broadcast its output to every rank."""
        hidden = hidden.detach().to(self.projection.weight.dtype).contiguous()
        self._hidden[mb] = (hidden, self.collectives.broadcast(VocabularyCollectives.HIDDEN, hidden, self.root))

    def _receive_hidden(self, mb: int, targets: torch.Tensor) -> torch.Tensor:
        dim = self.projection.weight.shape[1]
        hidden = torch.empty(*targets.shape, dim, dtype=self.projection.weight.dtype, device=self.device)
        self._wait(self.collectives.broadcast(VocabularyCollectives.HIDDEN, hidden, self.root),
                   f"the last stage's output for microbatch {mb}")
        return hidden

    # --- S and T --------------------------------------------------------------------------------------
    def forward(self, mb: int, targets: torch.Tensor, *, grad: bool) -> None:
        """S: this shard's logits of microbatch `mb` and their statistics, whose all-gather it launches."""
        if self.rank == self.root:
            hidden, sending = self._hidden.pop(mb)
        else:
            hidden, sending = self._receive_hidden(mb, targets), None
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"vocabulary parallel: the last stage's output for microbatch {mb} has shape "
                             f"{tuple(hidden.shape)}, but its targets {tuple(targets.shape)}: the head's hidden state "
                             "must be (*targets.shape, d)")
        hidden = hidden.detach().requires_grad_(grad)
        x, y = (hidden[:, :-1], targets[:, 1:]) if self.loss.shift else (hidden, targets)
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1).to(self.device)
        check_targets(y, self.projection.vocab, self.loss.ignore_index)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                    else contextlib.nullcontext())
        with torch.set_grad_enabled(grad), autocast:
            weight, bias = self.projection.weight, self.projection.bias  # (their gradients: DTensors like them)
            bias = bias.to_local() if bias is not None else None
            logits = F.linear(x, weight.to_local(), bias).float()  # (n, rows)
        z = logits.detach()
        target_logit, inside = target_logits(z, y, self.projection.start, self.loss.ignore_index)
        statistics = torch.stack([torch.logsumexp(z, dim=-1), target_logit])  # (2, n); one pass over the logits
        gathered = torch.empty(self.ranks * 2, statistics.shape[1], dtype=statistics.dtype, device=self.device)
        gathering = self.collectives.all_gather(VocabularyCollectives.STATISTICS, gathered, statistics)
        self._pending[mb] = _Microbatch(hidden, logits if grad else z, y, inside, gathered, gathering, sending)

    def backward(self, mb: int, weights: LossWeights) -> None:
        """T: this shard's gradients of microbatch `mb` (its weights', and its part of the hidden state's, whose
        sum into the root it launches)."""
        p = self._pending.pop(mb)
        lse, counted = self._combine(mb, p)
        scale = (torch.full_like(lse, weights.total) if self.loss.token_mean
                 else torch.full_like(lse, weights.mean) / counted.sum())
        scale = scale * counted
        # softmax x scale, in the logits' own memory (the linear's backward does not read its output)
        grad_logits = p.logits.detach().sub_(lse[:, None]).exp_().mul_(scale[:, None])
        subtract_one_hot_(grad_logits, p.targets, self.projection.start, p.inside, scale)
        torch.autograd.backward(p.logits, grad_logits)
        grad = p.hidden.grad if p.hidden.grad is not None else torch.zeros_like(p.hidden)
        work = self.collectives.reduce(VocabularyCollectives.OUTPUT_GRADIENT, grad, self.root)
        if self.rank == self.root:
            self._gradients[mb] = (grad, work)
        else:
            self._reducing.append(work)
        self._wait_sent(p)

    def output_gradient(self, mb: int) -> torch.Tensor:
        """The root, at the last stage's backward of `mb`: the hidden state's gradient summed over the shards."""
        grad, work = self._gradients.pop(mb)
        self._wait(work, f"the shards' output gradients for microbatch {mb}")
        return self.collectives.sum_over_tp(grad, f"the tp ranks' output gradients for microbatch {mb}")

    def _combine(self, mb: int, p: _Microbatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for every shard's statistics of `mb`: the log-sum-exp of each token's logits, and which tokens
        count; the root records the microbatch's loss."""
        self._wait(p.gathering, f"every shard's softmax statistics for microbatch {mb}")
        g = p.gathered.view(self.ranks, 2, -1)
        combined = torch.stack([torch.logsumexp(g[:, LSE], dim=0), g[:, TARGET].sum(dim=0)])  # (this tp rank's)
        g = self.collectives.gather_over_tp(combined, f"the tp ranks' softmax statistics for microbatch {mb}")
        g = g.view(-1, 2, g.shape[-1])
        lse = torch.logsumexp(g[:, LSE], dim=0)
        counted = p.targets != self.loss.ignore_index
        if self.rank == self.root:
            loss_sum = ((lse - g[:, TARGET].sum(dim=0)) * counted).sum()
            count = counted.sum()
            self.losses[mb] = ((loss_sum, count.double()) if self.loss.token_mean else (loss_sum / count, None))
        return lse, counted

    # --- the end of a step ----------------------------------------------------------------------------
    def finish(self) -> None:
        """After the step's last action: an evaluation's losses (S without T), and every collective done."""
        for mb in sorted(self._pending):
            p = self._pending.pop(mb)
            self._combine(mb, p)
            self._wait_sent(p)
        for work in self._reducing:
            self._wait(work, "this shard's output gradients")
        for _, sending in self._hidden.values():
            self._wait(sending, "the last stage's output")
        self.clear()

    def clear(self) -> None:
        self._hidden.clear()
        self._pending.clear()
        self._gradients.clear()
        self._reducing.clear()

    def _wait(self, work: Work, what: str) -> None:
        self.collectives.wait(work, what)

    def _wait_sent(self, p: _Microbatch) -> None:
        if p.sending is not None:
            self._wait(p.sending, "the last stage's output")
            p.sending = None
