"""The layer cache protocol of generation: what `layer.forward_cached(x, cache)` receives and keeps.

A layer that generates implements `forward_cached(x, cache)`, the same computation as `forward` on only the
new tokens of each sequence (a prompt at prefill, then one token per step):

    cache.positions   (b, t) int64   each new token's position in its own sequence (prompts are left-padded:
                                     padding shares position 0 with the first real token)
    cache.attn_mask   (b, 1, t, T)   bool: which of the T keys (all so far, these tokens included) each new
                                     token may attend (causal, never padding); `additive_mask(dtype)` as 0/-inf
    cache.update(k, v) -> (k, v)     appends this step's keys and values (b, kv_heads, t, head_dim) and returns
                                     all of them (b, kv_heads, T, head_dim); HF attention calls it as
                                     `update(k, v, layer_idx, ...)`, which it accepts

A layer without keys and values (embedding, norm, head) reads `positions` or nothing. The caches of a
group live on its stage from prefill until the group finishes; sequences that stop leave them (`keep`).
"""

from __future__ import annotations

import torch


class GroupCache:
    """One group of sequences on one stage: the mask and positions of the current pass, a LayerCache per layer.

    `pad[i]` is how many padding tokens lead row i's prompt (padded to the group's longest);
    `capacity` is the most tokens a row will hold (the padded prompt + max_new_tokens - 1)."""

    def __init__(self, pad: torch.Tensor, capacity: int, num_layers: int) -> None:
        self.pad = pad  # (b,)
        self.capacity = capacity
        self.length = 0  # columns filled (padding included), the same for every row
        self.valid = torch.zeros(len(pad), capacity, dtype=torch.bool, device=pad.device)  # (b, capacity)
        self.layers = [LayerCache(self) for _ in range(num_layers)]
        self.positions = torch.zeros(len(pad), 0, dtype=torch.long, device=pad.device)
        self.attn_mask = torch.zeros(len(pad), 1, 0, 0, dtype=torch.bool, device=pad.device)
        self._window_masks: dict[int, torch.Tensor] = {}

    def begin_pass(self, t: int) -> None:
        """Set positions and mask for the next `t` tokens of every row (a piece of the padded prompts, or
        one new token)."""
        start, device = self.length, self.pad.device
        if start + t > self.capacity:
            raise RuntimeError(f"the group's cache holds {self.capacity} tokens per sequence; pass {start + t} "
                               "tokens would overflow it")
        cols = torch.arange(start, start + t, device=device)  # (t,) the new tokens' columns
        self.valid[:, start:start + t] = cols >= self.pad[:, None]
        self.positions = (cols[None] - self.pad[:, None]).clamp(min=0)  # (b, t)
        keys = torch.arange(start + t, device=device)  # (T,)
        causal = keys[None] <= cols[:, None]  # (t, T)
        own = keys[None] == cols[:, None]  # a padding query attends itself (never empty)
        self.attn_mask = (causal & self.valid[:, None, :start + t]) | own  # (b, t, T)
        self.attn_mask = self.attn_mask[:, None]  # (b, 1, t, T)
        self._window_masks.clear()
        self.length = start + t

    def window_mask(self, window: int) -> torch.Tensor:
        """`attn_mask` restricted to keys fewer than `window` tokens back (sliding-window attention)."""
        if window not in self._window_masks:
            t, total = self.attn_mask.shape[-2:]
            cols = torch.arange(total - t, total, device=self.pad.device)
            near = torch.arange(total, device=self.pad.device)[None] > cols[:, None] - window  # (t, T)
            self._window_masks[window] = self.attn_mask & near
        return self._window_masks[window]

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` (indices into the current rows) stay: the others' sequences have finished."""
        self.pad, self.valid = self.pad[rows], self.valid[rows]
        for layer in self.layers:
            layer.keep(rows)


class LayerCache:
    """One layer's keys and values for one group (allocated at the first `update`), and the group's mask
    and positions (see the module docstring for the protocol)."""

    def __init__(self, group: GroupCache) -> None:
        self.group = group
        self.k: torch.Tensor | None = None  # (b, kv_heads, capacity, head_dim)
        self.v: torch.Tensor | None = None
        self.filled = 0

    @property
    def positions(self) -> torch.Tensor:
        return self.group.positions

    @property
    def attn_mask(self) -> torch.Tensor:
        return self.group.attn_mask

    def additive_mask(self, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
        """The mask as 0 where attended and the dtype's minimum elsewhere, (b, 1, t, T) (HF attention's form)."""
        mask = self.group.attn_mask if window is None else self.group.window_mask(window)
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)

    def update(self, k: torch.Tensor, v: torch.Tensor, *_: object, **__: object) -> tuple[torch.Tensor, torch.Tensor]:
        b, heads, t, _ = k.shape
        end = self.group.length
        if self.k is None:
            shape = (b, heads, self.group.capacity, k.shape[-1])
            self.k = k.new_empty(shape)
            self.v = v.new_empty((*shape[:-1], v.shape[-1]))
        if end - t != self.filled:
            raise RuntimeError(f"update() got {t} new tokens after {self.filled} cached, but this pass has "
                               f"{end - self.filled}: call it once per forward_cached")
        self.k[:, :, self.filled:end] = k
        self.v[:, :, self.filled:end] = v
        self.filled = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]
