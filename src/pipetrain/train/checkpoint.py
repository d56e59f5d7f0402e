"""Checkpoint directories: a manifest, atomic publishing, `latest`, pruning; and the reader of pipetrain's
own earlier format (format 2). What a checkpoint holds is written by `distributed_checkpoint` (DCP).

    DIR/step_00000010/manifest.json   format, step, layout (dp, pp, tp), config, layer count, model description
    DIR/step_00000010/.metadata, __0_0.distcp, ...   torch.distributed.checkpoint's files (format 3)
    DIR/latest                        the name of the newest complete checkpoint

Every rank writes into DIR/.tmp-step_00000010; after all have finished, rank 0 writes the manifest (under a
temporary name, flushed to disk, then renamed), renames the directory into place and then rewrites `latest`
(atomic renames, the directory entries flushed too), so a crash or a kill mid-save leaves the last complete
checkpoint intact. `prune` keeps the newest K.

Format 2 (read only, for runs saved before DCP): `layer_0003.pt` per layer ({"model": state dict,
"optimizer": {param name: state}}), `rng_rank0.pt` per rank, `data.pt`. Reading checks what it reads and
names the file: a truncated or garbage shard, a broken manifest, a `latest` naming nothing raise
`CheckpointError` (the trainer makes every rank raise it, see `Trainer.load`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from ..runtime.tensor_parallel import load_whole_state


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


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
        raise CheckpointError(f"{pointer} names {path}, which has no manifest.json: the checkpoint is damaged; "
                              f"resume from another one with --resume {root}/step_...")
    return path


def checkpoint_at(path: str | Path) -> Path:
    """A checkpoint directory given by the user (`--resume PATH`), checked to be one."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        found = sorted(p.name for p in path.glob("step_*")) if path.is_dir() else []
        hint = f" (it holds {', '.join(found[-3:])}: give one of those)" if found else ""
        raise CheckpointError(f"{path} is not a checkpoint: it has no manifest.json{hint}")
    return path


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints under `root` (never the one `latest` names);
    returns what it removed."""
    current = latest(root)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "manifest.json").exists())
    removed = [p for p in steps[:-keep] if p != current] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def discard(tmp: Path) -> None:
    """Remove a temporary checkpoint directory (a save interrupted before it was published)."""
    shutil.rmtree(tmp, ignore_errors=True)


def publish(root: Path, tmp: Path, step: int, manifest: dict) -> Path:
    """Rank 0, after every rank wrote its shards: manifest, rename into place, point `latest` at it."""
    _atomic_write(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    _sync_dir(tmp)
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _sync_dir(root)
    _atomic_write(root / "latest", lambda f: f.write(final.name.encode()))  # last: it names only a complete checkpoint
    return final


MANIFEST_KEYS = ("step", "world_size", "num_layers", "model")


def read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} cannot be read ({err}): the checkpoint is damaged; resume from an earlier "
                              "one with --resume PATH") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise CheckpointError(f"{file} is not a pipetrain manifest (no {', '.join(missing)}): the checkpoint is "
                              "damaged or not pipetrain's") from None
    return manifest


def _load(file: Path, what: str) -> dict:
    """torch.load of one checkpoint file (tensors and plain values only), naming it if it is damaged."""
    if not file.exists():
        raise CheckpointError(f"{file} is missing: {what}")
    try:
        loaded = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - zip, unpickling and EOF errors alike: name the file
        raise CheckpointError(f"{file} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}): "
                              "the file is truncated or not a checkpoint shard; resume from an earlier checkpoint "
                              "with --resume PATH") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{file} holds a {type(loaded).__name__}, not a checkpoint shard")
    return loaded


def load_format_2(path: Path, pipe, optimizer: torch.optim.Optimizer | None, train_data) -> None:
    """Resume `pipe`, `optimizer` and the batch source from a checkpoint of this earlier format."""
    states = load_layers(path, pipe.layers)
    pipe.adopt_parameters()
    if optimizer is not None:
        pipe.load_optimizer_state(optimizer, states)
    train_data.load_state_dict(read_data_state(path))


def load_layers(path: Path, layers: dict[int, nn.Module]) -> dict[int, dict]:
    """Load the given layers' weights from a checkpoint directory; return their optimizer state,
    {id(parameter): state} (for `Pipeline.load_optimizer_state`)."""
    states = {}
    for index, layer in layers.items():
        shard_path = path / f"layer_{index:04d}.pt"
        shard = _load(shard_path, "the checkpoint has fewer layers than this model (resume with the same model "
                                  "configuration)")
        try:
            load_whole_state(layer, shard["model"])  # (tensor parallel: each rank keeps its part)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{shard_path} does not fit layer {index} ({type(layer).__name__}): "
                                  f"{str(err).splitlines()[0][:300]}") from None
        for name, p in layer.named_parameters():
            if name in shard["optimizer"]:
                states[id(p)] = {k: v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() else v
                                 for k, v in shard["optimizer"][name].items()}
    return states


def read_data_state(path: Path) -> dict:
    return _load(path / "data.pt", "the checkpoint has no data position")


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG if the checkpoint has one for it (same rank count); return whether it did."""
    file = path / f"rng_rank{rank}.pt"
    if not file.exists():
        return False
    torch.set_rng_state(_load(file, "")["torch"])
    return True


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` under a temporary name, flushed to disk, then renamed: `path` is whole or absent."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries (the renames in it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
