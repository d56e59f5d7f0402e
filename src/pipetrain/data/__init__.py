"""Training data from local text: files streamed (files), tokenized once into a memory-mapped
cache (tokens), packed into rows (packing), both parts in one call (rows). Needs the `data` extra
(`pip install 'pipetrain[data]'`: datasets, tokenizers, transformers); importing this package does not.

    data = pt.data.text_rows(["corpus/"], "my-model", seq_len=128, eval_fraction=0.05)
    trainer = pt.Trainer(layers, loss_fn=loss_fn, data=data.train, eval_data=data.held_out, config=config)

It may import torch, numpy and those libraries, never `train`, `pipeline` or the command line.
"""

from .files import DataError, Piece, data_files, read_documents
from .packing import PackedRows, RowFormat, position_ids, split_point
from .rows import TextData, text_rows
from .tokens import Tokens, default_cache_dir, load_tokenizer, open_tokens, tokenize

__all__ = ["DataError", "PackedRows", "Piece", "RowFormat", "TextData", "Tokens", "data_files", "default_cache_dir",
           "load_tokenizer", "open_tokens", "position_ids", "read_documents", "split_point", "text_rows", "tokenize"]
