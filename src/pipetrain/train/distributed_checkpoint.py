"""Checkpoints through torch.distributed.checkpoint (DCP, format 3): the model and optimizer state keyed by
global layer index, so a run resumes at any dp, pp, tp, shard mode or schedule (looped or V stage maps).

    model.{layer}.{name}              a layer's tensor (split by tensor parallel: DCP writes each rank's part)
    optim.{layer}.{name}.{key}        its optimizer state, per parameter as the parameter is split (tp: each
                                      rank's part; a sharded optimizer's pieces gathered to replica 0, as
                                      `Pipeline.optimizer_state(whole=False)` gives it)
    rng.{global rank}                 each rank's torch RNG state (restored on the same layout only)
    trainer                           step, LR scheduler and the data loader's position (one object)

Every rank saves its layers; DCP writes a tensor that several ranks hold (replicas, whole tensors on tp
ranks) once. Loading, every rank asks for its own layers' keys in the shapes its tensors have now (a
DTensor reads only its part), so the layout of the saving run does not matter.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..runtime.tensor_parallel import as_part, is_dtensor, local, placed_as
from .checkpoint import CheckpointError

FORMAT = 3


def save(directory: Path, pipe, optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any],
         rank: int) -> None:
    """Write this rank's part of a checkpoint into `directory` (collective over every rank of the job)."""
    import torch.distributed.checkpoint as dcp

    states = pipe.optimizer_state(optimizer, whole=False) if optimizer is not None else {}
    pipe.unshard()  # (shard="params": the replicas' ranges gathered into whole weights)
    packed = io.BytesIO()  # (one object: DCP would flatten a dict into keys of its own)
    torch.save(trainer_state, packed)
    state: dict[str, Any] = {"trainer": packed, f"rng.{rank}": torch.get_rng_state()}
    for index, layer in pipe.layers.items():
        for key, value in layer.state_dict().items():
            state[f"model.{index}.{key}"] = _own_storage(value)
        for name, p in layer.named_parameters():
            for key, value in states.get(id(p), {}).items():
                state[f"optim.{index}.{name}.{key}"] = _own_storage(value)
    try:
        dcp.save(state, checkpoint_id=directory)
    except (Exception, CheckpointException) as err:  # (DCP's is a BaseException) one line on every rank
        raise _failed("writing", directory, rank, err) from err


@dataclass
class LoadRequest:
    """What this rank reads from a format-3 checkpoint: DCP's state dict (its layers' own tensors, loaded in
    place; empty ones for the optimizer state) and where each optimizer state value goes."""

    directory: Path
    state: dict[str, Any]
    optim: dict[int, dict[str, str]]  # id(parameter) -> {state key: checkpoint key}
    rng: str | None  # this rank's RNG key, when the layout is the saving run's


def request(directory: Path, pipe, rank: int, *, same_layout: bool) -> LoadRequest:
    """This rank's part of loading `directory`, checked against its layers (no communication; after
    `pipe.unshard()`). CheckpointError if a tensor of these layers is missing or of another shape (a checkpoint
    of another model), or the metadata cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        saved = FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as err:  # noqa: BLE001 - a missing or damaged .metadata: name the directory
        raise CheckpointError(f"{directory} has no readable torch.distributed.checkpoint metadata ({err}): the "
                              "checkpoint is damaged; resume from an earlier one with --resume PATH") from None
    state: dict[str, Any] = {"trainer": None}
    optim: dict[int, dict[str, str]] = {}
    for index, layer in pipe.layers.items():
        for key, value in layer.state_dict().items():  # (the parameters' own storage: loaded in place)
            state[_checked(saved, f"model.{index}.{key}", value.shape, directory)] = value
        for name, p in layer.named_parameters():
            prefix = f"optim.{index}.{name}."
            for key in (k for k in saved if k.startswith(prefix) and "." not in k[len(prefix):]):
                meta = saved[key]
                optim.setdefault(id(p), {})[key[len(prefix):]] = key
                state[key] = None
                if isinstance(meta, TensorStorageMetadata):  # (split like its parameter: only this rank's part)
                    state[key] = as_part(torch.empty(local(p).shape if meta.size == p.shape else meta.size,
                                                     dtype=meta.properties.dtype), p)
    rng = f"rng.{rank}" if same_layout and f"rng.{rank}" in saved else None
    if rng is not None:
        state[rng] = torch.empty(saved[rng].size, dtype=torch.uint8)
    return LoadRequest(directory, state, optim, rng)


def load(req: LoadRequest, pipe, optimizer: torch.optim.Optimizer | None, rank: int) -> dict[str, Any]:
    """Read `req` (collective over every rank: each calls it with its own request), put the optimizer state
    into `optimizer` and the RNG state into torch; returns the trainer state."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(req.state, checkpoint_id=req.directory)
    except (Exception, CheckpointException) as err:  # (DCP's is a BaseException) one line on every rank
        raise _failed("reading", req.directory, rank, err) from err
    pipe.adopt_parameters()
    if optimizer is not None:
        by_id = {id(p): p for p in pipe.parameters()}
        pipe.load_optimizer_state(optimizer, {
            pid: {k: _to(req.state[key], by_id[pid]) for k, key in keys.items()} for pid, keys in req.optim.items()})
    if req.rng is not None:
        torch.set_rng_state(req.state[req.rng])
    packed = req.state["trainer"]  # (as saved: torch.save's bytes; DCP itself unpickles objects the same way)
    packed.seek(0)
    return torch.load(packed, weights_only=False)


def _failed(doing: str, directory: Path, rank: int, err: BaseException) -> Exception:
    """DCP's failure as one line: a CheckpointError where DCP met a file it could not write or read (it tells
    every rank), a CommError where a peer stopped (a crashed rank: its connections closed)."""
    from ..runtime.comm import CommError

    if isinstance(err, CheckpointException):
        failures = getattr(err, "failures", {}) or {}
        first = next(iter(failures.values()), err)
        cause = first[0] if isinstance(first, tuple) else first
        text = str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ""
        what = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
        return CheckpointError(f"{doing} the checkpoint {directory} failed on global rank(s) {sorted(failures)} "
                               f"({what}): a file of it is damaged (EOFError: truncated) or the disk failed; resume "
                               "from an earlier one with --resume PATH")
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return CommError(f"global rank {rank}: {doing} the checkpoint {directory} stopped: {text} (another rank may have "
                     "crashed; check its log)")


def _checked(saved: dict, key: str, shape: torch.Size, directory: Path) -> str:
    if key not in saved:
        raise CheckpointError(f"{directory} has no {key}: it is a checkpoint of another model (resume with the "
                              "same model configuration)")
    size = getattr(saved[key], "size", None)
    if size is not None and tuple(size) != tuple(shape):
        raise CheckpointError(f"{directory} holds {key} of shape {tuple(size)}, but this model's is "
                              f"{tuple(shape)}: resume with the same model configuration")
    return key


def _to(value: Any, param: torch.Tensor) -> Any:
    """A loaded optimizer state value on its parameter's device (a step count stays where torch keeps it)."""
    return value.to(param.device) if isinstance(value, torch.Tensor) and value.dim() else value


def _own_storage(value: Any) -> Any:
    """A view of a larger storage copied out (with shard= a stage's parameters are views of one buffer; a
    DTensor's part too)."""
    if not isinstance(value, torch.Tensor) or local(value).untyped_storage().nbytes() <= local(value).nbytes:
        return value
    return placed_as(local(value).clone(), value) if is_dtensor(value) else value.clone()
