"""Training metrics: peak memory, JSONL logs, the loss plot (MFU's measured peak: planner.calibrate)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on `device`, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class JsonlWriter:
    """Appends one JSON object per line, flushed each time, so a crashed run keeps its log."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def plot_losses(records: list[dict], path: str | Path, *, title: str = "") -> None:
    """Training loss per step (and held-out loss where logged) as a PNG; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    held = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if held:
        ax.plot([s for s, _ in held], [v for _, v in held], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
