"""`Pipeline(vocab_parallel=True)`: what it checks, and the vocabulary tables split over the pipeline ranks.

The first layer names its token embedding (an `nn.Embedding` (vocab, d)) and the last its output projection (an
`nn.Linear` (vocab, d) applied last: `forward(x) == projection(rest(x))`) in `vocabulary_parallel_plan()`. Every
rank builds those two layers (from the meta device, with the layers' own seeds: the weights of one process, a
tied table initialized by its first use), keeps its rows of each as a DTensor sharded over the pipeline ranks
(with tensor parallel: the pipeline and tp ranks together; one DTensor for a tied table) and runs their passes
(runtime/vocabulary.py, runtime/vocabulary_embedding.py):
the first stage's embedding returns the sum of the ranks' rows, the last stage's head runs without its
projection (the identity there), giving the hidden state. The schedule gets the passes from
`schedule.with_vocabulary`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.cross_entropy import CrossEntropy
from ..runtime.in_process import InProcessTransport
from ..runtime.vocabulary import VocabularyCollectives, VocabularyProjection, VocabularyShard, shard_rows
from ..runtime.vocabulary_embedding import EmbeddingShard, VocabularyEmbedding
from ..schedule import Costs, Schedule, check, with_vocabulary
from .balance import without_projection
from .materialize import materialize, on_meta
from .profile import param_costs


@dataclass(frozen=True)
class VocabularyPlan:
    embedding: str  # the first layer's nn.Embedding
    projection: str  # the last layer's nn.Linear


def check_vocabulary_parallel(layers: Sequence[nn.Module], loss_fn, *, transport, tp: int, ep: int,
                              shard: str, sequence_parallel: bool = False) -> VocabularyPlan:
    """ValueError, naming the fix, unless `layers` and the layout can run vocabulary parallel; returns the names
    of the first layer's embedding and the last layer's projection."""
    embedding = _planned(layers[0], "first", nn.Embedding, "its nn.Embedding (vocab, d)")
    projection = _planned(layers[-1], "last", nn.Linear, "its nn.Linear (vocab, d) applied last")
    table, head = getattr(layers[0], embedding), getattr(layers[-1], projection)
    if table.num_embeddings != head.out_features:
        raise ValueError(f"vocab_parallel=True splits the embedding and the head by the same vocabulary, but the "
                         f"embedding has {table.num_embeddings} rows and the head {head.out_features}")
    tables = {id(table.weight), *(id(p) for p in head.parameters())}
    for i, layer in enumerate(layers[1:-1], 1):
        if any(id(p) in tables for p in layer.parameters()):
            raise ValueError(f"layer {i} shares a parameter with the embedding or the head, which vocab_parallel=True "
                             "splits: only the head may tie its projection to the embedding")
    if not isinstance(loss_fn, CrossEntropy):
        raise ValueError("vocab_parallel=True computes the cross-entropy from logits split by vocabulary: pass "
                         "loss_fn=pipetrain.CrossEntropy(...) (token_mean, ignore_index and shift as needed), got "
                         f"{type(loss_fn).__name__}")
    if isinstance(transport, InProcessTransport):
        raise ValueError("vocab_parallel=True needs torch.distributed ranks (its collectives), not in-process ones")
    if ep > 1:
        raise ValueError(f"vocab_parallel=True with expert parallel (ep={ep}) is not supported yet: use "
                         "vocab_parallel with pipeline, tensor and data-parallel ranks")
    if tp > 1 and sequence_parallel:
        raise ValueError("vocab_parallel=True with sequence_parallel=True is not supported yet: the vocabulary "
                         "passes take the last stage's whole hidden state; leave sequence parallelism off")
    if shard == "params":
        raise ValueError("vocab_parallel=True with shard='params' is not supported yet (the tables' passes run outside "
                         "the stages that gather their weights): use shard='optimizer' or 'gradients'")
    return VocabularyPlan(embedding, projection)


def _planned(layer: nn.Module, which: str, kind: type, what: str) -> str:
    plan = getattr(layer, "vocabulary_parallel_plan", None)
    if plan is None:
        raise ValueError(f"vocab_parallel=True splits the {which} layer's vocabulary table, but {type(layer).__name__} "
                         f"has no vocabulary_parallel_plan() naming it: use pipetrain's GPT or Llama, a from_hf model, "
                         f"or give the layer a method returning the name of {what}")
    name = plan()
    if not isinstance(getattr(layer, name, None), kind):
        raise ValueError(f"{type(layer).__name__}.vocabulary_parallel_plan() names {name!r}, which is "
                         f"{type(getattr(layer, name, None)).__name__}, not {what}")
    return name


def vocabulary_tables(layers: Sequence[nn.Module], plan: VocabularyPlan) -> set[int]:
    """ids of the parameters the plan splits (ties between them stay on each rank: no cross-rank tie)."""
    return {id(getattr(layers[0], plan.embedding).weight), *(id(p) for p in getattr(layers[-1], plan.projection)
                                                              .parameters())}


def vocabulary_costs(layers: Sequence[nn.Module], balance: list[int], plan: VocabularyPlan, num_ranks: int) -> Costs:
    """Costs for placing the passes: each stage's F, I and W its parameters (the head without its projection),
    S one rank's share of the projection and T twice that (a weight and an input gradient), E and G next to
    nothing (lookups)."""
    costs = without_projection(param_costs(layers), layers, plan.projection)
    costs[-1] = max(costs[-1], 1.0)
    rows = sum(p.numel() for p in getattr(layers[-1], plan.projection).parameters())
    stages, start = [], 0
    for n in balance:
        stages.append(sum(costs[start:start + n]))
        start += n
    share = rows / num_ranks
    return Costs(f=stages, b=stages, w=stages, s=share, t=2 * share, e=share / 100, g=share / 100)


def schedule_with_vocabulary(schedule: Schedule, costs: Costs) -> Schedule:
    """`schedule` with the ranks' E, S, T and G passes placed (`with_vocabulary`), checked."""
    placed = with_vocabulary(schedule.compute_only(), costs)
    check(placed)
    return placed


def vocabulary_shards(layers: Sequence[nn.Module], plan: VocabularyPlan, schedule: Schedule, *, pp_group,
                      device: torch.device, seed: int, loss_fn: CrossEntropy, transport, timeout: float,
                      autocast: torch.dtype | None, pp_tp=None, tp_group=None
                      ) -> tuple[VocabularyShard, EmbeddingShard, dict[int, nn.Module]]:
    """This rank's shards of the two tables and their passes' runners; and, for the end layers this rank does not
    hold, the layer entries that name the shards' parameters ({layer index: `PartsOnly`}). With tensor parallel
    the rows split over the replica's pipeline and tp ranks together (`pp_tp`, one dimension, pp-major), and the
    passes combine over `tp_group` too."""
    if transport.world_size < 2:
        raise ValueError("vocab_parallel=True splits the vocabulary over the pipeline ranks; this pipeline has one "
                         "rank: launch 2 or more, or leave vocab_parallel off")
    first, last = layers[0], layers[-1]
    made = {i: layer for i, layer in ((0, first), (len(layers) - 1, last)) if on_meta(layer, i)}
    if made:  # (both in one call: a table they share is initialized by its first use, as in one process)
        materialize(made, device, seed)
    mesh = pp_tp if pp_tp is not None else _pipeline_mesh(pp_group, device)
    table, head = getattr(first, plan.embedding), getattr(last, plan.projection)
    start, rows = shard_rows(table.num_embeddings, mesh.size(), mesh.get_local_rank())
    weight = _rows_of(head.weight, start, rows, mesh, device)
    tied = table.weight is head.weight
    embedding = VocabularyEmbedding(weight if tied else _rows_of(table.weight, start, rows, mesh, device), start)
    projection = VocabularyProjection(weight, _rows_of(head.bias, start, rows, mesh, device)
                                      if head.bias is not None else None, start)
    setattr(first, plan.embedding, embedding)
    setattr(last, plan.projection, projection)
    collectives = VocabularyCollectives(transport, timeout, tp_group=tp_group)
    mine = {s for s in schedule.stages_of(transport.rank)}
    extra = {} if 0 in mine else {0: PartsOnly({plan.embedding: embedding})}
    if schedule.num_stages - 1 not in mine:
        extra[len(layers) - 1] = PartsOnly({plan.projection: projection})
    return (VocabularyShard(projection, loss=loss_fn, collectives=collectives, root=schedule.stage_to_rank[-1],
                            autocast=autocast),
            EmbeddingShard(embedding, collectives=collectives, root=schedule.stage_to_rank[0]), extra)


@contextlib.contextmanager
def whole_tables(vocabulary: VocabularyShard | None, embedding: EmbeddingShard | None):
    """Generation on a vocabulary-parallel pipeline: inside, the first layer's embedding and the last layer's
    projection work whole (each table all-gathered once: collective over the pipeline's ranks), so the passes
    decode as without vocabulary parallelism; after, the whole tables are let go."""
    if vocabulary is None:
        yield
        return
    projection, table = vocabulary.projection, embedding.embedding
    with torch.no_grad():
        weight = projection.weight.full_tensor()
        bias = projection.bias.full_tensor() if projection.bias is not None else None
        whole = weight if table.weight is projection.weight else table.weight.full_tensor()
    projection.whole, table.whole = (weight, bias), whole
    try:
        yield
    finally:
        projection.whole = table.whole = None


def _rows_of(tensor: torch.Tensor, start: int, rows: int, mesh, device: torch.device) -> nn.Parameter:
    from torch.distributed.tensor import DTensor, Shard

    local = tensor.detach()[start:start + rows].to(device).clone()
    stride = torch.empty(tensor.shape, device="meta").stride()  # (the whole tensor's, contiguous)
    part = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=tensor.shape, stride=stride)
    return nn.Parameter(part, requires_grad=tensor.requires_grad)


def _pipeline_mesh(pp_group, device: torch.device):
    """The pipeline's ranks as a 1-d DeviceMesh (its group, or the default group's ranks)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(pp_group or dist.group.WORLD, device.type, mesh_dim_names=("pp",))


class PartsOnly(nn.Module):
    """On a rank without the first (or last) stage: that layer's vocabulary table shard alone, under its own name
    (so the rank's parameters and state are named `"{layer index}.{name}.weight"`, as in one process)."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)
