"""Hugging Face safetensors checkpoints of a Pipeline of `from_hf` layers: each rank reads and writes only
its own stages' tensors.

    DIR/config.json                        the model's config (written by rank 0)
    DIR/model.safetensors.index.json       {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    DIR/model-00001-of-00002.safetensors   pipeline rank 0's tensors, under the model's own names
    DIR/model-00002-of-00002.safetensors   pipeline rank 1's ...
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.comm import fail_together
from ..runtime.tensor_parallel import local, part_like, whole
from .hf_conversion import Reader, stored

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def load_weights(pipe, directory: str | Path) -> None:
    """Fill this rank's layers from the HF checkpoint in `directory` (`model.safetensors`, shards listed by
    `model.safetensors.index.json`, or the same as PyTorch `pytorch_model.bin` files, memory-mapped and
    unpickled with `weights_only`), reading only this rank's tensors. Call it on every rank, after building
    the Pipeline (e.g. from a model built on the meta device). If it fails on any rank, it raises on every
    rank."""
    error = None
    pipe.unshard()  # (shard="params": whole parameters to write into; the shards take them after)
    try:
        _load(pipe, Path(directory))
        pipe.adopt_parameters()
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = err
        pipe.reshard()  # (a part-way load: drop the whole parameters; the shards still hold the old values)
    finally:
        _bin.cache_clear()
    _raise_everywhere(pipe, error, "load_weights")


def _load(pipe, directory: Path) -> None:
    files = _files_by_name(directory)
    reader = None
    done: set[int] = set()
    missing = []
    for names, tensor in _tensors(pipe):
        if id(tensor) in done:
            continue
        reader = reader or Reader(_model(pipe), list(files), lambda n: _read(files[n], n))
        name = next((n for n in names if n in reader), None)  # (stored as is, or in the form HF converts)
        if name is None:
            missing.append(names[0])
            continue
        value = reader(name)
        if value.shape != tensor.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} in {directory} but {tuple(tensor.shape)} in "
                             "the model: the checkpoint is of another configuration")
        with torch.no_grad():  # (split by tensor parallel: this rank's part)
            local(tensor).copy_(part_like(value, tensor, split=False))
        done.add(id(tensor))
    if missing:
        raise KeyError(f"{len(missing)} tensors of rank {pipe.rank}'s layers are not in the checkpoint in {directory}, "
                       f"e.g. {missing[:3]}: is it a checkpoint of this model?")


# what a model folder holds besides its weights and config: copied by save_pretrained(source=...)
COMPANIONS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def save_pretrained(pipe, directory: str | Path, *, source: str | Path | None = None) -> None:
    """Write the pipeline's weights as a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained`
    loads: each pipeline rank (of the first replica; tensor-parallel ranks gather their split tensors and the
    first writes them) writes its own shard, rank 0 the index and config.json
    (and, from the `source` model folder, its generation config and tokenizer files: `COMPANIONS`).
    Call it on every rank; it returns once the directory is complete. `directory` must be on a filesystem
    every rank sees. If it fails on any rank, it raises on every rank."""
    directory = Path(directory)
    error = None
    pipe.unshard()  # (shard="params": whole parameters, gathered from the replicas)
    try:
        if _first_replica(pipe):  # (with its ep peers, which gather their experts)
            _write_shard(pipe, directory)
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = err
    _raise_everywhere(pipe, error, "save_pretrained (writing the shards)")
    try:
        if pipe.dp_rank == 0 and pipe.rank == 0 and pipe.tp_rank == 0:
            _write_index(directory, [_shard(r, pipe.world_size) for r in range(pipe.world_size)])
            config = copy.deepcopy(next(iter(pipe.layers.values())).config)
            config.dtype = next(p.dtype for p in pipe.parameters() if p.is_floating_point())
            config.save_pretrained(directory)
            for name in COMPANIONS if source is not None else ():
                if (Path(source) / name).is_file() and Path(source).resolve() != directory.resolve():
                    shutil.copyfile(Path(source) / name, directory / name)
    except Exception as err:  # noqa: BLE001
        error = err
    _raise_everywhere(pipe, error, "save_pretrained (writing the index, config.json and the tokenizer)")


def _write_shard(pipe, directory: Path) -> None:
    """This pipeline rank's tensors, under the model's names (a weight tied across ranks by its first use)."""
    from safetensors.torch import save_file

    copies = {id(p) for p in pipe.parameters()} - {id(p) for p in pipe.owned_parameters()}
    tensors, seen = {}, set()
    for names, tensor in _tensors(pipe):
        if id(tensor) not in seen and id(tensor) not in copies:  # a tied weight: saved once, by its first use
            seen.add(id(tensor))
            tensors[names[0]] = whole(tensor.detach()).to("cpu").contiguous()  # (collective over tp or ep)
    if pipe.tp_rank != 0 or (pipe.ep_mesh is not None and pipe.ep_mesh.get_local_rank() != 0):
        return  # (one writer per pipeline rank of the first replica)
    tensors = stored(_model(pipe), tensors)  # (as save_pretrained writes them: e.g. an MoE's experts one by one)
    directory.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, str(directory / _shard(pipe.rank, pipe.world_size)),
              metadata={"format": "pt", "size": str(size)})


def _first_replica(pipe) -> bool:
    """Whether this rank is in the first replica, or with expert parallel in the first ep group (its ep ranks
    are replicas too): by the mesh's coordinates, not by the order of the ranks."""
    if pipe.ep_mesh is None:
        return pipe.dp_rank == 0
    return pipe.expert_dp_group is None or dist.get_rank(pipe.expert_dp_group) == 0


def _model(pipe):
    """The transformers model this rank's layers came from (its class and config name its conversions)."""
    return next(iter(pipe.layers.values())).hf_model


def _tensors(pipe) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(the model's names, tensor) of every tensor in this rank's layers' state dicts, in layer order."""
    for index, layer in sorted(pipe.layers.items()):
        keys = getattr(layer, "hf_keys", None)
        if keys is None:
            raise TypeError(f"layer {index} ({type(layer).__name__}) did not come from pipetrain.models.hf.from_hf; "
                            "Hugging Face checkpoints are read and written for from_hf layers only")
        state = layer.state_dict(keep_vars=True)
        for key, names in keys.items():
            yield names, state[key]


BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"


def has_weights(directory: str | Path) -> bool:
    """Whether `directory` holds a checkpoint `load_weights` reads (safetensors, or PyTorch .bin)."""
    return any((Path(directory) / name).exists() for name in (INDEX, SINGLE, BIN_INDEX, BIN))


def _files_by_name(directory: Path) -> dict[str, Path]:
    for index in (INDEX, BIN_INDEX):
        if (directory / index).exists():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return {name: directory / file for name, file in weight_map.items()}
    if (directory / SINGLE).exists():
        from safetensors import safe_open

        with safe_open(directory / SINGLE, framework="pt", device="cpu") as f:  # reads the header only
            return {name: directory / SINGLE for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if (directory / BIN).exists():
        return {name: directory / BIN for name in _bin(directory / BIN)}
    raise FileNotFoundError(f"no {SINGLE}, {INDEX}, {BIN} or {BIN_INDEX} in {directory}: no weights to load")


def _read(file: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors or .bin file (only its bytes are read)."""
    if file.suffix == ".bin":
        return _bin(file)[name]
    from safetensors import safe_open

    with safe_open(file, framework="pt", device="cpu") as f:  # closed after each: mapped pages go too
        return f.get_tensor(name)


@functools.lru_cache(maxsize=2)
def _bin(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch .bin state dict, memory-mapped (tensors are read when touched) and unpickled safely
    (`weights_only`: tensors and plain containers only, no code)."""
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a legacy (non-zip) or damaged file: say which
        raise ValueError(f"{file} cannot be read as a PyTorch state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); save the model with safetensors "
                         "(save_pretrained(safe_serialization=True))") from None


def _write_index(directory: Path, shards: list[str]) -> None:
    from safetensors import safe_open

    weight_map, total = {}, 0
    for shard in shards:
        with safe_open(directory / shard, framework="pt", device="cpu") as f:  # the header only
            weight_map.update({name: shard for name in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
            total += int(f.metadata()["size"])
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _shard(rank: int, world: int) -> str:
    return f"model-{rank + 1:05d}-of-{world:05d}.safetensors"


def _raise_everywhere(pipe, error: BaseException | None, what: str) -> None:
    """Every rank raises if `what` failed on any pipeline rank (or replica): see `fail_together`."""
    fail_together(error, rank=pipe.rank, world_size=pipe.world_size, sum_all=pipe.all_reduce, what=what,
                  name="pipeline rank {}".format)
