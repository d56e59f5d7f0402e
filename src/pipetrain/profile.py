"""Per-layer cost sources for the partitioner: uniform, parameter count, measured time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


def uniform_costs(layers: Sequence[nn.Module]) -> list[float]:
    return [1.0] * len(layers)


def param_costs(layers: Sequence[nn.Module]) -> list[float]:
    """Number of parameters of each layer (shared parameters counted in every layer that uses them)."""
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def time_costs(layers: Sequence[nn.Module], sample: torch.Tensor, *, repeats: int = 5,
               warmup: int = 1, device: torch.device | str | None = None) -> list[float]:
    """Median forward+backward seconds of each layer on `sample`, one microbatch of model input.

    The sample flows through the layers in order, so each layer is timed on the input it really gets.
    The layers' gradients, buffers (e.g. BatchNorm statistics) and the global RNG are left as found.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device) if device is not None else sample.device
    costs = []
    x = sample.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for layer in layers:
            saved_grads = [(p, p.grad) for p in layer.parameters()]
            for p in layer.parameters():
                p.grad = None  # backward below accumulates in place; keep the caller's tensors untouched
            saved_buffers = [(b, b.detach().clone()) for b in layer.buffers()]
            times, out = [], None
            for i in range(warmup + repeats):
                inp = x.detach().requires_grad_(x.is_floating_point())
                _sync(device)
                start = time.perf_counter()
                out = layer(inp)
                if out.requires_grad:
                    out.backward(torch.ones_like(out))
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            for p, g in saved_grads:
                p.grad = g
            with torch.no_grad():
                for b, value in saved_buffers:
                    b.copy_(value)
            costs.append(statistics.median(times))
            x = out.detach()
    return costs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
