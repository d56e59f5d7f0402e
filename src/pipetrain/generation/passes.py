"""What generation's passes compute on one rank: the P/D actions of a circulation schedule
(`schedule.circulation`), run by the executor (`Executor.run_passes`), which moves their values between ranks.

Each stage keeps a KV cache per group of sequences. A group's prefill passes take its left-padded prompts
`prefill_chunk` tokens at a time; each pass after the last piece decodes one token. The last stage picks
each live sequence's next token and sends the picked tokens to stage 0's next round, with the rows that go
on when some sequences picked `eos_token_id` (every stage drops their cache rows); when all of a group's
sequences have finished, it sends no rows at all, and the executor retires the group stage by stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..schedule.actions import Action
from .kv_cache import GroupCache
from .sampling import Sampling, sequence_generators

PREFILL_CHUNK = 16  # prompt tokens per prefill pass, by default


def group_rows(lengths: Sequence[int], num_groups: int) -> list[list[int]]:
    """Prompt indices per group: sorted by length (less padding), then cut into `num_groups` near-equal runs."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size, extra = divmod(len(order), num_groups)
    cuts = [g * size + min(g, extra) for g in range(num_groups + 1)]
    return [order[cuts[g]:cuts[g + 1]] for g in range(num_groups)]


def checked_prompts(prompts: Sequence[torch.Tensor], max_new_tokens: int) -> list[torch.Tensor]:
    """The prompts as 1-D int64 CPU tensors, after checking them and `max_new_tokens`."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of 1-D token tensors (of any lengths), e.g. "
                        "[torch.tensor([1, 2, 3]), torch.tensor([4, 5])]")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 or p.is_floating_point():
            what = f"a tensor of shape {tuple(p.shape)} {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"prompts[{i}] is {what}; each prompt must be a non-empty 1-D tensor of token ids")
        out.append(p.detach().to("cpu", torch.int64))
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return out


class RankPasses:
    """One rank's passes of one generate call over `stages` (index -> stage: `layers`, `autocast`,
    `device_type`, and the layers' `forward_cached`); `num_stages` in the whole pipeline."""

    def __init__(self, stages: dict[int, Any], num_stages: int, prompts: list[torch.Tensor], max_new_tokens: int,
                 sampling: Sampling, eos_token_id: int | None, seed: int, num_groups: int, prefill_chunk: int,
                 device: torch.device, logprobs: bool = False) -> None:
        self.stages, self.num_stages, self.device = stages, num_stages, device
        self.prompts, self.max_new, self.sampling, self.eos = prompts, max_new_tokens, sampling, eos_token_id
        self.groups = group_rows([len(p) for p in prompts], num_groups)
        self.width = [max(len(prompts[i]) for i in rows) for rows in self.groups]  # each group's padded prompt
        self.chunk = prefill_chunk
        self.prefill_rounds = [-(-w // prefill_chunk) for w in self.width]
        self.rounds = [n + max_new_tokens - 1 for n in self.prefill_rounds]  # the last prefill picks a token
        self.live = [list(rows) for rows in self.groups]  # last stage: the prompt indices still decoding
        self.out: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] | None = [[] for _ in prompts] if logprobs else None
        self.generators = sequence_generators(seed, len(prompts)) if not sampling.greedy else []
        self.caches: dict[tuple[int, int], GroupCache] = {}
        self.padded: dict[int, torch.Tensor] = {}  # stage 0: each group's left-padded prompts, while prefilling

    def finish(self, stage: int, group: int) -> None:
        self.caches.pop((stage, group), None)

    def run(self, action: Action, x: Any, keep: torch.Tensor | None) -> tuple[Any, torch.Tensor | None] | None:
        s, g, t = action.stage, action.mb, action.round
        stage = self.stages[s]
        width, pieces = self.width[g], self.prefill_rounds[g]
        if x is None:  # stage 0 prefill: a piece of the prompts
            x = self._piece(g, t)
        elif s == 0:
            x = x[:, None]  # picked tokens (b,) -> (b, 1)
        if t == 0:
            pad = torch.tensor([width - len(self.prompts[i]) for i in self.groups[g]], device=self.device)
            self.caches[(s, g)] = GroupCache(pad, width + self.max_new - 1, len(stage.layers))
        cache = self.caches[(s, g)]
        if keep is not None:
            cache.keep(keep.to(self.device))
        x = _to(x, self.device)
        autocast = (torch.autocast(stage.device_type, dtype=stage.autocast) if stage.autocast is not None
                    else nullcontext())
        with torch.no_grad(), autocast:
            cache.begin_pass(min(self.chunk, width - t * self.chunk) if t < pieces else 1)
            for layer, layer_cache in zip(stage.layers, cache.layers, strict=True):
                x = layer.forward_cached(x, layer_cache)
        if s < self.num_stages - 1:
            return x, keep
        if t >= pieces - 1:  # the whole prompt is in: a token per round
            return self._pick(t, g, x)
        return None  # (the last stage's prefill of an earlier piece: nothing to pick yet)

    def _piece(self, g: int, t: int) -> torch.Tensor:
        if t == 0:
            rows = [self.prompts[i] for i in self.groups[g]]
            out = torch.zeros(len(rows), self.width[g], dtype=torch.int64)
            for r, p in enumerate(rows):
                out[r, self.width[g] - len(p):] = p
            self.padded[g] = out.to(self.device)  # (b, width), left-padded
        piece = self.padded[g][:, t * self.chunk:(t + 1) * self.chunk]
        if t == self.prefill_rounds[g] - 1:
            del self.padded[g]
        return piece

    def _pick(self, t: int, g: int, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """Last stage: each live sequence's next token; the survivors' go back to stage 0."""
        if logits.dim() == 3:
            logits = logits[:, -1]  # (b, vocab): the last position
        live = self.live[g]
        tokens = self.sampling.pick(logits, [self.generators[i] for i in live] if self.generators else [])
        if self.logprobs is not None:  # under the model's own distribution (temperature 1, nothing cut)
            picked = logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
            for i, lp in zip(live, picked.tolist(), strict=True):
                self.logprobs[i].append(lp)
        finished = []
        for row, (i, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
            self.out[i].append(token)
            if token == self.eos or len(self.out[i]) == self.max_new:
                finished.append(row)
        if t == self.rounds[g] - 1:
            return None  # the group's last round: every rank knows it ends here
        if len(finished) == len(live):
            self.live[g] = []
            return None, torch.zeros(0, dtype=torch.int64, device=self.device)  # no rows go on: the group ends
        keep = None
        if finished:
            gone = set(finished)
            kept = [row for row in range(len(live)) if row not in gone]
            self.live[g] = [live[row] for row in kept]
            keep = torch.tensor(kept, dtype=torch.int64, device=self.device)
            tokens = tokens[keep]
        return tokens, keep


def _to(x: Any, device: torch.device) -> Any:
    """A value from another rank (a tensor or a tree of them) on this rank's device."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)
