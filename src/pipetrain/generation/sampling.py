"""The next token from the last position's logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How `generate` picks each token. temperature 0 is greedy (argmax); otherwise the logits are divided
    by `temperature`, cut to the `top_k` largest, then to the smallest set whose probability reaches
    `top_p` (the order Hugging Face applies them in), and one token is drawn per sequence."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """logits (b, vocab) -> tokens (b,) int64; row i draws from `generators[i]` (its sequence's own stream,
        so a sequence gets the same tokens whichever group or rank count it is decoded in)."""
        if self.greedy:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]  # (b, 1)
            scores = scores.masked_fill(scores < kth, -torch.inf)
        if self.top_p is not None and self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
            drop = before >= self.top_p  # the top token always stays (before = 0)
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, -torch.inf))
        probs = scores.softmax(dim=-1).cpu()
        return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators,
                                                                                      strict=True)]).to(logits.device)


def sequence_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded from `seed` and the sequence's index."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(count)]
