"""An accumulation window: the steps from one with `sync_gradients=True` to the next, and how its
gradients are normalized at its end (1/dp for a mean loss, 1/(its global count) for a token mean)."""

from __future__ import annotations

import torch
from torch import nn

from .executor import AUX_LOSSES, LOSS_COUNT, PAIR_LOSSES


class Window:
    """An accumulation window: the steps from one with `sync_gradients=True` to the next. The gradients
    from before it are set aside, so that a token-mean window can be normalized by its own total count."""

    def __init__(self, params: list[nn.Parameter], num_tokens: float | None) -> None:
        self.params = params
        self.earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        self.num_tokens = num_tokens
        self.count = 0.0
        self.pair: bool | None = None
        self.aux = False

    def add(self, totals: torch.Tensor, num_tokens: float | None) -> None:
        pair = bool(totals[PAIR_LOSSES] > 0)
        if self.pair is not None and pair != self.pair:
            raise ValueError("loss_fn returned a mean in one step of an accumulation window and a (loss_sum, count) "
                             "pair in another; return the same kind in every step")
        if num_tokens != self.num_tokens:
            raise ValueError(f"num_tokens={num_tokens} differs from {self.num_tokens} given earlier in this "
                             "accumulation window; pass the window's total count to each of its steps")
        if num_tokens is not None and not pair:
            raise ValueError("num_tokens= is for a loss_fn returning (loss_sum, count); this one returns a mean")
        self.pair = pair
        self.count += float(totals[LOSS_COUNT])
        self.aux = self.aux or bool(totals[AUX_LOSSES] > 0)

    def close(self, dp_size: int) -> float:
        """What the window's gradients (summed over the replicas) are multiplied by."""
        if not self.pair:
            return 1.0 / dp_size
        if self.num_tokens is not None:
            if abs(self.count - self.num_tokens) > 1e-6 * max(1.0, self.num_tokens):
                raise ValueError(f"num_tokens={self.num_tokens:g}, but loss_fn counted {self.count:g} over this "
                                 "window's steps (and replicas); the gradients would be off by their ratio")
            return 1.0
        if self.aux:
            raise ValueError("pt.add_aux_loss with a loss_fn returning (loss_sum, count): the auxiliary losses' "
                             "weight relative to the token mean needs the window's token count before the "
                             "backward; pass step(..., num_tokens=N), N the total count over the window's "
                             "batches and replicas (e.g. the number of labels that are not -100)")
        return 1.0 / max(self.count, 1.0)

    def restore(self, *, drop_new: bool = False) -> None:
        """Put the gradients from before the window back (added to the window's, unless dropped)."""
        for p, old in zip(self.params, self.earlier, strict=True):
            if old is None:
                if drop_new:
                    p.grad = None
            elif p.grad is None or drop_new:
                p.grad = old
            else:
                p.grad = old.add_(p.grad)
