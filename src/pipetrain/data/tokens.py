"""Documents tokenized once into an on-disk cache: token ids with EOS after each document, a memory-mapped
numpy file keyed by the files (paths, sizes, mtimes), the tokenizer and the settings.

    CACHE/<key>/tokens.bin    the ids, uint16 (vocabularies up to 65,536) or uint32, back to back
    CACHE/<key>/meta.json     {"tokens", "documents", "dtype", "eos", "vocab_size", "files"}

A cache is written into CACHE/.tmp-<key>-<host>.<pid namespace>-<pid>-<thread> and renamed into place
when complete, so a crash never leaves half of one (the next writer in that host's PID namespace removes
what a killed one left). Under torch.distributed, each node's local rank 0 tokenizes while the others
wait, and every rank learns of an error any of them met (the same line on every rank, no hang).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import DataError, data_files, need, read_documents

FORMAT = 2  # bump when the cache's layout or contents change
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "tokenizer.model", "added_tokens.json")
BATCH = 1000  # documents (or pieces) tokenized at once, at most
BATCH_CHARS = 4 << 20  # characters tokenized at once, at most (16 MiB: 2.6 GiB peak on a 60 MB .txt; 4: 1.5)


@dataclass(frozen=True)
class Tokens:
    """A cached token stream: `ids` (memory-mapped, read-only), the EOS id between documents, the tokenizer's
    vocabulary size and the number of documents."""

    ids: np.ndarray
    eos: int
    vocab_size: int
    documents: int
    path: Path
    from_cache: bool = False  # read from a cache an earlier run wrote (not tokenized now)

    def __len__(self) -> int:
        return len(self.ids)


def default_cache_dir() -> Path:
    """$PIPETRAIN_CACHE, else $XDG_CACHE_HOME/pipetrain/tokens (~/.cache/pipetrain/tokens)."""
    if os.environ.get("PIPETRAIN_CACHE"):
        return Path(os.environ["PIPETRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipetrain" / "tokens"


def check_tokenizer_dir(directory: str | os.PathLike) -> None:
    """DataError unless `directory` holds a tokenizer (tokenizer.json or tokenizer_config.json)."""
    path = Path(directory)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"no tokenizer in {directory} (no tokenizer.json or tokenizer_config.json): save one there "
                        "with tokenizer.save_pretrained(DIR)")


def load_tokenizer(directory: str | os.PathLike):
    """The folder's tokenizer (transformers.AutoTokenizer, local files only); it must have an EOS token."""
    check_tokenizer_dir(directory)
    transformers = need("transformers")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to load is the same fix for the user
        raise DataError(f"cannot load the tokenizer in {directory}: {type(err).__name__}: {err}") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer in {directory} has no EOS token (put between documents): set eos_token and "
                        "save it again")
    return tokenizer


def cache_key(files: Sequence[Path], tokenizer_dir: str | os.PathLike, text_field: str) -> str:
    """A hash of everything the cached ids depend on: each file's path, size and mtime, the tokenizer's
    files, the text field and the cache format."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "text_field": text_field}).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for name in TOKENIZER_FILES:
        file = Path(tokenizer_dir) / name
        if file.is_file():
            h.update(name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()[:24]


def tokenize(paths: Sequence[str | os.PathLike] | str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
             text_field: str = "text", cache_dir: str | os.PathLike | None = None,
             progress: bool | None = None) -> Tokens:
    """The token stream of the documents in `paths` (files or folders), from the cache if it has them, else
    tokenized with the tokenizer in `tokenizer_dir` and cached. Collective under torch.distributed (call it
    on every rank): each node's local rank 0 tokenizes, the others wait; an error raises on every rank."""
    files = data_files(paths)
    check_tokenizer_dir(tokenizer_dir)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / cache_key(files, tokenizer_dir, text_field)
    error = None
    cached = (final / "meta.json").is_file()
    if not cached and _is_writer():
        try:
            _write(files, tokenizer_dir, text_field, root, final, progress)
        except DataError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - e.g. a malformed file: every rank must hear of it
            error = f"reading {', '.join(map(str, files))}: {type(err).__name__}: {err}"

    _agree(error)
    return dataclasses.replace(open_tokens(final), from_cache=cached)


def open_tokens(directory: str | os.PathLike) -> Tokens:
    """A finished cache directory, memory-mapped."""
    path = Path(directory)
    meta = json.loads((path / "meta.json").read_text())
    ids = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["tokens"],)) \
        if meta["tokens"] else np.zeros(0, dtype=meta["dtype"])
    return Tokens(ids=ids, eos=meta["eos"], vocab_size=meta["vocab_size"], documents=meta["documents"], path=path)


def _write(files: list[Path], tokenizer_dir, text_field: str, root: Path, final: Path, progress: bool | None) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    tmp = root / f".tmp-{final.name}-{writer_place()}-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    total, documents = 0, 0
    bar = _bar(sum(f.stat().st_size for f in files), progress)
    try:
        with open(tmp / "tokens.bin", "wb") as out:
            pieces: list = []

            def flush() -> None:
                nonlocal total, documents
                if not pieces:
                    return
                for piece, ids in zip(pieces, tokenizer([p.text for p in pieces], add_special_tokens=False)[
                        "input_ids"], strict=True):
                    if piece.ends_document:
                        ids.append(tokenizer.eos_token_id)
                        documents += 1
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    total += len(ids)
                if bar is not None:
                    bar.update(sum(len(p.text.encode()) for p in pieces))
                pieces.clear()

            held = 0  # characters in `pieces`
            for piece in read_documents(files, text_field=text_field):
                pieces.append(piece)
                held += len(piece.text)
                if len(pieces) == BATCH or held >= BATCH_CHARS:
                    flush()
                    held = 0
            flush()
        if documents == 0:
            raise DataError(f"no documents in {', '.join(map(str, files))}: the data is empty")
        meta = {"tokens": total, "documents": documents, "dtype": np.dtype(dtype).name, "eos": tokenizer.eos_token_id,
                "vocab_size": vocab, "files": [str(f) for f in files], "text_field": text_field}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another node's writer finished the same cache first: it holds the same ids
            if not (final / "meta.json").is_file():
                raise
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def writer_place() -> str:
    """Where a writer's process ids mean something: the host and its PID namespace (containers sharing a
    hostname have namespaces of their own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}.{namespace}"


def _remove_abandoned(root: Path) -> None:
    """Remove the temporary folders of writers in this host's PID namespace that died (killed while
    tokenizing)."""
    place = writer_place()
    for tmp in root.glob(".tmp-*"):
        head, pid, _thread = tmp.name.rsplit("-", 2) if tmp.name.count("-") >= 3 else ("", "", "")
        if head.endswith(f"-{place}") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _bar(total_bytes: int, progress: bool | None):
    """A tqdm bar over the text's bytes (on stderr), if tqdm is installed and wanted (default: a terminal)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr)


def _is_writer() -> bool:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return True
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


def _agree(error: str | None) -> None:
    """Wait for the writers; raise the first error any rank met, on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise DataError(error)
