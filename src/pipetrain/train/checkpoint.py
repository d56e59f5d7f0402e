"""Checkpoints: one shard per layer (weights + optimizer state) and a manifest, written atomically.

    DIR/step_00000010/manifest.json   step, config, layer count, model description, LR scheduler
    DIR/step_00000010/layer_0003.pt   {"model": layer state_dict, "optimizer": {param name: AdamW state}}
    DIR/step_00000010/rng_rank0.pt    each rank's torch RNG state
    DIR/step_00000010/data.pt         where the batch source is (batches drawn, its own state)
    DIR/latest                        the name of the newest complete checkpoint

Shards are keyed by layer index, so a run resumes on any number of pipeline ranks: each rank loads the
layers its new stages hold. Every rank writes into DIR/.tmp-step_00000010; after all have finished, rank 0
renames it into place and then rewrites `latest` (both atomic renames), so a crash mid-save leaves the
last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which has no manifest.json; the checkpoint is damaged")
    return path


def write_shards(tmp: Path, rank: int, layers: dict[int, nn.Module],
                 optimizer: torch.optim.Optimizer | None) -> None:
    """This rank's part: one file per layer it holds (None: its layers have no parameters), its RNG state."""
    tmp.mkdir(parents=True, exist_ok=True)
    groups = optimizer.param_groups if optimizer is not None else []
    state_of = {id(p): optimizer.state[p] for group in groups for p in group["params"] if p in optimizer.state}
    for index, layer in layers.items():
        opt = {name: state_of[id(p)] for name, p in layer.named_parameters() if id(p) in state_of}
        _atomic_save({"model": layer.state_dict(), "optimizer": opt}, tmp / f"layer_{index:04d}.pt")
    _atomic_save({"torch": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")


def discard(tmp: Path) -> None:
    """Remove a temporary checkpoint directory (a save interrupted before it was published)."""
    shutil.rmtree(tmp, ignore_errors=True)


def publish(root: Path, tmp: Path, step: int, manifest: dict) -> Path:
    """Rank 0, after every rank wrote its shards: manifest, rename into place, point `latest` at it."""
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    return final


def read_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def load_layers(path: Path, layers: dict[int, nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Load the given layers' weights and optimizer state from a checkpoint directory."""
    for index, layer in layers.items():
        shard_path = path / f"layer_{index:04d}.pt"
        if not shard_path.exists():
            raise FileNotFoundError(f"{shard_path} is missing: the checkpoint has fewer layers than this model "
                                    "(resume with the same model configuration)")
        shard = torch.load(shard_path, weights_only=False)
        layer.load_state_dict(shard["model"])
        if optimizer is None:
            continue
        for name, p in layer.named_parameters():
            if name in shard["optimizer"]:
                optimizer.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() else v
                                      for k, v in shard["optimizer"][name].items()}


def write_data_state(tmp: Path, state: dict) -> None:
    _atomic_save(state, tmp / "data.pt")


def read_data_state(path: Path) -> dict:
    return torch.load(path / "data.pt", weights_only=False)


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same rank count); return whether it did."""
    file = path / f"rng_rank{rank}.pt"
    if not file.exists():
        return False
    torch.set_rng_state(torch.load(file, weights_only=False)["torch"])
    return True


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
