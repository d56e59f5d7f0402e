"""Real text available offline: the Python standard library's own source files, as byte tokens."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a fixed order (installed packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library directory {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor  # uint8 bytes from held-out files
    num_files: int


def load_corpus(max_bytes: int = 8_000_000, holdout_every: int = 10) -> Corpus:
    """Read up to `max_bytes` of stdlib source; every `holdout_every`-th file is held out for evaluation."""
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
    train, val, total, used = bytearray(), bytearray(), 0, 0
    for i, path in enumerate(stdlib_files()):
        if total >= max_bytes:
            break
        data = path.read_bytes()
        (val if i % holdout_every == holdout_every - 1 else train).extend(data)
        total += len(data)
        used += 1
    return Corpus(_as_tensor(train), _as_tensor(val), used)


def _as_tensor(data: bytearray) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.empty(0, dtype=torch.uint8)


class Batches:
    """Random windows of `seq_len + 1` bytes: inputs (b, t) and next-byte targets (b, t), int64. An endless,
    resumable iterable of batches (`state_dict()` is the random generator's state)."""

    def __init__(self, tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int) -> None:
        if tokens.numel() <= seq_len + 1:
            raise ValueError(f"corpus of {tokens.numel()} tokens is too short for seq_len={seq_len}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,),
                               generator=self.generator)
        rows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]  # (b, t), (b, t)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class CausalLMBatches(Batches):
    """Batches as Hugging Face causal LMs take them: ({"input_ids": (b, t + 1)}, labels = the same ids), the
    loss shifting the labels by one (so t next-byte predictions per row)."""

    def next(self) -> tuple[dict, torch.Tensor]:
        x, y = super().next()
        ids = torch.cat([x, y[:, -1:]], dim=1)  # (b, t + 1)
        return {"input_ids": ids}, ids
