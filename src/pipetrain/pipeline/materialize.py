"""Layers built on the meta device made real on one rank: storage for this rank's layers only, shared
parameters kept shared, and an initialization that depends only on a seed and the layer's index."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

_GENERATORS = threading.Lock()  # torch's global generators, shared by in-process ranks (threads)


def on_meta(layer: nn.Module, index: int) -> bool:
    """Whether `layer` was built on the meta device (its parameters all or none; buffers may be shared with
    a layer materialized already)."""
    params = [p.is_meta for p in layer.parameters()]
    if any(params) and not all(params):
        raise ValueError(f"layer {index} ({type(layer).__name__}) has some parameters on the meta device and some "
                         "not: build each layer either wholly on the meta device or wholly on a real one")
    return any(params) or any(b.is_meta for b in layer.buffers())


def refuse_meta(layers: list[nn.Module], what: str, fix: str) -> None:
    """Raise naming `what` (which runs every layer to time it) and `fix` if any layer is on the meta device."""
    if any(on_meta(layer, i) for i, layer in enumerate(layers)):
        raise ValueError(f"{what} runs every layer to time it, and layers on the meta device cannot run: {fix}")


def materialize(layers: Mapping[int, nn.Module], device: torch.device, seed: int,
                then: Callable[[int, nn.Module], None] | None = None) -> dict[int, torch.Tensor]:
    """Give the meta tensors of `layers` (index -> layer, this rank's) storage on `device`, then initialize
    each such layer under a random seed made of `seed` and its index, so any split of the model over ranks
    starts from the same weights. A tensor shared by two layers (tied weights) stays one tensor, initialized
    by the first layer that uses it. Returns {id(meta tensor): its replacement}.

    One layer at a time, each followed by `then(index, layer)` (e.g. keeping 1/ep of its experts): a tensor
    `then` takes out of the layer is let go at once, so the rank never holds more than one layer whole.

    A layer initializes itself with `init_weights()` if it has one, else every submodule's
    `reset_parameters()`; a layer with parameters or buffers that neither covers is refused."""
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the meta tensor stays referenced: ids stay unique
    done: set[int] = set()  # tensors an earlier layer initialized
    for i in sorted(i for i, layer in layers.items() if on_meta(layer, i)):
        layer = layers[i]
        for module in layer.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and t.is_meta:
                        if id(t) not in replaced:
                            real = torch.empty_like(t, device=device)
                            if isinstance(t, nn.Parameter):
                                real = nn.Parameter(real, requires_grad=t.requires_grad)
                            replaced[id(t)] = (t, real)
                        table[name] = replaced[id(t)][1]
        tensors = [*layer.parameters(), *layer.buffers()]
        kept = [(t, t.detach().clone()) for t in tensors if id(t) in done]
        with torch.no_grad(), _seeded(seed, i, device):
            initialize(layer, i)
            for t, value in kept:
                t.copy_(value)
        done.update(id(t) for t in tensors)
        if then is not None:
            then(i, layer)
            gone = {id(t) for t in tensors} - {id(t) for t in (*layer.parameters(), *layer.buffers())}
            for key in [key for key, (_, real) in replaced.items() if id(real) in gone]:
                del replaced[key]  # (taken out by `then`: its storage goes with this layer's turn)
            done -= gone  # (and its id may come back with another tensor)
    return {key: real for key, (_, real) in replaced.items()}


def initialize(layer: nn.Module, index: int) -> None:
    """`layer.init_weights()`, or `reset_parameters()` of every submodule that has tensors of its own."""
    init = getattr(layer, "init_weights", None)
    if callable(init):
        init()
        return
    for name, module in layer.named_modules():
        own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if not own:
            continue
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            where = f"its submodule {name!r} ({type(module).__name__})" if name else "it"
            raise ValueError(f"layer {index} ({type(layer).__name__}) was built on the meta device, but {where} has "
                             "parameters or buffers and no reset_parameters(): give the layer an init_weights() "
                             "method that sets all of its parameters and buffers")
        reset()


@contextmanager
def _seeded(seed: int, index: int, device: torch.device) -> Iterator[None]:
    """Run with torch's generators (CPU, and `device`'s) seeded from (seed, index); restore them after.
    One layer at a time per process: in-process ranks (threads) share the generators."""
    device = torch.device(device)
    devices = [device] if device.type != "cpu" else []
    with _GENERATORS, torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed((int(seed) * 1_000_003 + int(index)) % 2**63)
        yield
