"""A token stream cut into training rows: rows of seq_len + 1 consecutive tokens (each row's last token is
the next row's first, so every token but the first is a target once), documents packed across rows
without padding; optionally with position ids that restart at each document (the document mask).

    tokens   a b c EOS d e EOS f g h i j ...     (seq_len = 4: rows of 5 tokens, stride 4)
    row 0    a b c EOS d                         position ids 0 1 2 3 0
    row 1    d e EOS f g                         position ids 0 1 2 0 1
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

from .files import DataError
from .tokens import Tokens


class RowFormat(Enum):
    """How a row reaches the model: Hugging Face causal LMs take the whole row as input_ids and as labels
    (the loss shifts them); the reference models take inputs = row[:-1] and targets = row[1:]."""

    CAUSAL_LM = "causal_lm"
    SHIFTED = "shifted"


class PackedRows:
    """A map-style dataset of the rows of `ids[start:stop]` (a torch Dataset: `len`, `[i]`), for `pt.Trainer`.

    Row i is `ids[start + i*seq_len : start + i*seq_len + seq_len + 1]`, read from the memory map only when
    asked for. With `document_mask`, the inputs carry "position_ids" that restart at 0 after each EOS (and at
    the row's start), which the reference models and `from_hf` layers turn into a block-diagonal causal
    mask, and no target crosses into the next document (-100 where a document starts): a packed row then
    trains exactly as its documents would alone.
        CAUSAL_LM: ({"input_ids" (t+1,) [, "position_ids" (t+1,)]}, labels (t+1,))
        SHIFTED:   (input ids (t,), targets (t,))  or, with document_mask, ({"input_ids", "position_ids"} (t,), ...)
    """

    def __init__(self, tokens: Tokens, seq_len: int, *, start: int = 0, stop: int | None = None,
                 format: RowFormat | str = RowFormat.CAUSAL_LM, document_mask: bool = False) -> None:
        stop = len(tokens) if stop is None else stop
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens, self.seq_len, self.start, self.stop = tokens, seq_len, start, stop
        self.format = RowFormat(format)
        self.document_mask = document_mask
        self.rows = max(0, (stop - start - 1) // seq_len)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} of {self.rows}")
        begin = self.start + i * self.seq_len
        row = torch.from_numpy(self.tokens.ids[begin:begin + self.seq_len + 1].astype(np.int64))  # (t+1,)
        positions = position_ids(row, self.tokens.eos) if self.document_mask else None
        labels = row.clone()
        if positions is not None:
            labels[1:][positions[1:] == 0] = -100  # the first token of a document: predicted from another one
        if self.format is RowFormat.CAUSAL_LM:
            inputs = {"input_ids": row} if positions is None else {"input_ids": row, "position_ids": positions}
            return inputs, labels
        x, y = row[:-1], labels[1:]  # (t,), (t,)
        return x if positions is None else {"input_ids": x, "position_ids": positions[:-1]}, y


def position_ids(row: torch.Tensor, eos: int) -> torch.Tensor:
    """Positions within each document: 0 at the row's start and right after every EOS. (n,) -> (n,)"""
    n = row.shape[-1]
    index = torch.arange(n)
    starts = torch.zeros(n, dtype=torch.bool)
    starts[0] = True
    starts[1:] = row[:-1] == eos
    last_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
    return index - last_start


def split_point(tokens: Tokens, eval_fraction: float) -> int:
    """Where the held-out tokens begin: the last `eval_fraction` of the stream, cut after a document's EOS so
    that no document is in both parts (or exactly at the fraction if no document ends past it)."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    cut = int(len(tokens) * (1 - eval_fraction))
    ends = np.flatnonzero(tokens.ids[cut:] == tokens.eos)
    if len(ends) and cut + ends[0] + 1 < len(tokens):
        cut = cut + int(ends[0]) + 1
    return cut
