"""Training and held-out rows from local files in one call: tokenize (cached), split or read held-out
files, pack."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .files import DataError
from .packing import PackedRows, RowFormat, split_point
from .tokens import Tokens, tokenize

Paths = Sequence[str | os.PathLike] | str | os.PathLike


@dataclass(frozen=True)
class TextData:
    """`train` and `held_out` rows (PackedRows) and the token streams they come from."""

    train: PackedRows
    held_out: PackedRows | None
    tokens: Tokens
    held_out_tokens: Tokens | None


def text_rows(paths: Paths, tokenizer_dir: str | os.PathLike, *, seq_len: int, eval_fraction: float = 0.0,
              eval_paths: Paths | None = None, text_field: str = "text",
              format: RowFormat | str = RowFormat.CAUSAL_LM, document_mask: bool = False,
              cache_dir: str | os.PathLike | None = None, progress: bool | None = None,
              min_rows: int = 1) -> TextData:
    """Rows of `seq_len` (+1) tokens of the documents in `paths`, tokenized by the tokenizer in `tokenizer_dir`
    (cached), with a held-out part: the last `eval_fraction` of the documents, or the files `eval_paths`.
    Collective under torch.distributed. Raises DataError if either part has fewer than `min_rows` rows
    (e.g. one batch)."""
    if eval_fraction and eval_paths:
        raise DataError("give eval_fraction or eval_paths (--eval-fraction or --eval-data), not both")
    options = dict(format=format, document_mask=document_mask)
    tokens = tokenize(paths, tokenizer_dir, text_field=text_field, cache_dir=cache_dir, progress=progress)
    held_tokens, held = None, None
    if eval_paths:
        held_tokens = tokenize(eval_paths, tokenizer_dir, text_field=text_field, cache_dir=cache_dir,
                               progress=progress)
        train = PackedRows(tokens, seq_len, **options)
        held = PackedRows(held_tokens, seq_len, **options)
    elif eval_fraction:
        cut = split_point(tokens, eval_fraction)
        train = PackedRows(tokens, seq_len, stop=cut, **options)
        held, held_tokens = PackedRows(tokens, seq_len, start=cut, **options), tokens
    else:
        train = PackedRows(tokens, seq_len, **options)
    for name, rows in (("training", train), ("held-out", held)):
        if rows is not None and len(rows) < min_rows:
            total = rows.stop - rows.start
            raise DataError(f"the {name} data has {total:,} tokens: {len(rows)} rows of seq_len={seq_len} (+1), "
                            f"fewer than one batch of {min_rows}: add data, or lower seq_len or batch_size")
    return TextData(train=train, held_out=held, tokens=tokens, held_out_tokens=held_tokens)
