"""Sharded data parallelism (ZeRO-1, 2 and 3): each replica's optimizer owns 1/dp of every gradient bucket.

A bucket (one stage's parameters) moves into one flat buffer, the parameters becoming views of it, and is
cut into dp equal ranges; replica r owns range r. Its optimizer steps only on "pieces": views of that range,
so optimizer state is 1/dp per rank.

    shard="optimizer" (ZeRO-1): each stage's gradients move into one buffer, all-reduced, which then is
        `.grad` (views) as without sharding; the pieces' gradients are views of it.
    shard="gradients" (ZeRO-2): each bucket is reduce-scattered by its stage's REDUCE (right after its last
        B or W) and the full gradients are freed then: only this replica's range is kept.
    shard="params" (ZeRO-3): as ZeRO-2, and the parameters are whole only during a step: the buffer is
        released when its stage's gradients are reduced, and all-gathered again from the replicas' ranges
        (kept apart, `own`) by the stage's GATHER at the next step's start. A pipeline keeps them whole
        across the step's microbatches (no gather per microbatch, as torchtitan's reshard_after_forward=False).

ZeRO-1/2: the pieces are views of the buffer's own range, so an update lands in the parameters in place, and
the other replicas' ranges arrive by one in-place all-gather into the buffer after the optimizer's step (a
step post-hook). ZeRO-3: the pieces are views of `own`, and the step post-hook releases the buffers.

Written by hand, not with FSDP2's `fully_shard`: fully_shard reduces a module's gradients from autograd
hooks when its backward ends and gathers per module call. A pipeline stage's weight gradients are complete
only after its last B or W of the step (split-backward W runs outside those hooks;
torch.distributed.pipelining calls FSDP's private post_backward to cope), and here each collective is an
action of the schedule (checked and simulated). Megatron-LM's distributed optimizer shards by hand over
contiguous buffers the same way.
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
from .gradient_buffer import attach_gradients, move_gradients
from .tensor_parallel import local, set_grad

SHARD_MODES = ("none", "optimizer", "gradients", "params")
# torch 2.13 renamed the tensor forms of these collectives (the old names warn); older torch has only those
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Piece:
    """This replica's part of one parameter: elements [start, stop) of it flattened, as a Parameter that
    shares the storage of this replica's range (`master`), the optimizer's view of it."""

    param: nn.Parameter
    start: int
    stop: int
    offset: int  # where the part starts in this replica's range of the bucket
    master: nn.Parameter
    shape: torch.Size  # the parameter's (which, released under shard="params", holds no data)

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass
class _Bucket:
    params: list[nn.Parameter]  # views of `buffer`, end to end
    shapes: list[torch.Size]
    size: int  # elements of all params
    shard: int  # elements per replica (size padded up to a multiple of dp, divided by dp)
    pieces: list[Piece]
    buffer: torch.Tensor | None  # shard * dp elements; None while released (shard="params")
    own: torch.Tensor | None = None  # shard="params": this replica's range, kept while the buffer is released
    gathering: object = None  # shard="params": the all-gather refilling `buffer`, until waited for

    def numels(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]


class ShardedGradients:
    """The replicas' gradient reduction (the executor's `Collectives`, as `GradientAverager`; then finish /
    settle / abandon) plus the pieces an optimizer steps on and the all-gather that follows its step."""

    def __init__(self, group: dist.ProcessGroup, buckets: dict[int, list[nn.Parameter]], timeout: float,
                 mode: str, needs: dict[int, set[int]] | None = None) -> None:
        """`needs[stage]`: the buckets holding parameters that stage's forward uses (default: its own)."""
        if mode not in SHARD_MODES[1:]:
            raise ValueError(f"shard={mode!r}: choose one of {SHARD_MODES}")
        self.group, self.mode, self.timeout = group, mode, timeout
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.buckets = {key: self._layout(params) for key, params in buckets.items()}
        self.buckets = {key: b for key, b in self.buckets.items() if b.params}
        self.needs = {stage: {k for k in keys if k in self.buckets} for stage, keys in (needs or {}).items()}
        self._pending: list[tuple[int, object, torch.Tensor]] = []
        self._attached: dict[int, torch.Tensor | None] = {}  # this step's gradient buffers, by bucket
        self.has_optimizer = False  # set by `Pipeline.optimizer`: the pieces' optimizer exists

    def _layout(self, params: list[nn.Parameter]) -> _Bucket:
        params = [p for p in params if p.requires_grad]
        if not params:
            return _Bucket([], [], 0, 0, [], None)
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"shard={self.mode!r} keeps each stage's parameters in one buffer, but a stage holds "
                             f"parameters of {sorted(map(str, kinds))}: give a stage's parameters one dtype and "
                             "device, or shard='none'")
        shapes = [local(p).shape for p in params]  # (under tensor parallel: this rank's slices)
        size = sum(math.prod(shape) for shape in shapes)
        shard = math.ceil(size / self.size)
        buffer = torch.zeros(shard * self.size, dtype=params[0].dtype, device=params[0].device)
        lo, hi = self.rank * shard, (self.rank + 1) * shard
        at = 0
        for p, shape in zip(params, shapes, strict=True):
            view = buffer[at:at + math.prod(shape)]
            view.copy_(local(p).detach().reshape(-1))
            local(p).data = view.view(shape)  # (the same Parameter, now stored in the bucket's buffer)
            at += view.numel()
        # ZeRO-3's range lives apart from the buffer, which is released between steps
        own = buffer[lo:hi].clone() if self.mode == "params" else None
        mine = own if own is not None else buffer[lo:hi]
        pieces, at = [], 0
        for p, shape in zip(params, shapes, strict=True):
            start, stop = max(lo, at), min(hi, at + math.prod(shape))
            if start < stop:
                pieces.append(Piece(p, start - at, stop - at, start - lo, nn.Parameter(mine[start - lo:stop - lo]),
                                    shape))
            at += math.prod(shape)
        return _Bucket(params, shapes, size, shard, pieces, buffer, own)

    # --- gradients ---------------------------------------------------------------------------------------
    def before_backward(self, stage: int) -> None:
        """Before stage `stage`'s backward: its bucket's gradients go straight into the buffer its
        reduction reads (`attach_gradients`), once per step."""
        bucket = self.buckets.get(stage)
        if bucket is not None and stage not in self._attached:
            self._attached[stage] = attach_gradients(bucket.params, bucket.numels(), bucket.shard * self.size)

    def reduce(self, key: int) -> None:
        """Begin reducing bucket `key` over the replicas (asynchronous). A missing gradient counts as zeros."""
        bucket = self.buckets.get(key)
        if bucket is None:
            return
        if self.mode == "params":  # (the stage's last use of its parameters this step is done: free them
            self._release(bucket)  # before the gradients' buffer is made)
        flat = move_gradients(bucket.params, bucket.numels(), bucket.shard * self.size, self._attached.pop(key, None))
        if self.mode == "optimizer":
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        else:  # in place: this replica's range of `flat` receives its sum
            work = _reduce_scatter(self._mine(bucket, flat), flat, group=self.group, async_op=True)
        self._pending.append((key, work, flat))

    def _mine(self, bucket: _Bucket, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.rank * bucket.shard:(self.rank + 1) * bucket.shard]

    # --- ZeRO-3's parameters ------------------------------------------------------------------------------
    def gather(self, stage: int) -> None:
        """shard="params": begin all-gathering the released buckets stage `stage`'s forward needs, its own
        first (asynchronous). ZeRO-1 and ZeRO-2 keep parameters whole: nothing to do."""
        keys = self.needs.get(stage, set()) | ({stage} & self.buckets.keys())
        for key in sorted(keys, key=lambda k: (k != stage, k)):
            if self.buckets[key].buffer is None:
                self._launch_gather(key)

    def wait_gathered(self, stage: int) -> bool:
        """Before stage `stage`'s forward: wait for the gathers of the buckets it needs (launching any not yet
        launched). Whether it waited on one."""
        waited = False
        for key in sorted(self.needs.get(stage, ())):
            bucket = self.buckets[key]
            if bucket.buffer is None:
                self._launch_gather(key)
            if bucket.gathering is not None:
                wait_replicas(bucket.gathering, self.timeout, f"the all-gather of stage {key}'s parameters")
                bucket.gathering, waited = None, True
        return waited

    def unshard(self) -> None:
        """Make every bucket's parameters whole (gather the released ones and wait): collective."""
        for key, bucket in self.buckets.items():
            if bucket.buffer is None:
                self._launch_gather(key)
        for key, bucket in self.buckets.items():
            if bucket.gathering is not None:
                wait_replicas(bucket.gathering, self.timeout, f"the all-gather of stage {key}'s parameters")
                bucket.gathering = None

    def reshard(self) -> None:
        """shard="params": release every whole bucket (after the optimizer changed this replica's ranges)."""
        if self.mode == "params":
            for bucket in self.buckets.values():
                if bucket.buffer is not None:
                    self._release(bucket)

    @torch.no_grad()
    def take_written(self) -> None:
        """shard="params": after whole parameters were written (weights loaded), take this replica's range
        of each bucket into `own`."""
        if self.mode == "params":
            for bucket in self.buckets.values():
                if bucket.buffer is not None:
                    bucket.own.copy_(self._mine(bucket, bucket.buffer))

    def _launch_gather(self, key: int) -> None:
        bucket = self.buckets[key]
        buffer = torch.empty(bucket.shard * self.size, dtype=bucket.own.dtype, device=bucket.own.device)
        at = 0
        for p, shape, n in zip(bucket.params, bucket.shapes, bucket.numels(), strict=True):
            local(p).data = buffer[at:at + n].view(shape)  # (filled when the gather is waited for)
            at += n
        bucket.buffer = buffer
        bucket.gathering = _all_gather(buffer, bucket.own, group=self.group, async_op=True)

    def _release(self, bucket: _Bucket) -> None:
        """Free a bucket's buffer: its parameters hold an empty tensor until gathered again."""
        if bucket.gathering is not None:  # (never freed under a collective still writing it)
            wait_replicas(bucket.gathering, self.timeout, "an all-gather of parameters")
            bucket.gathering = None
        empty = bucket.own.new_empty(0)
        for p in bucket.params:
            local(p).data = empty
        bucket.buffer = None

    def wait(self) -> list[tuple[int, float, float]]:
        """Wait for every started reduction (bounded); each one's wait (key, start, end), in
        `time.perf_counter()` seconds."""
        return wait_all(self._pending, self.timeout, "all-reduce" if self.mode == "optimizer" else "reduce-scatter")

    def finish(self, scale: float) -> None:
        """After `wait`: write each started bucket's reduced gradients times `scale` into `.grad` as unsharded
        data parallelism does (shard="optimizer"), or add this replica's range of them to the pieces'
        gradients (shard="gradients" | "params")."""
        self.wait()  # (at once when waited for)
        pending, self._pending = self._pending, []
        if pending and not self.has_optimizer:  # (an optimizer of the parameters would never see a gradient)
            raise RuntimeError(f"shard={self.mode!r}: build the optimizer with pipe.optimizer(make), which steps "
                               "on this replica's shard of the parameters and gathers the others' after each step; "
                               "an optimizer over pipe.parameters() would not train them")
        for key, _, buffer in pending:
            bucket = self.buckets[key]
            if self.mode == "optimizer":
                flat = buffer.mul_(scale)
                at = 0
                for p, shape, n in zip(bucket.params, bucket.shapes, bucket.numels(), strict=True):
                    set_grad(p, flat[at:at + n].view(shape))  # (views: the reduced buffer is the gradient)
                    at += n
                continue  # (the pieces' gradients are views of .grad: `settle`)
            mine = self._mine(bucket, buffer).mul_(scale).clone()  # (only this range is kept, `buffer` goes)
            for piece in bucket.pieces:
                grad = mine[piece.offset:piece.offset + piece.length]
                if piece.master.grad is None:
                    piece.master.grad = grad  # (a view: the reduced range is kept, nothing more)
                else:
                    piece.master.grad.add_(grad)

    def settle(self) -> None:
        """After a synced step's gradients are final (`.grad` restored after its window): for
        shard="optimizer", point the pieces' gradients at their ranges of `.grad` (views, no copy)."""
        if self.mode != "optimizer":
            return
        for piece in self.pieces():
            p = piece.param
            if p.grad is not None and not local(p.grad).is_contiguous():
                set_grad(p, local(p.grad).contiguous())
            piece.master.grad = None if p.grad is None else local(p.grad).view(-1)[piece.start:piece.stop]

    def abandon(self) -> None:
        """After a failed step: forget started reductions (the step's gradients are not used)."""
        self._pending.clear()
        self._attached.clear()

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
        parameters (one all-gather per bucket); ZeRO-3 releases them instead (the next step gathers)."""
        if self.mode == "params":
            return self.reshard()
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
            device = bucket.pieces[0].master.device if bucket.pieces else bucket.params[0].device
            full = {}
            for name in names:
                mine = torch.zeros(bucket.shard, dtype=getattr(torch, dtypes[name]), device=device)
                for piece in bucket.pieces:
                    value = optimizer.state.get(piece.master, {}).get(name)
                    if value is not None:
                        mine[piece.offset:piece.offset + piece.length].copy_(value)
                flat = torch.empty(bucket.shard * size, dtype=mine.dtype, device=device)
                wait_replicas(_all_gather(flat, mine, group=group, async_op=True), self.timeout,
                              f"the all-gather of stage {key}'s optimizer state")
                if self.rank == 0:  # (the other replicas drop it at once: no full state lingers there)
                    full[name] = flat.cpu()
            if self.rank != 0:
                continue
            at = 0
            for i, (p, shape, n) in enumerate(zip(bucket.params, bucket.shapes, bucket.numels(), strict=True)):
                if (key, i) in merged:
                    out[id(p)] = {**merged[key, i],
                                  **{name: full[name][at:at + n].view(shape).clone() for name in names}}
                    # (the checkpoint reader moves per-element state back to the parameter's device)
                at += n
        return out

    def load_state(self, optimizer: torch.optim.Optimizer, states: dict[int, dict[str, Any]]) -> None:
        """Cut `states` ({id(parameter): state}, as `full_state` gives) into this replica's pieces."""
        for piece in self.pieces():
            state = states.get(id(piece.param))
            if state is not None:
                optimizer.state[piece.master] = {
                    k: v.reshape(-1)[piece.start:piece.stop].clone() if _like_param(k, v, piece.shape) else v
                    for k, v in state.items()}


def wait_all(pending: Sequence[tuple], timeout: float, how: str) -> list[tuple[int, float, float]]:
    """Wait for each (key, work, ...) of `pending` (bounded); each one's wait (key, start, end)."""
    waited = []
    for key, work, *_ in pending:
        start = time.perf_counter()
        if work is not None:  # (None: nothing to reduce, e.g. experts held by no other replica)
            wait_replicas(work, timeout, f"the data-parallel gradient {how} of stage {key}")
        waited.append((key, start, time.perf_counter()))
    return waited


def _shaped_like(value: Any, numel: int) -> bool:
    """Whether a piece's state value is per element (exp_avg) rather than one value (a step count)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == numel


def _like_param(name: str, value: Any, shape: torch.Size) -> bool:
    """Whether a parameter's full state value is per element: shaped like it (for a 0-dim parameter, any
    0-dim value but torch optimizers' "step" count)."""
    if not isinstance(value, torch.Tensor) or value.shape != shape:
        return False
    return len(shape) > 0 or name != "step"


def _tensor_dtypes(shards: ShardedGradients, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """The names and dtypes of this replica's per-element state tensors (e.g. exp_avg: float32)."""
    return {k: str(v.dtype).removeprefix("torch.") for pc in shards.pieces()
            for k, v in optimizer.state.get(pc.master, {}).items() if _shaped_like(v, pc.length)}
