"""Local text files as documents: .txt (one document per file), .jsonl and .parquet (one per record), or
folders of them, streamed: .jsonl and .parquet with Hugging Face `datasets` in streaming mode, .txt in
pieces of about TEXT_PIECE characters, so no file is ever held whole in memory."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> datasets builder
TEXT_PIECE = 1 << 20  # characters of a .txt file read (and tokenized) at once
# where tokenizers split anyway: after the newline between two lines of text, or between the last two
# newlines before a line of text (a paragraph break: "\n\n" at a piece's end would be one token, not two)
_LINE_BREAK = re.compile(r"\S\n(?=\S)|\n(?=\n\S)")


class Piece(NamedTuple):
    """Text of one document: all of it, or (a .txt file longer than TEXT_PIECE) one piece of it in order;
    `ends_document` marks its last piece."""

    path: Path
    text: str
    ends_document: bool = True


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (or setting) and the fix."""


def need(module: str):
    """Import an optional dependency of pipetrain.data, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"pipetrain.data needs {module}: pip install 'pipetrain[data]'") from None


def data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files that `paths` name, each a file or a folder searched recursively, in a fixed order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data given: name one or more .txt, .jsonl or .parquet files or folders")
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in KINDS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise DataError(f"the folder {name} holds no {'/'.join(KINDS)} files")
            found.extend(inside)
        elif path.is_file():
            if path.suffix not in KINDS:
                raise DataError(f"{name}: unknown kind {path.suffix!r}; pipetrain reads {', '.join(KINDS)}")
            found.append(path)
        else:
            raise DataError(f"{name}: no such file or folder")
    return found


def read_documents(files: Sequence[Path], *, text_field: str = "text") -> Iterator[Piece]:
    """The text of every document, file by file, as Pieces: a .txt file is one document (in pieces when it
    is longer than TEXT_PIECE), a .jsonl line or a .parquet row one document (its `text_field`). A record
    without that field raises DataError naming the file and line."""
    for path in files:
        if path.stat().st_size == 0:  # (an empty file holds no documents)
            continue
        if KINDS[path.suffix] == "text":
            yield from _text_pieces(path)
        else:
            yield from _records(path, text_field)


def _text_pieces(path: Path) -> Iterator[Piece]:
    """A .txt file in pieces of up to about 2 * TEXT_PIECE characters, each cut after a newline between two
    lines of text (where tokenizers split anyway), else at a line or word break (16 * TEXT_PIECE without
    any: anywhere); a file of at most TEXT_PIECE characters is one piece."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(TEXT_PIECE)
            while more := f.read(TEXT_PIECE):
                cut = _cut(text, more[0])
                if cut > 0:
                    yield Piece(path, text[:cut], False)
                    text = text[cut:]
                elif len(text) >= 16 * TEXT_PIECE:  # no line or word break in 16 pieces: cut anywhere
                    yield Piece(path, text, False)
                    text = ""
                text += more
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); convert it, e.g. iconv -t utf-8") from None
    yield Piece(path, text, True)


def _cut(text: str, following: str) -> int:
    """Where to end a piece of `text` (then `following`, the next character): after its last `_LINE_BREAK`
    (in its last 64 KiB), else after its last newline, else before its last space; 0 if it has none."""
    seen = text + following  # (a break at the very end of `text` depends on the character after it)
    if breaks := [b for b in _LINE_BREAK.finditer(seen, max(0, len(text) - 65536)) if b.end() <= len(text)]:
        return breaks[-1].end()
    if (newline := text.rfind("\n")) > 0:
        return newline + 1
    return max(text.rfind(" "), 0)


def _records(path: Path, text_field: str) -> Iterator[Piece]:
    """The `text_field` of each record of a .jsonl or .parquet file, streamed with `datasets`."""
    datasets = need("datasets")
    datasets.disable_progress_bars()
    kind = KINDS[path.suffix]
    stream = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True)
    for i, record in enumerate(stream):
        text = record.get(text_field)
        if not isinstance(text, str):
            what = "has no" if text is None else f"has a {type(text).__name__} in its"
            where = f"line {_line_of_record(path, i)}" if kind == "json" else f"row {i + 1}"
            fields = sorted(k for k, v in record.items() if v is not None)  # (datasets fills absent fields)
            raise DataError(f"{path}: {where} {what} {text_field!r} field (fields: {fields}); name the text field "
                            "with --text-field (text_field=)")
        yield Piece(path, text)


def _line_of_record(path: Path, index: int) -> int:
    """The line number of a .jsonl file's record `index` (0-based), blank lines skipped as datasets does."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                if index == 0:
                    return number
                index -= 1
    return index + 1
