"""The trainer's batch source: global batches from a map-style dataset or an iterable, resumable, each
replica taking its share.

- A map-style dataset (`__len__` and `__getitem__`, e.g. a torch Dataset) holds samples: every epoch is a
  seeded permutation, cut into batches of `batch_size` samples (a last partial batch is dropped) and
  collated with `torch.utils.data.default_collate`.
- Any other iterable yields whole global batches. If it has `state_dict()`/`load_state_dict()` (as
  `pipetrain.train.data.Batches` does), resuming restores that state; otherwise the batches already drawn are
  drawn again and skipped.

Every rank draws the same global batches, so the order does not depend on the data-parallel degree, and a
run resumes on another one; a replica takes its contiguous rows: `next_share()` reads only those samples of
a map-style dataset (e.g. `pipetrain.data.PackedRows`, a memory-mapped token file), `share()` cuts them
from a whole batch of an iterable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from ..runtime.values import flatten, unflatten


class BatchSource:
    def __init__(self, data: Any, *, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.map_style = hasattr(data, "__getitem__") and hasattr(data, "__len__")
        if self.map_style and len(data) < batch_size:
            raise ValueError(f"the dataset holds {len(data)} samples, fewer than one batch of {batch_size}")
        if not self.map_style and not hasattr(data, "__iter__"):
            raise TypeError(f"data must be a map-style dataset of samples or an iterable of batches, got "
                            f"{type(data).__name__}")
        self.drawn = 0  # batches handed out so far
        self._iterator = None
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def next(self) -> Any:
        batch = self._sample_batch() if self.map_style else self._next_from_iterable()
        self.drawn += 1
        return batch

    def next_share(self, dp: int, dp_rank: int) -> Any:
        """Replica `dp_rank`'s contiguous 1/dp of the rows of the next global batch (of dp replicas): from a
        map-style dataset only those samples are read; an iterable's batch is drawn whole and cut."""
        if not self.map_style or dp == 1:
            return share(self.next(), dp, dp_rank)
        if self.batch_size % dp:
            raise ValueError(f"a global batch of {self.batch_size} rows does not split over dp={dp} replicas")
        n = self.batch_size // dp
        batch = self._sample_batch(slice(dp_rank * n, (dp_rank + 1) * n))
        self.drawn += 1
        return batch

    def _sample_batch(self, rows_of: slice = slice(None)) -> Any:
        per_epoch = len(self.data) // self.batch_size
        epoch, k = divmod(self.drawn, per_epoch)
        if self._order is None or self._order[0] != epoch:
            n = len(self.data)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
                     if self.shuffle else torch.arange(n))
            self._order = (epoch, order)
        rows = self._order[1][k * self.batch_size:(k + 1) * self.batch_size][rows_of].tolist()
        return default_collate([self.data[i] for i in rows])

    def _next_from_iterable(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.data)
        try:
            return next(self._iterator)
        except StopIteration:
            raise RuntimeError(f"the batch iterable ran out after {self.drawn} batches; give an endless iterable "
                               "(or a map-style dataset, which repeats in new shuffled epochs)") from None

    def state_dict(self) -> dict:
        state = {"drawn": self.drawn}
        if not self.map_style and hasattr(self.data, "state_dict"):
            state["data"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]
        if self.map_style:
            return
        self._iterator = None
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
            return
        for _ in range(self.drawn):  # no state to restore: replay the stream up to where it was
            self._next_from_iterable()


def share(batch: Any, dp: int, dp_rank: int) -> Any:
    """Replica `dp_rank`'s contiguous 1/dp of the rows (dim 0) of every tensor in `batch`."""
    if dp == 1:
        return batch
    leaves, spec = flatten(batch, what="the batch")
    rows = leaves[0].shape[0]
    if rows % dp:
        raise ValueError(f"a global batch of {rows} rows does not split over dp={dp} replicas")
    n = rows // dp
    return unflatten([t[dp_rank * n:(dp_rank + 1) * n] for t in leaves], spec)
