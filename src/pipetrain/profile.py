"""Per-layer cost sources for the partitioner: uniform, parameter count, measured time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .values import flatten, unflatten


def uniform_costs(layers: Sequence[nn.Module]) -> list[float]:
    return [1.0] * len(layers)


def param_costs(layers: Sequence[nn.Module]) -> list[float]:
    """Number of parameters of each layer (shared parameters counted in every layer that uses them)."""
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def time_costs(layers: Sequence[nn.Module], sample: Any, *, repeats: int = 5,
               warmup: int = 1, device: torch.device | str | None = None) -> list[float]:
    """Median forward+backward seconds of each layer on `sample`, one microbatch of model input (a tensor
    or a tuple/list/dict of tensors).

    The sample flows through the layers in order, so each layer is timed on the input it really gets.
    The layers' gradients, buffers (e.g. BatchNorm statistics) and the global RNG are left as found.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    leaves, spec = flatten(sample, what="sample")
    device = torch.device(device) if device is not None else leaves[0].device
    costs = []
    x = [t.to(device) for t in leaves]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for layer in layers:
            saved_grads = [(p, p.grad) for p in layer.parameters()]
            for p in layer.parameters():
                p.grad = None  # backward below accumulates in place; keep the caller's tensors untouched
            saved_buffers = [(b, b.detach().clone()) for b in layer.buffers()]
            times, out = [], None
            for i in range(warmup + repeats):
                inp = [t.detach().requires_grad_(t.is_floating_point()) for t in x]
                _sync(device)
                start = time.perf_counter()
                out, spec = flatten(layer(unflatten(inp, spec)), what=f"the output of {type(layer).__name__}")
                grads = [t for t in out if t.requires_grad]
                if grads:
                    torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            for p, g in saved_grads:
                p.grad = g
            with torch.no_grad():
                for b, value in saved_buffers:
                    b.copy_(value)
            costs.append(statistics.median(times))
            x = [t.detach() for t in out]
    return costs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
