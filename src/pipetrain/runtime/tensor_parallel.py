"""Tensor parallel inside a stage: each layer's plan (which linears split by columns, by rows, by vocabulary)
applied with torch's DTensor `parallelize_module`, and the local views of its parameters the rest of the
runtime works on.

A layer declares its plan with `tensor_parallel_plan(tp) -> {submodule name: Split}` (the reference GPT and
Llama and the `from_hf` adapters do). Activations between layers, and so between stages, stay whole on every
rank of the tp group (each sends its copy to the same tp coordinate of the next stage):

    COLUMNS   y_local = x @ W[rows of this rank]^T         x (b, t, d) whole   -> y (b, t, out / tp)
    ROWS      y = all_reduce(x_local @ W[:, cols]^T)       x (b, t, in / tp)   -> y (b, t, d) whole
    EMBEDDING y = all_reduce(E[ids of this rank's rows])   ids (b, t)          -> (b, t, d) whole
    HEAD      logits_local = x @ W[vocab rows]^T          x (b, t, d)         -> (b, t, vocab / tp), a DTensor
              split by vocabulary: a `CrossEntropy` loss computes from the parts, any other loss_fn, a later
              stage, generation's sampling and evaluation get them whole (an all-gather)
    GRAD_SUM  a parameter kept whole whose gradient each rank computes from its own heads only (a per-head
              norm): summed over the tp group in backward

With sequence parallelism (Megatron's; `Pipeline(sequence_parallel=True)`) the activations between the
split modules, and between stages, are each rank's part of the sequence, (b, t / tp, d), not whole:

    SCATTER   the module's output leaves as this rank's part of the sequence (of its first tensor: the
              hidden states); in backward the parts' gradients are all-gathered. Where the split begins:
              the embedding layer
    SEQUENCE  a module (a norm) that runs on this rank's part and hands on the whole sequence (an all-gather),
              its weights' gradients summed over tp; without sequence parallelism, a whole module
    ROWS      then reduce-scatters its output into sequence parts instead of all-reducing it

so norms, residuals and dropout hold 1/tp of the activations. Generation runs without it (whole
activations; its new tokens are too few to split).

Parameters a plan does not name stay ordinary (replicated) tensors with the same gradient on every rank.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import wait_replicas
from .values import flatten, unflatten


class Split(enum.Enum):
    COLUMNS = "columns"
    ROWS = "rows"
    EMBEDDING = "embedding"
    HEAD = "head"
    GRAD_SUM = "grad_sum"
    SEQUENCE = "sequence"
    SCATTER = "scatter"


_SEQUENCE_SPLIT = contextvars.ContextVar("sequence_split", default=False)


class SequenceSplit:
    """A context within which the activations are split by sequence (`active`: a stage's forward under
    sequence parallelism, and a checkpointed forward's recomputation); outside it (generation), whole.
    Reusable and reentrant: a recomputation may run more than once (split backward's I, then W)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> None:
        self._tokens.append(_SEQUENCE_SPLIT.set(self.active))

    def __exit__(self, *exc) -> None:
        _SEQUENCE_SPLIT.reset(self._tokens.pop())


def require_divisible(tp: int, model: str, **sizes: int | None) -> None:
    """ValueError unless `tp` divides each of `sizes` (heads, key/value heads, vocabulary, ...; None: no matter)."""
    bad = {name: n for name, n in sizes.items() if n is not None and n % tp}
    if bad:
        listed = ", ".join(f"{name}={n}" for name, n in bad.items())
        raise ValueError(f"tensor parallel tp={tp} must divide {listed} of {model}: each tp rank holds whole heads "
                         f"and an equal part of the vocabulary; choose a tp that divides them (CLI: --tp)")


def vocabulary_rows(module: nn.Module) -> int | None:
    """A token table's or head's vocabulary, which tensor parallel splits: None once vocabulary parallelism has
    split it (over the pipeline and tp ranks alike, however uneven)."""
    return module.num_embeddings if isinstance(module, nn.Embedding) else \
        module.out_features if isinstance(module, nn.Linear) else None


def parallelize(layers: Mapping[int, nn.Module], all_layers: list[nn.Module], mesh, timeout: float,
                tied: bool = False, sequence_parallel: bool = False, vocabulary: frozenset[int] = frozenset()) -> None:
    """Split each of `layers` (this rank's, by index; whole, initialized alike on every tp rank) over the 1-d
    tp `mesh` by its `tensor_parallel_plan`. Each rank keeps its own slice of the weights it built (no
    communication). Every layer's plan is made (and checked) on every rank first, so a tp that does not
    divide a layer fails on every rank alike. ValueError if no layer of the model has a plan (tp would only
    repeat the work), a weight is tied between layers (`tied`: across ranks), or `sequence_parallel` is asked
    of layers whose plans do not say where the sequence splits. `vocabulary`: the ids of the tables vocabulary
    parallelism splits (over the pipeline and tp ranks already): their modules leave the plans, and a tied table
    among them is no tie here."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = mesh.size()
    if not any(hasattr(layer, "tensor_parallel_plan") for layer in all_layers):
        raise ValueError(f"tensor parallel (tp={tp}) needs layers that declare how they split, "
                         "`tensor_parallel_plan(tp) -> {submodule: pipetrain.Split}` (the reference GPT and Llama and "
                         "from_hf layers do); none of these layers does: use tp=1 or add the method")
    owner: dict[int, int] = {}
    for i, layer in enumerate(all_layers):
        for p in layer.parameters():
            if owner.setdefault(id(p), i) != i and id(p) not in vocabulary:
                tied = True
    if tied:
        raise ValueError(f"a weight is shared by two layers (tied weights, e.g. embeddings); tensor parallel "
                         f"(tp={tp}) does not split a tied weight yet: untie it (GPTConfig/LlamaConfig "
                         "tie_embeddings=False; a Hugging Face model: tie_word_embeddings false in its config.json) "
                         "or use tp=1")
    plans = [{name: split for name, split in layer.tensor_parallel_plan(tp).items()
              if not _split_already(layer.get_submodule(name), vocabulary)}
             if hasattr(layer, "tensor_parallel_plan") else {} for layer in all_layers]
    if sequence_parallel and not any(split is Split.SCATTER for plan in plans for split in plan.values()):
        raise ValueError("sequence parallelism needs layers whose tensor_parallel_plan marks where the sequence "
                         "splits (Split.SCATTER on the embedding, Split.SEQUENCE on the norms: the reference GPT and "
                         "Llama do); these layers' plans do not (from_hf layers: not yet): leave it off")
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for layer in all_layers for m in layer.modules())
    if sequence_parallel and dropout:
        raise ValueError("sequence parallelism with dropout: the tp ranks draw alike, so each part of the sequence "
                         "would repeat the others' masks; use dropout 0 or leave sequence parallelism off")
    group = mesh.get_group()
    for i, layer in layers.items():
        styles = {}
        for name, split in plans[i].items():
            if split is Split.GRAD_SUM:
                for p in layer.get_submodule(name).parameters():
                    p.register_hook(_summed_over(group, timeout))
            elif split is Split.SCATTER:
                if sequence_parallel:
                    layer.get_submodule(name).register_forward_hook(_scattered(mesh))
            elif split is not Split.SEQUENCE or sequence_parallel:
                styles[name] = _style(split, sequence_parallel)
        if styles:
            parallelize_module(layer, mesh, styles)
        for p in layer.parameters():
            if is_dtensor(p):
                p.register_hook(_placed_like(p))
        for name in styles:  # (on the split modules: generation calls a layer's forward_cached, not the layer)
            head = plans[i][name] is Split.HEAD
            layer.get_submodule(name).register_forward_hook(_whole_without_grad if head else _waited)


def _split_already(module: nn.Module, vocabulary: frozenset[int]) -> bool:
    params = list(module.parameters())
    return bool(params) and all(id(p) in vocabulary for p in params)


def _waited(module: nn.Module, args, output):
    """Without autograd (generation, evaluation), a split module's output with DTensor's asynchronous
    collectives waited for: one whose result is read only in part (generation's logits) would otherwise stay
    unwaited, which torch warns about at exit."""
    if torch.is_grad_enabled():  # (waiting unwraps the tensor, out of autograd's graph; training reads it all)
        return output
    leaves, spec = flatten(output, what="a layer's output")
    if not any(hasattr(t, "trigger_wait") for t in leaves):
        return output
    return unflatten([t.trigger_wait() if hasattr(t, "trigger_wait") else t for t in leaves], spec)


def _whole_without_grad(module: nn.Module, args, output):
    """Without autograd (generation's sampling, evaluation), a split head's logits whole."""
    return _waited(module, args, gathered(output)) if not torch.is_grad_enabled() else output


def gathered(value: Any) -> Any:
    """`value` (a pytree) with each DTensor leaf whole (collective over its tp group): a split head's logits
    for a loss_fn or layer that reads them whole."""
    leaves, spec = flatten(value, what="a layer's output")
    if not any(is_dtensor(t) for t in leaves):
        return value
    return unflatten([whole(t) for t in leaves], spec)


def _placed_like(param: nn.Parameter):
    """A gradient hook giving `param`'s gradient its own placement: DTensor's embedding backward returns the
    whole (replicated) gradient of a vocabulary-split table, which would then accumulate into a `.grad` of
    another shape than this rank's slice (redistributing a replicated one to a slice is local)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if tuple(grad.placements) == tuple(param.placements):
            return grad
        return grad.redistribute(param.device_mesh, param.placements)

    return hook


def _style(split: Split, sequence_parallel: bool = False):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    style = {Split.COLUMNS: lambda: ColwiseParallel(),
             Split.ROWS: lambda: _rows_by_sequence()() if sequence_parallel else RowwiseParallel(),
             Split.SEQUENCE: lambda: _sequence_norm()(),
             Split.EMBEDDING: lambda: RowwiseParallel(input_layouts=Replicate()),
             Split.HEAD: lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}[split]()
    style.src_data_rank = None  # every rank built the same whole weight: each keeps its slice, no broadcast
    return style


def _rows_by_sequence():
    """RowwiseParallel whose partial sums are reduce-scattered into sequence parts while the activations
    are split (`SequenceSplit`), all-reduced whole otherwise (generation)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel

    class RowsBySequence(RowwiseParallel):
        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            layout = (Shard(1),) if _SEQUENCE_SPLIT.get() else (Replicate(),)
            return outputs.redistribute(placements=layout, async_op=True).to_local()

    return RowsBySequence


def _sequence_norm():
    """torch's SequenceParallel (the module on this rank's part of the sequence, its weights replicated,
    their gradients summed over tp), handing on the whole sequence (an all-gather); outside
    `SequenceSplit`, the module on whole activations."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.parallel import SequenceParallel

    class SequenceNorm(SequenceParallel):
        @staticmethod
        def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
            layout = sequence_sharding if _SEQUENCE_SPLIT.get() else (Replicate(),)
            return DTensor.from_local(inputs[0], device_mesh, layout, run_check=False)

        @staticmethod
        def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
            return outputs.redistribute(placements=(Replicate(),), async_op=True).to_local()

    return SequenceNorm


def _scattered(mesh):
    """A forward hook: while the activations are split by sequence, the module's first output tensor (the
    hidden states, (b, t, ...) alike on every tp rank) leaves as this rank's part of the sequence."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(module: nn.Module, args, output):
        if not _SEQUENCE_SPLIT.get():
            return output
        leaves, spec = flatten(output, what="a layer's output")
        hidden = leaves[0]
        if hidden.dim() < 2 or hidden.shape[1] % mesh.size():
            raise ValueError(f"sequence parallelism splits the sequence over tp={mesh.size()} ranks, but "
                             f"{type(module).__name__}'s output has shape {tuple(hidden.shape)}: use a sequence "
                             "length that tp divides, or leave sequence parallelism off")
        whole_hidden = DTensor.from_local(hidden, mesh, (Replicate(),), run_check=False)
        leaves[0] = whole_hidden.redistribute(placements=(Shard(1),)).to_local()
        return unflatten(leaves, spec)

    return hook


def _summed_over(group, timeout: float):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()  # (autograd's own buffer is not ours to write)
        wait_replicas(dist.all_reduce(grad, group=group, async_op=True), timeout,
                      "the tensor-parallel sum of a whole parameter's gradient")
        return grad

    return hook


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (a parameter or gradient of a tensor-parallel layer: split, or replicated)."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor of which each tp rank holds another part (a row-split linear's bias is a
    replicated DTensor: the same on every tp rank)."""
    return is_dtensor(t) and any(placement.is_shard() for placement in t.placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's own tensor of `t`: its slice for a DTensor (the very tensor it holds, so writes and `.data`
    assignments reach the DTensor), `t` itself otherwise."""
    if not is_dtensor(t):
        return t
    # the DTensor's own attribute: to_local() of a Parameter wraps it anew (torch 2.13), and a `.data`
    # assignment to the wrapper would not reach the DTensor (FSDP2 reaches it the same way)
    return t._local_tensor


def set_grad(param: nn.Parameter, grad: torch.Tensor | None) -> None:
    """`param.grad = grad`, where `grad` is this rank's own part (wrapped as a DTensor like `param`'s)."""
    param.grad = placed_as(grad, param) if grad is not None and is_dtensor(param) else grad


def placed_as(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`part` (this rank's slice) as a DTensor placed like the DTensor `like` (a parameter, or a state)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


# --- whole tensors (checkpoints, exports) and this rank's parts of them ---------------------------------------
def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: collective over its tp group); `t` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def as_part(value: Any, param: nn.Parameter) -> Any:
    """An optimizer state value of `param` as this rank's part of it: a DTensor placed like the split `param`
    (a sharded optimizer's plain slice wrapped; no communication); other values as they are."""
    if is_dtensor(param) and isinstance(value, torch.Tensor) and not is_dtensor(value) and value.dim() and \
            value.shape == local(param).shape:
        return placed_as(value, param)
    return value


def whole_like(value: Any, param: nn.Parameter) -> Any:
    """An optimizer state value of `param`, whole (collective over tp for a part); other values as they are."""
    return whole(as_part(value, param))


def part_like(value: Any, param: nn.Parameter, *, split: bool = True) -> Any:
    """This rank's part of a whole `value` shaped like the split `param` (no communication): a DTensor placed
    like it, or with `split=False` its plain slice; other values as they are."""
    if is_dtensor(value):  # (read as this rank's part already)
        return value if split else local(value)
    if not (is_dtensor(param) and isinstance(value, torch.Tensor) and value.dim() and value.shape == param.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(value.to(local(param).device), param.device_mesh, param.placements, src_data_rank=None)
    return part if split else part.to_local()


def whole_state(module: nn.Module) -> dict[str, Any]:
    """`module.state_dict()` with split tensors whole (collective over tp)."""
    return {k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}


def load_whole_state(module: nn.Module, state: dict[str, Any]) -> None:
    """`module.load_state_dict(state)` from whole tensors: each split one keeps this rank's part."""
    current = module.state_dict()
    module.load_state_dict({k: part_like(v, current[k]) if k in current else v for k, v in state.items()})
