"""The flat buffer a stage's gradients accumulate into and its data-parallel reduction reads: attached as
the parameters' `.grad` before the stage's first backward of a step, handed to the collective at REDUCE."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .tensor_parallel import local, set_grad


def attach_gradients(params: Sequence[nn.Parameter], numels: Sequence[int], length: int) -> torch.Tensor | None:
    """Before a stage's first backward of a step: a zeroed flat buffer of `length` elements whose views
    become the parameters' `.grad`, so autograd (and W's deferred products) accumulate into it in place and
    the reduction reads it without a copy: a GPU's allocator would otherwise hold the gradients twice while
    they move into a new buffer. None, and nothing done, if one of them already has a gradient (an
    accumulation window's, a tied weight's from another stage)."""
    if any(p.grad is not None for p in params):
        return None
    flat = torch.zeros(length, dtype=params[0].dtype, device=params[0].device)
    at = 0
    for p, n in zip(params, numels, strict=True):
        set_grad(p, flat[at:at + n].view(local(p).shape))
        at += n
    return flat


def move_gradients(params: Sequence[nn.Parameter], numels: Sequence[int], length: int,
                   flat: torch.Tensor | None = None) -> torch.Tensor:
    """The flat buffer of `length` elements holding the parameters' gradients end to end (zeros for a
    missing one and past their end): `flat` from `attach_gradients`, where they already are (a gradient
    that is no longer its view is copied in), or a new one. The parameters' `.grad` are dropped. Each
    gradient moves in and is dropped at once, so on the CPU the buffer's pages are touched as the gradients'
    go."""
    fresh = flat is None
    if fresh:
        flat = torch.empty(length, dtype=params[0].dtype, device=params[0].device)
    at = 0
    for p, n in zip(params, numels, strict=True):
        region = flat[at:at + n]
        grad = None if p.grad is None else local(p.grad)
        if grad is None:
            region.zero_()
        elif grad.data_ptr() != region.data_ptr() or grad.numel() != n:
            region.copy_(grad.reshape(-1))
        p.grad = None
        at += n
    if fresh:
        flat[at:].zero_()
    return flat
