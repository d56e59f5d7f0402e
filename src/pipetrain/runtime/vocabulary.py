"""Vocabulary parallelism on one rank: its shard of the output projection, and its part of the cross-entropy.

Every pipeline rank holds rows `start .. start + rows` of the output projection (`VocabularyProjection`, a
DTensor sharded by rows over the pipeline's ranks). For each microbatch the last stage's output (the hidden
state before the projection) is broadcast to every rank, and

    S(r, m): logits z = h W_r^T (+ b_r) for the shard's rows, and per token their max, sum of exp(z - max) and the
             target's logit where the target falls in the shard (`split_statistics`), all-gathered;
    T(r, m): from every shard's statistics the log-sum-exp and the loss, the gradient softmax - one-hot of the
             shard's logits, which gives the shard's weight gradient and its part of the hidden state's
             gradient, summed over the ranks (a reduce) into the last stage's backward.

The statistics combine the online-softmax way (`lse = M + log sum_r s_r exp(m_r - M)`, M the max of the maxes), in
rank order on every rank, so every rank computes the same loss; no rank holds or sends whole logits. The three
collectives (broadcast, all-gather, reduce) each run in a group of their own, so each kind matches by
microbatch order (`schedule.check`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import Work, wait_or_raise
from .cross_entropy import CrossEntropy, check_targets, split_statistics
from .stage import LossWeights
from .tensor_parallel import local

MAX, SUM, TARGET = range(3)  # rows of a shard's statistics
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.11)


class VocabularyProjection(nn.Module):
    """A head's output projection, split by vocabulary over the pipeline ranks: `weight` (vocab, d) and `bias`
    are DTensors of which this rank holds rows `start .. start + rows`. Its forward is the identity: the
    head runs without it on the last stage (giving the hidden state), and `VocabularyShard` applies this rank's
    rows to that hidden state on every rank."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, start: int) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.start = start
        self.vocab = weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

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
    gathered: torch.Tensor  # (ranks x 3, n): every shard's statistics, once `gathering` is done
    gathering: Work
    sending: Work | None = None  # the root's broadcast of the hidden state


class VocabularyShard:
    """This rank's S and T over its `projection` rows. `root` is the rank of the last stage (it broadcasts
    the hidden states, receives the summed gradients and records the losses); `transport` a `DistTransport`
    made with `vocabulary=True`; `loss` the pipeline's CrossEntropy (its ignore_index, token mean, shift)."""

    def __init__(self, projection: VocabularyProjection, *, loss: CrossEntropy, transport, root: int,
                 timeout: float, autocast: torch.dtype | None = None) -> None:
        self.projection = projection
        self.loss = loss
        self.transport = transport
        self.rank, self.ranks, self.root = transport.rank, transport.world_size, root
        self.timeout = timeout
        self.autocast = autocast
        self.device = transport.device
        self._groups = list(transport.vocabulary_groups)
        self._hidden: dict[int, tuple[torch.Tensor, Work | None]] = {}  # mb -> the hidden state (root: sent)
        self._pending: dict[int, _Microbatch] = {}
        self._gradients: dict[int, tuple[torch.Tensor, Work]] = {}  # mb -> its summed output gradient (root)
        self._reducing: list[Work] = []  # other ranks' reductions in flight
        self.losses: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # root: (loss, count) as a Stage's

    # --- the last stage's output --------------------------------------------------------------------
    def send_hidden(self, mb: int, hidden: torch.Tensor) -> None:
        """The root, right after the last stage's forward of `mb`: broadcast its output to every rank."""
        hidden = hidden.detach().to(self.projection.weight.dtype).contiguous()
        self._hidden[mb] = (hidden, self._collective(0, "broadcast", hidden))

    def _receive_hidden(self, mb: int, targets: torch.Tensor) -> torch.Tensor:
        dim = self.projection.weight.shape[1]
        hidden = torch.empty(*targets.shape, dim, dtype=self.projection.weight.dtype, device=self.device)
        self._wait(self._collective(0, "broadcast", hidden), f"the last stage's output for microbatch {mb}")
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
        most, target_logit, _ = split_statistics(z, y, self.projection.start, self.loss.ignore_index)
        statistics = torch.stack([most, (z - most[:, None]).exp().sum(dim=-1), target_logit])  # (3, n)
        gathered = torch.empty(self.ranks * 3, statistics.shape[1], dtype=statistics.dtype, device=self.device)
        gathering = self._collective(1, "all_gather_into_tensor", gathered, statistics)
        self._pending[mb] = _Microbatch(hidden, logits if grad else z, y, gathered, gathering, sending)

    def backward(self, mb: int, weights: LossWeights) -> None:
        """T: this shard's gradients of microbatch `mb` (its weights', and its part of the hidden state's, whose
        sum into the root it launches)."""
        p = self._pending.pop(mb)
        lse, counted = self._combine(mb, p)
        scale = (torch.full_like(lse, weights.total) if self.loss.token_mean
                 else torch.full_like(lse, weights.mean) / counted.sum())
        scale = scale * counted
        grad_logits = (p.logits.detach() - lse[:, None]).exp_() * scale[:, None]
        index = p.targets - self.projection.start
        rows = ((index >= 0) & (index < grad_logits.shape[-1]) & counted).nonzero()[:, 0]
        grad_logits[rows, index[rows]] -= scale[rows]
        torch.autograd.backward(p.logits, grad_logits)
        grad = p.hidden.grad if p.hidden.grad is not None else torch.zeros_like(p.hidden)
        work = self._collective(2, "reduce", grad, self.root)
        if self.rank == self.root:
            self._gradients[mb] = (grad, work)
        else:
            self._reducing.append(work)
        self._wait_sent(p)

    def output_gradient(self, mb: int) -> torch.Tensor:
        """The root, at the last stage's backward of `mb`: the hidden state's gradient summed over the shards."""
        grad, work = self._gradients.pop(mb)
        self._wait(work, f"the shards' output gradients for microbatch {mb}")
        return grad

    def _combine(self, mb: int, p: _Microbatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for every shard's statistics of `mb`: the log-sum-exp of each token's logits, and which tokens
        count; the root records the microbatch's loss."""
        self._wait(p.gathering, f"every shard's softmax statistics for microbatch {mb}")
        g = p.gathered.view(self.ranks, 3, -1)
        most = g[:, MAX].max(dim=0).values
        lse = most + (g[:, SUM] * (g[:, MAX] - most).exp()).sum(dim=0).log()
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

    # --- collectives ----------------------------------------------------------------------------------
    def _collective(self, kind: int, name: str, tensor: torch.Tensor, extra=None) -> Work:
        """Launch one of the three collectives (0 broadcast, 1 all-gather, 2 reduce) on its own group."""
        group = self.transport.group(self._groups[kind])
        if name == "broadcast":
            work = dist.broadcast(tensor, self.transport.global_ranks[self.root], group=group, async_op=True)
        elif name == "reduce":
            work = dist.reduce(tensor, self.transport.global_ranks[extra], group=group, async_op=True)
        else:
            work = _ALL_GATHER(tensor, extra, group=group, async_op=True)
        return self.transport.track(work)

    def _wait(self, work: Work, what: str) -> None:
        wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=None, what=what)

    def _wait_sent(self, p: _Microbatch) -> None:
        if p.sending is not None:
            self._wait(p.sending, "the last stage's output")
            p.sending = None
