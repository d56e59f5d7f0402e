"""One stage: its layers and the per-microbatch activations it keeps from F until B."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .split_backward import PendingWeightGrad, backward_input, backward_weight


class Stage:
    """Stage `index` of `num_stages`: runs its layers forward and backward one microbatch at a time.

    F caches the stage input (as a leaf that collects its gradient) and output for a microbatch; B
    back-propagates the gradient of the output (or, on the last stage, the scaled loss), frees the
    cache and returns the gradient of the input for the previous stage. I does only the input part of
    B and keeps what W needs; W then accumulates the weight gradients and frees the rest.
    With `checkpoint=True` the forward keeps only the stage input and recomputes the rest in backward.
    """

    def __init__(self, index: int, num_stages: int, layers: Sequence[nn.Module], *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 checkpoint: bool = False, autocast: torch.dtype | None = None) -> None:
        self.index = index
        self.num_stages = num_stages
        self.layers = list(layers)
        self.module = nn.Sequential(*self.layers)
        self.loss_fn = loss_fn
        self.checkpoint = checkpoint
        self.autocast = autocast
        self._cache: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._weight_work: dict[int, PendingWeightGrad | None] = {}
        self.losses: dict[int, torch.Tensor] = {}  # last stage: unscaled loss of each microbatch

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def forward(self, mb: int, x: torch.Tensor, *, target: torch.Tensor | None = None,
                loss_scale: float = 1.0, grad: bool = True) -> torch.Tensor | None:
        """Run the layers on microbatch `mb`; return the output to pass on (None on the last stage)."""
        if self.autocast is None:
            return self._forward(mb, x, target, loss_scale, grad)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self._forward(mb, x, target, loss_scale, grad)

    def _forward(self, mb: int, x: torch.Tensor, target: torch.Tensor | None, loss_scale: float,
                 grad: bool) -> torch.Tensor | None:
        if not grad:
            with torch.no_grad():
                out = self.module(x)
                if self.is_last:
                    self.losses[mb] = self.loss_fn(out, target).detach()
                    return None
                return out
        inp = None
        if not self.is_first:
            inp = x.detach().requires_grad_(x.is_floating_point())
            x = inp
        out = checkpoint(self.module, x, use_reentrant=False) if self.checkpoint else self.module(x)
        if self.is_last:
            loss = self.loss_fn(out, target).float()
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar (mean over the microbatch); got shape "
                                 f"{tuple(loss.shape)}")
            self.losses[mb] = loss.detach()
            self._cache[mb] = (inp, loss * loss_scale)
            return None
        self._cache[mb] = (inp, out)
        return out.detach()

    def backward(self, mb: int, grad_output: torch.Tensor | None) -> torch.Tensor | None:
        """Back-propagate microbatch `mb`; free its cache; return the gradient of the stage input."""
        inp, out = self._cache.pop(mb)
        if out.requires_grad:
            torch.autograd.backward(out, grad_output)
        if inp is None or not inp.requires_grad:
            return None
        return inp.grad if inp.grad is not None else torch.zeros_like(inp)

    def backward_input(self, mb: int, grad_output: torch.Tensor | None) -> torch.Tensor | None:
        """I: the gradient of the stage input only; what W needs stays until `backward_weight(mb)`."""
        inp, out = self._cache.pop(mb)
        grad_in, self._weight_work[mb] = backward_input(out, grad_output, inp, list(self.module.parameters()))
        return grad_in

    def backward_weight(self, mb: int) -> None:
        """W: accumulate this microbatch's weight gradients and free what I kept."""
        backward_weight(self._weight_work.pop(mb))

    def pending(self) -> list[int]:
        """Microbatches whose activations are still held (empty after a complete step)."""
        return sorted(set(self._cache) | set(self._weight_work))

    def clear(self) -> None:
        self._cache.clear()
        self._weight_work.clear()
        self.losses.clear()
