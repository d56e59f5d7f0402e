"""Values between stages: a tensor or a nested tuple/list/dict of tensors, as leaves plus a signature.

    tree = (hidden, {"mask": mask, "pos": pos})       # what a layer returns, what the next one receives
                                                       # (tuples, lists, namedtuples, dicts; dict subclasses
                                                       #  arrive as plain dicts)
    leaves, spec = flatten(tree)                       # [hidden, mask, pos], the structure
    unflatten(leaves, spec) == tree

A `Signature` is the structure with each leaf's shape, dtype and whether it carries a gradient back
(floating-point tensors that require grad do; int/bool masks, position ids and constants travel forward
only). It is all a receiver needs to allocate its buffers, and it crosses the wire (pickled) only the
first time a transfer's shape is seen.
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# A structure: "T" for a tensor leaf, or (kind, children) / ("dict", keys, children).
Spec = Any
LEAF = "T"


class BadValueError(TypeError):
    """A value between stages (or a batch) that is not a tensor or a tuple/list/dict of tensors."""


def flatten(tree: Any, *, what: str = "value") -> tuple[list[torch.Tensor], Spec]:
    """The tensors of `tree` in order, and its structure; raises BadValueError naming the first bad leaf."""
    leaves: list[torch.Tensor] = []
    spec = _flatten(tree, leaves, what, "")
    return leaves, spec


def _flatten(node: Any, leaves: list, what: str, path: str) -> Spec:
    if isinstance(node, torch.Tensor):
        leaves.append(node)
        return LEAF
    if isinstance(node, tuple | list):
        # a namedtuple keeps its type (the next layer may read its fields by name)
        kind = ("list" if isinstance(node, list) else type(node) if hasattr(node, "_fields") else "tuple")
        return kind, tuple(_flatten(child, leaves, what, f"{path}[{i}]") for i, child in enumerate(node))
    if isinstance(node, dict):
        keys = tuple(node)
        return "dict", keys, tuple(_flatten(node[k], leaves, what, f"{path}[{k!r}]") for k in keys)
    raise BadValueError(f"{what}{path} is {describe_value(node)}; values between stages must be tensors, or "
                        "tuples, lists or dicts of tensors (nested)")


def unflatten(leaves: Sequence[torch.Tensor], spec: Spec) -> Any:
    return _unflatten(iter(leaves), spec)


def _unflatten(it, spec: Spec) -> Any:
    if spec == LEAF:
        return next(it)
    if spec[0] == "dict":
        _, keys, children = spec
        return {k: _unflatten(it, c) for k, c in zip(keys, children, strict=True)}
    kind, children = spec
    items = [_unflatten(it, c) for c in children]
    if kind == "list":
        return items
    return tuple(items) if kind == "tuple" else kind(*items)


def describe_value(node: Any) -> str:
    """`a str ('abc')`: the type and a short repr, for error messages."""
    text = repr(node)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"a {type(node).__name__} ({text})"


@dataclass(frozen=True)
class Signature:
    """Structure, and per leaf (shape, dtype, carries a gradient)."""

    spec: Spec
    leaves: tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]

    @staticmethod
    def of(leaves: Sequence[torch.Tensor], spec: Spec) -> Signature:
        return Signature(spec, tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in leaves))

    @property
    def grad_leaves(self) -> list[int]:
        """Indices of the leaves whose gradient travels back."""
        return [i for i, (_, _, g) in enumerate(self.leaves) if g]

    def describe(self) -> str:
        parts = [f"{tuple(shape)} {str(dtype).removeprefix('torch.')}" + (" (grad)" if g else "")
                 for shape, dtype, g in self.leaves]
        return parts[0] if self.spec == LEAF else "[" + ", ".join(parts) + "]"

    def to_bytes(self) -> torch.Tensor:
        try:
            data = pickle.dumps((self.spec, self.leaves))
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise BadValueError(f"the structure of a value between stages cannot be sent to another rank ({err}): "
                                "a namedtuple type must be defined at module level") from None
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @staticmethod
    def from_bytes(data: torch.Tensor) -> Signature:
        spec, leaves = pickle.loads(data.cpu().numpy().tobytes())
        return Signature(spec, leaves)


@dataclass
class Packet:
    """An activation on its way to the next stage: detached leaves, and what the receiver rebuilds."""

    leaves: list[torch.Tensor]
    signature: Signature


def shape_key(tree: Any) -> tuple:
    """What determines the shapes between stages for one microbatch: its structure, shapes and dtypes."""
    leaves, spec = flatten(tree, what="the batch")
    return spec, tuple((tuple(t.shape), t.dtype) for t in leaves)


def batch_check(key: Hashable) -> int:
    """A nonzero checksum of a microbatch's shape key, the same in every process for the same shapes: the
    first envelope of a new shape carries it, so a receiver given a batch of other shapes notices."""
    return zlib.crc32(repr(key).encode()) + 1


def describe_key(key: Hashable) -> str:
    """A shape key as a person reads it: the shapes and dtypes of the microbatch's tensors."""
    shapes = key[0][1] if isinstance(key, tuple) and key and isinstance(key[0], tuple) and len(key[0]) == 2 else None
    if shapes is None:
        return repr(key)
    return ", ".join(f"{tuple(shape)} {str(dtype).removeprefix('torch.')}" for shape, dtype in shapes)


def split_batch(tree: Any, m: int, name: str) -> list[Any]:
    """`tree` split along dim 0 of every tensor leaf into `m` equal microbatches."""
    leaves, spec = flatten(tree, what=name)
    if not leaves:
        raise BadValueError(f"{name} holds no tensor")
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if None in sizes:
        raise ValueError(f"{name} holds a 0-dimensional tensor; every tensor needs the batch dimension first")
    if len(sizes) > 1:
        raise ValueError(f"the tensors of {name} have different batch sizes {sorted(sizes)} (dim 0); they "
                         "must agree so that each microbatch takes the same rows of every tensor")
    (size,) = sizes
    if size % m:
        fits = size - size % m
        raise ValueError(f"{name} has batch size {size}, which does not split into {m} equal microbatches: "
                         f"use a batch size that is a multiple of {m} (e.g. {fits or m}), change the number of "
                         "microbatches, or pass step(microbatches=[...]) explicitly")
    parts = [t.tensor_split(m) for t in leaves]
    return [unflatten([p[i] for p in parts], spec) for i in range(m)]


def to_device(tree: Any, device: torch.device) -> Any:
    leaves, spec = flatten(tree)
    return unflatten([t.to(device, non_blocking=True) for t in leaves], spec)
