"""What the reference models share: GPT-2's initialization, the [embedding, blocks, head] assembly and the
document mask of packed rows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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


def split_inputs(inputs: torch.Tensor | dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids (b, t), position ids (b, t) or None): the ids alone, or {"input_ids", "position_ids"} of packed
    rows whose positions restart at 0 at each document (pipetrain.data's document_mask)."""
    if isinstance(inputs, torch.Tensor):
        return inputs, None
    if not isinstance(inputs, dict) or set(inputs) != {"input_ids", "position_ids"}:
        raise ValueError("inputs must be token ids (b, t) or a dict of 'input_ids' and 'position_ids' (b, t), got "
                         f"{sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__}")
    return inputs["input_ids"], inputs["position_ids"].expand_as(inputs["input_ids"])


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """Causal attention within documents: a document starts where its position id is 0. (b, t) -> (b, 1, t, t)
    bool, True where query i may attend key j."""
    doc = (positions == 0).cumsum(-1)  # (b, t): the document index of each token
    t = positions.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
