"""What the reference models share: GPT-2's initialization and the [embedding, blocks, head] assembly."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


def init_normal(layer: nn.Module, n_layers: int, residual: tuple[str, ...]) -> None:
    """GPT-2's initialization: matrices N(0, 0.02), those named with a `residual` suffix (the projections
    into the residual stream) scaled by 1/sqrt(2 n_layers); biases 0, norm weights 1."""
    for name, p in layer.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(residual) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        else:
            nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)


def assemble(embedding: nn.Module, blocks: Sequence[nn.Module], head: nn.Module, *, tie: bool) -> list[nn.Module]:
    """[embedding, *blocks, head], each initialized by its `init_weights()` in that order; with `tie`, the head's
    projection reuses the token embedding matrix (one Parameter in two layers, both (vocab, d))."""
    layers = [embedding, *blocks, head]
    for layer in layers:
        layer.init_weights()
    if tie:
        head.proj.weight = embedding.tok.weight
    return layers
