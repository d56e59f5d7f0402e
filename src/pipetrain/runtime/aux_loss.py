"""Auxiliary losses (e.g. an MoE load-balancing loss) added from inside a layer's forward.

    class MoE(nn.Module):
        def forward(self, x):
            ...
            pt.add_aux_loss(0.01 * balance_loss)      # a scalar; joins the training objective
            return y

Each stage collects them per microbatch while it runs its forward, and its backward adds their gradient
(weighted 1/M per microbatch, as plain accumulation over M microbatches would weigh it). Outside a
collection (plain inference, a model used without pipetrain) `add_aux_loss` does nothing;
`collect_aux_losses()` lets single-process code gather them the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_state = threading.local()  # per thread: in-process ranks are threads, each collecting its own


def add_aux_loss(loss: torch.Tensor) -> torch.Tensor:
    """Add the scalar `loss` to the objective of the microbatch being computed; returns it unchanged."""
    stack = getattr(_state, "stack", None)
    if not stack:
        return loss
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"add_aux_loss takes a scalar tensor (0-dim), got {shape}: reduce it first, e.g. .mean()")
    stack[-1].append(loss)
    return loss


@contextmanager
def collect_aux_losses() -> Iterator[list[torch.Tensor]]:
    """Gather every `add_aux_loss` made on this thread inside the block into the list it yields."""
    stack = _state.__dict__.setdefault("stack", [])
    found: list[torch.Tensor] = []
    stack.append(found)
    try:
        yield found
    finally:
        stack.pop()
