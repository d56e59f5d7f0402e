"""Next-token cross-entropy as a loss pipetrain knows, so it can compute it from logits split by vocabulary.

`CrossEntropy` is an ordinary `loss_fn` (`(logits, targets) -> mean` or `(loss_sum, count)`). Given the
logits of a tensor-parallel head, which each tp rank holds for its own slice of the vocabulary (a DTensor
sharded on the last dimension), it computes the same loss without gathering them: Megatron's
vocabulary-parallel cross-entropy, the softmax's max and sum combined over the ranks the online-softmax way

    loss_i = log(sum_r sum_v exp(z_iv - m_i)) - (z_i,target - m_i),   m_i = max_r max_v z_iv

so no rank holds, or sends, whole logits. Any other `loss_fn` is given the logits whole (an all-gather).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import wait_replicas


@dataclass(frozen=True)
class CrossEntropy:
    """`loss_fn(logits (..., vocab), targets (...))`: next-token cross-entropy with `ignore_index` targets
    left out. `token_mean=True` returns `(loss_sum, count)`, so the pipeline takes the exact token mean over
    the whole batch; False, the mean over the microbatch's counted tokens. `shift=True` takes Hugging Face's
    labels: position i predicts targets[:, i + 1]."""

    ignore_index: int = -100
    token_mean: bool = True
    shift: bool = False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, *, timeout: float = 1800.0):
        """`timeout` bounds the collectives of vocabulary-split logits (seconds)."""
        split = _evenly_split_by_vocabulary(logits)  # a tensor-parallel head's parts
        if split:
            start = logits.device_mesh.get_local_rank() * (logits.shape[-1] // logits.device_mesh.size())
            group = logits.device_mesh.get_group()
            logits = logits.to_local()
        elif hasattr(logits, "full_tensor"):  # (a DTensor split otherwise: whole)
            logits = logits.full_tensor()
        if self.shift:
            logits, targets = logits[:, :-1], targets[:, 1:]
        logits, targets = logits.flatten(0, -2).float(), targets.flatten()
        if split:
            check_targets(targets, logits.shape[-1] * group.size(), self.ignore_index)
            loss_sum = _SplitCrossEntropy.apply(logits, targets, start, self.ignore_index, group, timeout).sum()
        else:
            loss_sum = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
        count = (targets != self.ignore_index).sum()
        return (loss_sum, count) if self.token_mean else loss_sum / count


def split_statistics(logits: torch.Tensor, targets: torch.Tensor, start: int,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vocabulary part's share of each row: (its max, the target's logit where the target falls in this
    part else 0, whether it does). logits (n, part) float for tokens start .. start + part, targets (n,)."""
    return (logits.max(dim=-1).values, *target_logits(logits, targets, start, ignore_index))


def target_logits(logits: torch.Tensor, targets: torch.Tensor, start: int,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's target logit where the target falls in this part of the vocabulary, else 0; whether it does)
    for logits (n, part) of tokens start .. start + part: what the tensor-parallel head's and vocabulary
    parallelism's split cross-entropies both take from each part."""
    part = logits.shape[-1]
    index = targets - start
    inside = (index >= 0) & (index < part) & (targets != ignore_index)
    if not part:  # (a part with no rows: more shards than tokens)
        return logits.new_zeros(logits.shape[0]), inside
    return logits.gather(1, index.clamp(0, part - 1)[:, None])[:, 0] * inside, inside


def subtract_one_hot_(grad_logits: torch.Tensor, targets: torch.Tensor, start: int, inside: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """softmax x scale - one-hot x scale, in place: take each counted row's `scale` off its target's logit where
    the target falls in this part (`inside`). The gradient of both split cross-entropies."""
    rows = inside.nonzero()[:, 0]
    grad_logits[rows, (targets - start)[rows]] -= scale[rows]
    return grad_logits


class _SplitCrossEntropy(torch.autograd.Function):
    """Per-token losses (n,) from this rank's part of the logits (n, part); 0 where the target is ignored.
    Backward gives this part's gradient, softmax - one-hot, with no communication."""

    @staticmethod
    def forward(ctx, logits, targets, start, ignore_index, group, timeout):
        most, target_logit, inside = split_statistics(logits, targets, start, ignore_index)
        _all_reduce(most, dist.ReduceOp.MAX, group, timeout)
        exp = (logits - most[:, None]).exp()
        sums = torch.stack([exp.sum(dim=-1), target_logit - most * inside])
        _all_reduce(sums, dist.ReduceOp.SUM, group, timeout)
        counted = targets != ignore_index
        ctx.save_for_backward(exp.div_(sums[0][:, None]), targets, inside, counted)
        ctx.start = start
        return (sums[0].log() - sums[1]) * counted

    @staticmethod
    def backward(ctx, grad):
        softmax, targets, inside, counted = ctx.saved_tensors
        scale = grad * counted
        grad_logits = softmax * scale[:, None]  # (a new tensor: a graph kept for a second backward still works)
        return subtract_one_hot_(grad_logits, targets, ctx.start, inside, scale), None, None, None, None, None


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError for a target outside [0, vocab) that is not `ignore_index`, as F.cross_entropy raises (a
    part would count it with a target logit of 0). On a GPU a device-side assert: no wait per microbatch."""
    valid = (((targets >= 0) & (targets < vocab)) | (targets == ignore_index)).all()
    message = f"cross-entropy targets must be in [0, {vocab}) or ignore_index={ignore_index}"
    if targets.is_cuda:
        torch._assert_async(valid, message)
    elif not valid:
        raise ValueError(f"{message}; got {targets.min().item()} .. {targets.max().item()}")


def _evenly_split_by_vocabulary(logits: torch.Tensor) -> bool:
    """Whether `logits` is a DTensor each rank of its (1-d) mesh holds an equal part of, by vocabulary."""
    if not hasattr(logits, "device_mesh"):
        return False
    mesh, placements = logits.device_mesh, tuple(logits.placements)
    return mesh.ndim == 1 and placements[0].is_shard() and placements[0].dim in (-1, logits.dim() - 1) and \
        logits.shape[-1] % mesh.size() == 0


def _all_reduce(t: torch.Tensor, op, group, timeout: float) -> None:
    wait_replicas(dist.all_reduce(t, op=op, group=group, async_op=True), timeout,
                  "the vocabulary-split cross-entropy over the tensor-parallel group")
