"""`Pipeline(vocab_parallel=True)`: what it checks, and the head's output projection split over the pipeline ranks.

The last layer names its output projection in `vocabulary_parallel_plan()` (an `nn.Linear` (vocab, d) applied
last: `forward(x) == projection(rest(x))`). Every rank builds that layer's projection (from the meta device,
with the layer's own seed: the weights of one process), keeps its rows as a DTensor sharded over the pipeline
ranks (`VocabularyProjection`), and the layer runs on the last stage without it (the projection's forward is
the identity there), giving the hidden state the ranks' S and T passes take (runtime/vocabulary.py). The
schedule gets the passes from `schedule.with_vocabulary`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.comm import InProcessTransport
from ..runtime.cross_entropy import CrossEntropy
from ..runtime.vocabulary import VocabularyProjection, VocabularyShard, shard_rows
from ..schedule import Costs, Schedule, check, with_vocabulary
from .materialize import materialize, on_meta
from .profile import param_costs


def check_vocabulary_parallel(layers: Sequence[nn.Module], loss_fn, *, transport, tp: int, ep: int,
                              dp: int) -> str:
    """ValueError, naming the fix, unless `layers` and the layout can run vocabulary parallel; returns the name
    of the last layer's output projection."""
    head = layers[-1]
    plan = getattr(head, "vocabulary_parallel_plan", None)
    if plan is None:
        raise ValueError(f"vocab_parallel=True splits the last layer's output projection by vocabulary, but "
                         f"{type(head).__name__} has no vocabulary_parallel_plan() naming it: use pipetrain's GPT or "
                         "Llama, a from_hf model, or give the last layer a method returning the name of its nn.Linear "
                         "(vocab, d) applied last")
    name = plan()
    projection = getattr(head, name, None)
    if not isinstance(projection, nn.Linear):
        raise ValueError(f"{type(head).__name__}.vocabulary_parallel_plan() names {name!r}, which is "
                         f"{type(projection).__name__}, not an nn.Linear (vocab, d)")
    if not isinstance(loss_fn, CrossEntropy):
        raise ValueError("vocab_parallel=True computes the cross-entropy from logits split by vocabulary: pass "
                         "loss_fn=pipetrain.CrossEntropy(...) (token_mean, ignore_index and shift as needed), got "
                         f"{type(loss_fn).__name__}")
    shared = {id(p) for layer in layers[:-1] for p in layer.parameters()}
    if any(id(p) in shared for p in projection.parameters()):
        raise ValueError("vocab_parallel=True with the output projection tied to another layer (tied embeddings) is "
                         "not supported yet: untie them, or leave vocab_parallel off")
    if isinstance(transport, InProcessTransport):
        raise ValueError("vocab_parallel=True needs torch.distributed ranks (its collectives), not in-process ones")
    for what, size in (("tensor parallel (tp)", tp), ("expert parallel (ep)", ep), ("data parallel (dp)", dp)):
        if size > 1:
            raise ValueError(f"vocab_parallel=True with {what}={size} is not supported yet: use vocab_parallel "
                             "with pipeline ranks alone")
    return name


def vocabulary_costs(layers: Sequence[nn.Module], balance: list[int], projection: str, num_ranks: int) -> Costs:
    """Costs for placing the passes: each stage's F, I and W its parameters (the head without its projection),
    S one rank's share of the projection and T twice that (a weight and an input gradient)."""
    costs = param_costs(layers)
    head = layers[-1]
    rows = sum(p.numel() for p in getattr(head, projection).parameters())
    costs[-1] = max(costs[-1] - rows, 1.0)
    stages, start = [], 0
    for n in balance:
        stages.append(sum(costs[start:start + n]))
        start += n
    share = rows / num_ranks
    return Costs(f=stages, b=stages, w=stages, s=share, t=2 * share)


def schedule_with_vocabulary(schedule: Schedule, costs: Costs) -> Schedule:
    """`schedule` with the ranks' S and T passes placed (`with_vocabulary`), checked."""
    placed = with_vocabulary(schedule.compute_only(), costs)
    check(placed)
    return placed


def split_projection(layers: Sequence[nn.Module], name: str, *, mesh, device: torch.device,
                     seed: int) -> VocabularyProjection:
    """Make the last layer's projection `name` this rank's rows of it (on every rank; collective over nothing):
    built on the meta device, the layer is made (`materialize`, the same seed as on its own rank) first."""
    index, head = len(layers) - 1, layers[-1]
    if on_meta(head, index):
        materialize({index: head}, device, seed)
    projection: nn.Linear = getattr(head, name)
    vocab, dim = projection.weight.shape
    ranks, rank = mesh.size(), mesh.get_local_rank()
    start, rows = shard_rows(vocab, ranks, rank)
    part = VocabularyProjection(_rows_of(projection.weight, start, rows, mesh, device),
                                _rows_of(projection.bias, start, rows, mesh, device)
                                if projection.bias is not None else None, start)
    setattr(head, name, part)
    return part


def _rows_of(tensor: torch.Tensor, start: int, rows: int, mesh, device: torch.device) -> nn.Parameter:
    from torch.distributed.tensor import DTensor, Shard

    local = tensor.detach()[start:start + rows].to(device).clone()
    stride = torch.empty(tensor.shape, device="meta").stride()  # (the whole tensor's, contiguous)
    part = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=tensor.shape, stride=stride)
    return nn.Parameter(part, requires_grad=tensor.requires_grad)


def pipeline_mesh(pp_group, device: torch.device):
    """The pipeline's ranks as a 1-d DeviceMesh (its group, or the default group's ranks)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(pp_group or dist.group.WORLD, device.type, mesh_dim_names=("pp",))


def vocabulary_shard(layers: Sequence[nn.Module], name: str, *, holds_head: bool, pp_group, device: torch.device,
                     seed: int, loss_fn: CrossEntropy, transport, root: int, timeout: float,
                     autocast: torch.dtype | None) -> tuple[VocabularyShard, dict[int, nn.Module]]:
    """This rank's shard of the head's projection and its S/T runner; and, on a rank without the last stage,
    the layer entry that names the shard's parameters ({last layer index: `ProjectionOnly`})."""
    if transport.world_size < 2:
        raise ValueError("vocab_parallel=True splits the head over the pipeline ranks; this pipeline has one rank: "
                         "launch 2 or more, or leave vocab_parallel off")
    part = split_projection(layers, name, mesh=pipeline_mesh(pp_group, device), device=device, seed=seed)
    shard = VocabularyShard(part, loss=loss_fn, transport=transport, root=root, timeout=timeout, autocast=autocast)
    return shard, ({} if holds_head else {len(layers) - 1: ProjectionOnly(name, part)})


class ProjectionOnly(nn.Module):
    """On a rank without the last stage: the last layer's projection alone, under its own name (so the rank's
    parameters and state are named `"{layer index}.{name}.weight"`, as in one process)."""

    def __init__(self, name: str, projection: VocabularyProjection) -> None:
        super().__init__()
        self.add_module(name, projection)
