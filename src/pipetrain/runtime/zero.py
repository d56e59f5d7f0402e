"""Sharded data parallelism (ZeRO-1 and ZeRO-2): each replica's optimizer owns 1/dp of every gradient bucket.

A bucket (one stage's parameters) moves into one flat buffer, the parameters becoming views of it, and is
cut into dp equal ranges; replica r owns range r. Its optimizer steps only on "pieces": views of that range
of the buffer, so an update lands in the parameters in place, and the other replicas' ranges arrive by one
in-place all-gather into the buffer after the step (an optimizer step post-hook): no copy either way.
Optimizer state is then 1/dp per rank.

    shard="optimizer" (ZeRO-1): each stage's gradients move into one buffer, all-reduced, which then is
        `.grad` (views) as without sharding; the pieces' gradients are views of it.
    shard="gradients" (ZeRO-2): each bucket is reduce-scattered as soon as its stage's last B or W is done
        and the full gradients are freed then: only this replica's range is kept.

Written by hand, not with FSDP2's `fully_shard`: fully_shard reduces a module's gradients from autograd
hooks when its backward ends and keeps parameters sharded between uses (ZeRO-3). A pipeline stage's weight
gradients are complete only after its last B or W of the step (split-backward W runs outside those hooks;
torch.distributed.pipelining calls FSDP's private post_backward to cope), and ZeRO-1/2 keep parameters
whole. Megatron-LM's distributed optimizer shards by hand over contiguous buffers the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import wait_replicas

SHARD_MODES = ("none", "optimizer", "gradients")
# torch 2.13 renamed the tensor forms of these collectives (the old names warn); older torch has only those
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Piece:
    """This replica's part of one parameter: elements [start, stop) of its flattened storage, as a Parameter
    that shares that storage (`master`), the optimizer's view of it."""

    param: nn.Parameter
    start: int
    stop: int
    offset: int  # where the part starts in this replica's range of the bucket
    master: nn.Parameter

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass
class _Bucket:
    params: list[nn.Parameter]  # views of `buffer`, end to end
    size: int  # elements of all params
    shard: int  # elements per replica (size padded up to a multiple of dp, divided by dp)
    pieces: list[Piece]
    buffer: torch.Tensor | None  # shard * dp elements


class ShardedGradients:
    """The replicas' gradient reduction (the executor's `Collectives`, as `GradientAverager`; then finish /
    settle / abandon) plus the pieces an optimizer steps on and the all-gather that follows its step."""

    def __init__(self, group: dist.ProcessGroup, buckets: dict[int, list[nn.Parameter]], timeout: float,
                 mode: str) -> None:
        if mode not in SHARD_MODES[1:]:
            raise ValueError(f"shard={mode!r}: choose one of {SHARD_MODES}")
        self.group, self.mode, self.timeout = group, mode, timeout
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.buckets = {key: self._layout(params) for key, params in buckets.items()}
        self.buckets = {key: b for key, b in self.buckets.items() if b.params}
        self._pending: list[tuple[int, object, torch.Tensor]] = []
        self.has_optimizer = False  # set by `Pipeline.optimizer`: the pieces' optimizer exists

    def _layout(self, params: list[nn.Parameter]) -> _Bucket:
        params = [p for p in params if p.requires_grad]
        if not params:
            return _Bucket([], 0, 0, [], None)
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"shard={self.mode!r} keeps each stage's parameters in one buffer, but a stage holds "
                             f"parameters of {sorted(map(str, kinds))}: give a stage's parameters one dtype and "
                             "device, or shard='none'")
        size = sum(p.numel() for p in params)
        shard = math.ceil(size / self.size)
        buffer = torch.zeros(shard * self.size, dtype=params[0].dtype, device=params[0].device)
        lo, hi = self.rank * shard, (self.rank + 1) * shard
        pieces, at = [], 0
        for p in params:
            view = buffer[at:at + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)  # (the same Parameter, now stored in the bucket's buffer)
            start, stop = max(lo, at), min(hi, at + p.numel())
            if start < stop:
                pieces.append(Piece(p, start - at, stop - at, start - lo, nn.Parameter(buffer[start:stop])))
            at += p.numel()
        return _Bucket(params, size, shard, pieces, buffer)

    # --- gradients ---------------------------------------------------------------------------------------
    def reduce(self, key: int) -> None:
        """Begin reducing bucket `key` over the replicas (asynchronous). A missing gradient counts as zeros."""
        bucket = self.buckets.get(key)
        if bucket is None:
            return
        # each gradient moves into the send buffer and is freed at once: the full gradients are held once
        # (the buffer's pages are touched as they fill, so the process never holds both)
        flat = torch.empty(bucket.shard * self.size, dtype=bucket.params[0].dtype, device=bucket.params[0].device)
        flat[bucket.size:].zero_()
        at = 0
        for p in bucket.params:
            region = flat[at:at + p.numel()]
            if p.grad is None:
                region.zero_()
            else:
                region.copy_(p.grad.reshape(-1))
                p.grad = None
            at += p.numel()
        if self.mode == "optimizer":
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        else:  # in place: this replica's range of `flat` receives its sum
            work = _reduce_scatter(self._mine(bucket, flat), flat, group=self.group, async_op=True)
        self._pending.append((key, work, flat))

    def _mine(self, bucket: _Bucket, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.rank * bucket.shard:(self.rank + 1) * bucket.shard]

    def gather(self, key: int) -> None:
        """(ZeRO-1 and ZeRO-2 keep parameters whole: the all-gather follows the optimizer's step instead.)"""

    def wait_gathered(self, key: int) -> bool:
        return False

    def finish(self, scale: float) -> list[tuple[int, float, float]]:
        """Wait for every started bucket; write its reduced gradients times `scale` into `.grad` as unsharded
        data parallelism does (shard="optimizer"), or add this replica's range of them to the pieces'
        gradients (shard="gradients"). Returns each bucket's wait (key, start, end), `time.perf_counter()`."""
        how = "all-reduce" if self.mode == "optimizer" else "reduce-scatter"
        pending, self._pending = self._pending, []
        if pending and not self.has_optimizer:  # (an optimizer of the parameters would never see a gradient)
            raise RuntimeError(f"shard={self.mode!r}: build the optimizer with pipe.optimizer(make), which steps "
                               "on this replica's shard of the parameters and gathers the others' after each step; "
                               "an optimizer over pipe.parameters() would not train them")
        waited = []
        for key, work, buffer in pending:
            start = time.perf_counter()
            wait_replicas(work, self.timeout, f"the data-parallel gradient {how} of stage {key}")
            waited.append((key, start, time.perf_counter()))
            bucket = self.buckets[key]
            if self.mode == "optimizer":
                flat = buffer.mul_(scale)
                at = 0
                for p in bucket.params:
                    p.grad = flat[at:at + p.numel()].view_as(p)  # (views: the reduced buffer is the gradient)
                    at += p.numel()
                continue  # (the pieces' gradients are views of .grad: `settle`)
            mine = self._mine(bucket, buffer).mul_(scale).clone()  # (only this range is kept, `buffer` goes)
            for piece in bucket.pieces:
                grad = mine[piece.offset:piece.offset + piece.length]
                if piece.master.grad is None:
                    piece.master.grad = grad  # (a view: the reduced range is kept, nothing more)
                else:
                    piece.master.grad.add_(grad)
        return waited

    def settle(self) -> None:
        """After a synced step's gradients are final (`.grad` restored after its window): for
        shard="optimizer", point the pieces' gradients at their ranges of `.grad` (views, no copy)."""
        if self.mode != "optimizer":
            return
        for piece in self.pieces():
            p = piece.param
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            piece.master.grad = None if p.grad is None else p.grad.view(-1)[piece.start:piece.stop]

    def abandon(self) -> None:
        """After a failed step: forget started reductions (the step's gradients are not used)."""
        self._pending.clear()

    # --- the optimizer's side ----------------------------------------------------------------------------
    def pieces(self) -> list[Piece]:
        return [piece for bucket in self.buckets.values() for piece in bucket.pieces]

    def param_groups(self, groups: Sequence[dict]) -> list[dict]:
        """`groups` (torch optimizer parameter groups over the parameters) over this replica's pieces."""
        piece_of: dict[int, list[nn.Parameter]] = {}
        for piece in self.pieces():
            piece_of.setdefault(id(piece.param), []).append(piece.master)
        return [{**g, "params": [m for p in g["params"] for m in piece_of.get(id(p), [])]} for g in groups]

    @torch.no_grad()
    def gather_updates(self) -> None:
        """After this replica's optimizer step on its pieces: every replica's updated ranges into the
        parameters (one all-gather per bucket)."""
        for key, bucket in self.buckets.items():
            mine = bucket.buffer[self.rank * bucket.shard:(self.rank + 1) * bucket.shard]
            wait_replicas(_all_gather(bucket.buffer, mine, group=self.group, async_op=True), self.timeout,
                          f"the all-gather of stage {key}'s updated parameters")

    # --- the optimizer's state, as an unsharded optimizer holds it (checkpoints) --------------------------
    def full_state(self, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
        """{id(parameter): state} of every parameter of this rank's buckets, from every replica's pieces
        (collective over the replicas; the result on replica 0 only, on the CPU, as a checkpoint needs it):
        tensors shaped like a piece are all-gathered per bucket into the parameter's shape, in their own
        dtype; other values (a step count) come from a replica holding a piece of it."""
        size, out, group = self.size, {}, self.group
        scalars = {}
        for key, bucket in self.buckets.items():
            index = {id(p): i for i, p in enumerate(bucket.params)}
            for piece in bucket.pieces:
                state = optimizer.state.get(piece.master)
                if state:  # (a parameter without state, e.g. never given a gradient, stays without)
                    scalars[(key, index[id(piece.param)])] = {
                        k: v for k, v in state.items() if not _shaped_like(v, piece.length)}
        everyone: list = [None] * size
        dist.all_gather_object(everyone, (scalars, _tensor_dtypes(self, optimizer)), group=group)
        dtypes = {name: dtype for _, theirs in everyone for name, dtype in theirs.items()}
        names = sorted(dtypes)
        merged = {}
        for theirs, _ in everyone:
            for where, values in theirs.items():
                merged.setdefault(where, {}).update(values)
        for key, bucket in self.buckets.items():
            p0 = bucket.params[0]
            full = {}
            for name in names:
                mine = torch.zeros(bucket.shard, dtype=getattr(torch, dtypes[name]), device=p0.device)
                for piece in bucket.pieces:
                    value = optimizer.state.get(piece.master, {}).get(name)
                    if value is not None:
                        mine[piece.offset:piece.offset + piece.length].copy_(value)
                flat = torch.empty(bucket.shard * size, dtype=mine.dtype, device=p0.device)
                wait_replicas(_all_gather(flat, mine, group=group, async_op=True), self.timeout,
                              f"the all-gather of stage {key}'s optimizer state")
                if self.rank == 0:  # (the other replicas drop it at once: no full state lingers there)
                    full[name] = flat.cpu()
            if self.rank != 0:
                continue
            at = 0
            for i, p in enumerate(bucket.params):
                if (key, i) in merged:
                    out[id(p)] = {**merged[key, i],
                                  **{name: full[name][at:at + p.numel()].view_as(p).clone() for name in names}}
                    # (the checkpoint reader moves per-element state back to the parameter's device)
                at += p.numel()
        return out

    def load_state(self, optimizer: torch.optim.Optimizer, states: dict[int, dict[str, Any]]) -> None:
        """Cut `states` ({id(parameter): state}, as `full_state` gives) into this replica's pieces."""
        for piece in self.pieces():
            state = states.get(id(piece.param))
            if state is not None:
                optimizer.state[piece.master] = {
                    k: v.reshape(-1)[piece.start:piece.stop].clone() if _like_param(k, v, piece.param) else v
                    for k, v in state.items()}


def _shaped_like(value: Any, numel: int) -> bool:
    """Whether a piece's state value is per element (exp_avg) rather than one value (a step count)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == numel


def _like_param(name: str, value: Any, param: nn.Parameter) -> bool:
    """Whether a parameter's full state value is per element: shaped like it (for a 0-dim parameter, any
    0-dim value but torch optimizers' "step" count)."""
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return False
    return param.dim() > 0 or name != "step"


def _tensor_dtypes(shards: ShardedGradients, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The names and dtypes of this replica's per-element state tensors (e.g. exp_avg: float32)."""
    return {k: str(v.dtype).removeprefix("torch.") for pc in shards.pieces()
            for k, v in optimizer.state.get(pc.master, {}).items() if _shaped_like(v, pc.length)}
