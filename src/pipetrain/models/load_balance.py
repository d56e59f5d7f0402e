"""The Switch Transformer load-balancing loss of a mixture of experts, as sums a pipeline carries.

    loss = E * sum_e (tokens_e / rows) * (probs_e / rows)

over every MoE layer of the model at once: tokens_e counts the top-k choices of expert e, probs_e sums the
router's softmax for e, rows counts the tokens (padding left out), all summed over layers. That is HF's
`load_balancing_loss_func` (Mixtral, Qwen3-MoE). The layers of one microbatch sit on several stages, so each
adds its `RouterSums` to those it received and the last stage forms the loss: exact, with the gradient
reaching every layer's router through `probs`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RouterSums(NamedTuple):
    tokens: torch.Tensor  # (E,) float32, top-k choices per expert (no gradient)
    probs: torch.Tensor  # (E,) float32, the router's probabilities summed over tokens
    rows: torch.Tensor  # () float32, tokens counted


def router_sums(logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> RouterSums:
    """One layer's sums: logits (n, E) of n tokens, mask (n,) 1 where a token counts (None: all)."""
    probs = torch.softmax(logits, dim=-1)  # (n, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (n, top_k)
    weight = torch.ones(len(logits), device=logits.device) if mask is None else mask.reshape(-1).float()  # (n,)
    tokens = torch.zeros(logits.shape[-1], device=logits.device).scatter_add_(
        0, chosen.reshape(-1), weight.repeat_interleave(top_k))
    return RouterSums(tokens, (probs.float() * weight[:, None]).sum(0), weight.sum())


def add_sums(a: RouterSums | None, b: RouterSums) -> RouterSums:
    return b if a is None else RouterSums(*(x + y for x, y in zip(a, b, strict=True)))


def balance_loss(sums: RouterSums) -> torch.Tensor:
    """E * sum_e (tokens_e / rows) * (probs_e / rows): 1 when the load is even, E when one expert gets all."""
    return len(sums.tokens) * (sums.tokens * sums.probs).sum() / sums.rows.square()
