"""One stage: its layers and the per-microbatch activations it keeps from F until B."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .aux_loss import collect_aux_losses
from .cross_entropy import CrossEntropy
from .deferred_linear import apply_weight_grads, defer_linears
from .host_memory import keep_freed_memory
from .split_backward import backward_input, backward_weight
from .tensor_parallel import SequenceSplit, gathered, whole
from .values import Packet, Signature, flatten, unflatten


@dataclass(frozen=True)
class LossWeights:
    """What each microbatch's losses are multiplied by before backward."""

    mean: float = 1.0  # a loss_fn returning a mean: scale / M
    total: float = 1.0  # a loss_fn returning (loss_sum, count): scale (normalized by the count afterwards)
    aux: float = 1.0  # each add_aux_loss: scale / M


UNWEIGHTED = LossWeights()


@dataclass
class _Saved:
    inputs: list[torch.Tensor]  # the stage's input leaves that collect a gradient
    outputs: list[torch.Tensor]  # what backward starts from: output leaves that carry a gradient (then aux)
    seeded: int  # how many of `outputs` take a gradient from the next stage (the rest are scalars, seeded 1)


class Stage:
    """Stage `index` of `num_stages`: runs its layers forward and backward one microbatch at a time.

    F takes the previous stage's output (a `Packet`; the first stage takes the microbatch itself),
    rebuilds it with fresh leaves for the tensors that carry a gradient, runs the layers, and caches what
    B needs. B back-propagates the gradients of those output leaves (on the last stage: the weighted loss;
    on any stage: the weighted auxiliary losses), frees the cache and returns the input leaves' gradients.
    I does only the input part of B and keeps what W needs; W then accumulates the weight gradients.
    With `checkpoint=True` the forward keeps only the stage input and recomputes the rest in backward.
    With `split_backward=True` (schedules with I and W), each `nn.Linear` of the stage gets a forward of its
    own (see deferred_linear): I is the backward without the linears' weight products, W runs those. A
    stage without such linears, or without input gradients (the first), splits its graph instead
    (split_backward.py). A stage on the CPU makes malloc keep freed memory (host_memory.py).
    """

    def __init__(self, index: int, num_stages: int, layers: Sequence[nn.Module], *, first_layer: int = 0,
                 loss_fn: Callable[[Any, Any], Any] | None = None, checkpoint: bool = False,
                 autocast: torch.dtype | None = None, device: torch.device | None = None,
                 split_backward: bool = False, timeout: float = 1800.0, sequence_parallel: bool = False) -> None:
        self.index = index
        self.sequence_parallel = sequence_parallel  # (tensor parallel: activations split by sequence)
        self.timeout = timeout  # seconds, for a vocabulary-split cross-entropy's collectives
        self.num_stages = num_stages
        self.layers = list(layers)
        self.first_layer = first_layer
        self.module = nn.Sequential(*self.layers)
        self.loss_fn = loss_fn
        self.checkpoint = checkpoint
        self.autocast = autocast
        self.device_type = (device or torch.device("cpu")).type
        if self.device_type == "cpu":  # activations held across microbatches: no page faults for what they free
            keep_freed_memory()
        self._cache: dict[int, _Saved] = {}
        self._weight_work: dict[int, Callable[[], None]] = {}
        self._deferral = defer_linears(self.module.modules()) if split_backward else None
        self.losses: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # last stage: (loss, count)
        self.aux: dict[int, torch.Tensor] = {}  # unweighted sum of each microbatch's auxiliary losses

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def computes_loss(self) -> bool:
        """The last stage, unless vocabulary parallelism takes its output (no `loss_fn`: it passes it on)."""
        return self.is_last and self.loss_fn is not None

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, mb: int, x: Packet | Any, *, target: Any = None, weights: LossWeights = UNWEIGHTED,
                grad: bool = True, extra: Sequence[torch.Tensor] = ()) -> Packet | None:
        """Run the layers on microbatch `mb`; return the output to pass on (None on the last stage). Backward
        needs no context: autocast and sequence parallelism are recorded in the graph. `extra`: leaves the layers
        reach otherwise (a vocabulary-parallel embedding's sum), whose gradients backward returns after the
        input leaves'."""
        if self.autocast is None and not self.sequence_parallel:
            return self._forward(mb, x, target, weights, grad, extra)
        with contextlib.ExitStack() as contexts:
            if self.autocast is not None:
                contexts.enter_context(torch.autocast(self.device_type, dtype=self.autocast))
            contexts.enter_context(SequenceSplit(self.sequence_parallel))
            return self._forward(mb, x, target, weights, grad, extra)

    def _forward(self, mb: int, x, target, weights: LossWeights, grad: bool, extra) -> Packet | None:
        inputs: list[torch.Tensor] = [t for t in extra if t.requires_grad]
        if isinstance(x, Packet):  # fresh leaves: the ones that carry a gradient collect it here
            leaves = [t.detach().requires_grad_(grad and g) for t, (_, _, g) in zip(x.leaves, x.signature.leaves,
                                                                                  strict=True)]
            inputs = [t for t in leaves if t.requires_grad] + inputs
            x = unflatten(leaves, x.signature.spec)
        with torch.set_grad_enabled(grad), collect_aux_losses() as aux:
            out = checkpoint(self._run, x, use_reentrant=False, context_fn=self._recomputation_context) \
                if self.checkpoint and grad else self._run(x)
            if self.computes_loss:
                loss, count = self._loss(out, target)
        if aux:
            self.aux[mb] = torch.stack([a.detach().float() for a in aux]).sum()
        aux_objective = sum(a.float() for a in aux) * weights.aux if aux and grad else None
        if self.computes_loss:
            self.losses[mb] = (loss.detach(), count)
            if grad:
                objective = loss * (weights.mean if count is None else weights.total)
                if aux_objective is not None:
                    objective = objective + aux_objective
                self._cache[mb] = _Saved(inputs, [objective] if objective.requires_grad else [], 0)
            return None
        leaves, spec = flatten(out, what=f"the output of stage {self.index}")
        leaves = [whole(t) for t in leaves]  # (a tensor-parallel head's logits, split by vocabulary)
        signature = Signature.of(leaves, spec)
        if grad:
            outputs = [t for t in leaves if t.requires_grad]
            seeded = len(outputs)
            if aux_objective is not None and aux_objective.requires_grad:
                outputs.append(aux_objective)
            self._cache[mb] = _Saved(inputs, outputs, seeded)
        return Packet([t.detach() for t in leaves], signature)

    def _recomputation_context(self):
        """(forward, recomputation) contexts of a checkpointed forward: the recomputation, in backward, splits
        by sequence as the forward did (on CUDA it runs on autograd's own thread, which the forward's context
        does not reach)."""
        return contextlib.nullcontext(), SequenceSplit(self.sequence_parallel)

    def _run(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if not isinstance(x, torch.Tensor):  # raises BadValueError naming the layer and what it returned
                flatten(x, what=f"the output of layer {self.first_layer + i} ({type(layer).__name__})")
        return x

    def _loss(self, out, target) -> tuple[torch.Tensor, torch.Tensor | None]:
        """loss_fn's result as (loss, None) for a mean or (loss_sum, count) for a pair."""
        if isinstance(self.loss_fn, CrossEntropy):  # computes from a tensor-parallel head's parts itself
            result = self.loss_fn(out, target, timeout=self.timeout)
        else:
            result = self.loss_fn(gathered(out), target)
        count = None
        if isinstance(result, tuple | list):
            if len(result) != 2:
                raise ValueError(f"loss_fn returned {len(result)} values; return a scalar mean or a pair "
                                 "(loss_sum, count)")
            result, count = result
            count = torch.as_tensor(count, dtype=torch.float64).detach()
            if count.dim() != 0:
                raise ValueError(f"loss_fn's count must be a number or a scalar tensor, got shape "
                                 f"{tuple(count.shape)}")
        if not isinstance(result, torch.Tensor) or result.dim() != 0:
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (a mean over the microbatch) or a pair "
                             f"(loss_sum, count); got {shape}")
        return result.float(), count

    # --- backward ------------------------------------------------------------------------------------
    def _roots(self, mb: int, grads: list[torch.Tensor] | None) -> tuple[_Saved, list, list]:
        saved = self._cache.pop(mb)
        given = list(grads or [])
        if len(given) != saved.seeded:
            raise RuntimeError(f"stage {self.index} microbatch {mb}: {len(given)} output gradients for "
                               f"{saved.seeded} outputs that carry one")
        return saved, saved.outputs, given + [None] * (len(saved.outputs) - saved.seeded)

    def backward(self, mb: int, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Back-propagate microbatch `mb`; free its cache; return the gradients of the input leaves that
        carry one (in leaf order)."""
        return _backward(*self._roots(mb, grads))

    def backward_input(self, mb: int, grads: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """I: the input leaves' gradients; what W needs stays until `backward_weight(mb)`."""
        saved, outputs, seeds = self._roots(mb, grads)
        if self._deferral is None or not saved.inputs or not outputs:
            grads_in, work = backward_input(outputs, seeds, saved.inputs, list(self.module.parameters()))
            self._weight_work[mb] = partial(backward_weight, work)
            return grads_in
        pending = self._deferral.pending = []  # the linears keep their weight products here, for W
        try:  # everything else (input gradients, norms, embeddings: cheap) now
            grads_in = _backward(saved, outputs, seeds)
        finally:
            self._deferral.pending = None
        self._weight_work[mb] = partial(apply_weight_grads, pending)
        return grads_in

    def backward_weight(self, mb: int) -> None:
        """W: accumulate this microbatch's weight gradients and free what I kept."""
        self._weight_work.pop(mb)()

    def pending(self) -> list[int]:
        """Microbatches whose activations are still held (empty after a complete step)."""
        return sorted(set(self._cache) | set(self._weight_work))

    def clear(self) -> None:
        self._cache.clear()
        self._weight_work.clear()
        self.losses.clear()
        self.aux.clear()


def _backward(saved: _Saved, outputs: list[torch.Tensor], seeds: list) -> list[torch.Tensor]:
    """A full backward from `outputs`; the gradients of the stage's input leaves (zeros where none came)."""
    if outputs:
        torch.autograd.backward(outputs, seeds)
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in saved.inputs]
