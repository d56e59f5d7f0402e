"""Per-layer cost sources for the partitioner and the schedule chooser: uniform, parameter count, measured
time (F + B), measured F, I, W; and the transfer time of what crosses a stage boundary."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..runtime.values import flatten, unflatten


def uniform_costs(layers: Sequence[nn.Module]) -> list[float]:
    return [1.0] * len(layers)


def param_costs(layers: Sequence[nn.Module]) -> list[float]:
    """Number of parameters of each layer that its compute multiplies (shared parameters counted in every
    layer that uses them): an `nn.Embedding`'s table is looked up, not multiplied, and counts only where
    another module of the layer uses it too (a tied head)."""
    costs = []
    for layer in layers:
        looked_up = {id(m.weight) for m in layer.modules() if isinstance(m, nn.Embedding)}
        multiplied = {id(p) for m in layer.modules() if not isinstance(m, nn.Embedding)
                      for p in m.parameters(recurse=False)}
        costs.append(float(sum(p.numel() for p in layer.parameters()
                               if id(p) not in looked_up or id(p) in multiplied)))
    return costs


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
            times, out = [], None
            with _left_as_found(layer):
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
            costs.append(statistics.median(times))
            x = [t.detach() for t in out]
    return costs


def phase_costs(layers: Sequence[nn.Module], sample: Any, *, repeats: int = 3, warmup: int = 1,
                device: torch.device | str | None = None, loss_fn: Callable[[Any, Any], Any] | None = None,
                target: Any = None) -> list[tuple[float, float, float]]:
    """Median (F, I, W) seconds of each layer on `sample`, one microbatch of model input, run as a
    split-backward schedule runs it (one layer per stage, output gradients of ones). With `loss_fn` and
    `target` (the sample's targets) the last layer is timed as the last stage runs it, loss included (a
    large vocabulary's cross-entropy can cost as much as the head). The sample flows through the layers in
    order; their gradients, buffers, the global RNG and their `forward`s are left as found."""
    from ..runtime.deferred_linear import undefer_linears
    from ..runtime.stage import Stage

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    leaves, _ = flatten(sample, what="sample")
    device = torch.device(device) if device is not None else leaves[0].device
    costs, x = [], sample
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, layer in enumerate(layers):
            with_loss = loss_fn is not None and target is not None and index == len(layers) - 1
            stage = Stage(2 if with_loss else 0 if index == 0 else 1, 3, [layer], split_backward=True,
                          device=device, loss_fn=loss_fn)
            times: list[tuple[float, float, float]] = []
            try:
                with _left_as_found(layer):
                    for i in range(warmup + repeats):
                        _sync(device)
                        start = time.perf_counter()
                        out = stage.forward(0, x, target=target if with_loss else None)
                        _sync(device)
                        mid = time.perf_counter()
                        carried = zip(out.leaves, out.signature.leaves, strict=True) if out is not None else ()
                        seeds = [torch.ones_like(t) for t, (_, _, g) in carried if g]
                        stage.backward_input(0, seeds)
                        _sync(device)
                        after_i = time.perf_counter()
                        stage.backward_weight(0)
                        _sync(device)
                        if i >= warmup:
                            times.append((mid - start, after_i - mid, time.perf_counter() - after_i))
            finally:
                stage.clear()
                undefer_linears(layer.modules())
            costs.append(tuple(statistics.median(t[k] for t in times) for k in range(3)))
            x = out
    return costs


def boundary_bytes(layers: Sequence[nn.Module], sample: Any) -> int:
    """The most bytes any layer but the last outputs on `sample`: what the largest stage boundary sends.
    One forward without gradients; the layers' buffers and the global RNG are left as found."""
    largest, x = 0, sample
    leaves, _ = flatten(sample, what="sample")
    device = leaves[0].device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for layer in layers[:-1]:
            with _left_as_found(layer):
                x = layer(x)
            outs, _ = flatten(x, what=f"the output of {type(layer).__name__}")
            largest = max(largest, sum(t.numel() * t.element_size() for t in outs))
    return largest


def transfer_time(transport, nbytes: int, *, timeout: float, repeats: int = 5) -> float:
    """Median seconds to send `nbytes` from rank 0 to rank 1 of `transport` (a round trip, halved), on rank 0;
    rank 1 echoes; every other rank returns 0 at once. Ranks 0 and 1 must both call it."""
    from ..runtime.comm import wait_or_raise

    if transport.world_size < 2 or transport.rank > 1:
        return 0.0
    peer = 1 - transport.rank
    buffer = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=getattr(transport, "device", "cpu"))
    times = []
    for i in range(repeats + 1):  # the first trip sets up the connection
        start = time.perf_counter()
        for send in ((True, False) if transport.rank == 0 else (False, True)):
            work = transport.isend(buffer, peer) if send else transport.irecv(buffer, peer)
            wait_or_raise(work, timeout=timeout, transport=transport, peer=peer, what="timing a transfer")
        if i:
            times.append((time.perf_counter() - start) / 2)
    return statistics.median(times) if transport.rank == 0 else 0.0


@contextmanager
def _left_as_found(layer: nn.Module) -> Iterator[None]:
    """Measure `layer` without a trace: its gradients start empty (backward accumulates in place, and the
    caller's tensors stay untouched) and come back as they were, and so do its buffers (e.g. BatchNorm
    statistics)."""
    saved_grads = [(p, p.grad) for p in layer.parameters()]
    saved_buffers = [(b, b.detach().clone()) for b in layer.buffers()]
    for p in layer.parameters():
        p.grad = None
    try:
        yield
    finally:
        for p, g in saved_grads:
            p.grad = g
        with torch.no_grad():
            for b, value in saved_buffers:
                b.copy_(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
