"""A step's batch as the schedule's microbatches: split (or given), checked alike on every rank, moved to the
stages that read them, and each one's shape key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..runtime.values import flatten, shape_key, split_batch, to_device


def step_microbatches(inputs: Any, targets: Any, microbatches: Sequence[tuple[Any, Any]] | None, *,
                      num_microbatches: int, rank: int, stages, last: int, device: torch.device,
                      key: tuple, targets_everywhere: bool = False) -> tuple[list, list | None, list]:
    """(inputs, targets, shape keys) of each microbatch: inputs on the first stage's device, targets on the
    last's (`stages`: this rank's; every rank's with `targets_everywhere`: vocabulary parallelism), keys
    `(shape, *key)`, the same on every rank."""
    m = num_microbatches
    me = f"rank {rank}"
    if microbatches is not None:
        if inputs is not None or targets is not None:
            raise ValueError("pass either inputs/targets or microbatches=, not both")
        pairs = list(microbatches)
        if len(pairs) != m or not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
            raise ValueError(f"microbatches must be {m} (inputs, targets) pairs, one per microbatch of the "
                             f"schedule, got {len(pairs)} items")
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        if any(x is None for x in xs):
            raise ValueError(f"{me}: a microbatch has inputs None; pass the same microbatches on every rank")
        ys = None if all(y is None for y in ys) else ys
    else:
        if inputs is None:
            raise ValueError(f"{me}: step() got inputs=None; pass the same batch on every rank (each rank "
                             "uses the microbatches' shapes to know the shapes between stages)")
        xs = split_batch(inputs, m, "inputs")
        ys = split_batch(targets, m, "targets") if targets is not None else None
        if ys is not None and _rows(inputs) != _rows(targets):
            raise ValueError(f"inputs have {_rows(inputs)} rows but targets {_rows(targets)} (dim 0): they must "
                             "hold the same samples")
    needs_targets = last in stages or targets_everywhere
    if needs_targets and (ys is None or any(y is None for y in ys)):
        why = f"runs stage {last}" if last in stages else "holds a vocabulary shard (vocab_parallel)"
        raise ValueError(f"{me} {why} and needs `targets`, got None: pass the same batch to step() on every rank")
    keys = [(shape_key(x), *key) for x in xs]
    if 0 in stages:
        xs = [to_device(x, device) for x in xs]
    if needs_targets:
        ys = [to_device(y, device) for y in ys]
    return xs, ys, keys


def _rows(tree) -> int:
    return flatten(tree)[0][0].shape[0]
