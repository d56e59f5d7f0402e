"""Local text files as documents: .txt (one document per file), .jsonl and .parquet (one per record), or
folders of them, read with Hugging Face `datasets` in streaming mode (nothing is loaded whole)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> datasets builder


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


def read_documents(files: Sequence[Path], *, text_field: str = "text") -> Iterator[tuple[Path, str]]:
    """(file, text) of every document, streamed file by file: a .txt file is one document, a .jsonl line or
    a .parquet row one document (its `text_field`). A record without that field raises DataError."""
    datasets = need("datasets")
    datasets.disable_progress_bars()
    for path in files:
        if path.stat().st_size == 0:  # (datasets fails on an empty file; it holds no documents)
            continue
        kind = KINDS[path.suffix]
        options = {"sample_by": "document"} if kind == "text" else {}
        field = "text" if kind == "text" else text_field
        stream = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True, **options)
        for i, record in enumerate(stream):
            text = record.get(field)
            if not isinstance(text, str):
                what = "has no" if text is None else f"has a {type(text).__name__} in its"
                unit = "line" if kind == "json" else "row"
                raise DataError(f"{path}: {unit} {i + 1} {what} {field!r} field (fields: {sorted(record)}); name the "
                                "text field with --text-field (text_field=)")
            yield path, text
