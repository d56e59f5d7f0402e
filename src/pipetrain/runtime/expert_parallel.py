"""Expert parallel: a mixture of experts' experts split over the ranks of an "ep" group, each token sent to
the ranks holding its experts and brought back with all-to-all.

An experts module (transformers' `MixtralExperts`, `Qwen3MoeExperts`, ..., and pipetrain's `moe.Experts`)
holds E experts as 3-d parameters (E, ...) and computes `forward(x (n, d), chosen (n, k), weights (n, k))
-> (n, d)`: token i's output is sum_j weights[i, j] * expert_{chosen[i, j]}(x[i]). Split over ep ranks,
rank r keeps experts [r E/ep, (r + 1) E/ep) (a DTensor sharded on dim 0: checkpoints and exports see the
whole tensor) and each call runs

    1. the n * k (token, expert) pairs sorted by expert; counts per expert (E,)
    2. all-to-all of the counts: each rank learns how many tokens every peer sends each of its experts
       (dropless: the sizes are known before the tokens move; a capacity factor drops the excess instead)
    3. all-to-all of the tokens, (sum of counts, d), grouped by owner rank
    4. the module's own forward on its local experts, the tokens regrouped by expert (weight 1 each)
    5. all-to-all of the results back, each pair's output weighted and summed per token

so every gradient is that of one process running all experts (the all-to-alls are each other's backward).
The ep ranks are data-parallel replicas (they borrow ranks from data parallel, as in torchtitan and
Megatron): each routes its own tokens, and the experts' gradients, which already hold every ep rank's
tokens, are summed over the remaining replicas only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .overlap import Lanes

DEFAULT_TIMEOUT = 60.0  # seconds an all-to-all may wait outside a Pipeline (which passes its own)

class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, received: list[int], sent: list[int], group, lanes: Lanes) -> torch.Tensor:
        ctx.received, ctx.sent, ctx.group, ctx.lanes = received, sent, group, lanes
        return _exchange(x, received, sent, group, lanes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.sent, ctx.received, ctx.group, ctx.lanes), None, None, None, None


def _exchange(x: torch.Tensor, received: list[int], sent: list[int], group, lanes: Lanes) -> torch.Tensor:
    """One uneven all-to-all, launched and waited for through `lanes` (an overlapped pair's other lane runs
    meanwhile; the wait is bounded)."""
    out = x.new_empty((sum(received), *x.shape[1:]))
    x = x.contiguous()
    lanes.exchange(lambda: dist.all_to_all_single(out, x, received, sent, group=group, async_op=True),
                   "an expert-parallel all-to-all")
    return out


def all_to_all(x: torch.Tensor, received: list[int], sent: list[int], group, lanes: Lanes) -> torch.Tensor:
    """Send x's rows in pieces of `sent` to the group's ranks, get pieces of `received` (differentiable)."""
    return _AllToAll.apply(x, received, sent, group, lanes)


@dataclass(frozen=True)
class Routing:
    """Where one call's token pairs went: what step 5 needs to bring them back."""

    order: torch.Tensor  # (m,) the kept (token, expert) pairs, as indices into the n * k pairs, by expert
    sent: list[int]  # rows sent to each ep rank
    received: list[int]  # rows received from each
    regroup: torch.Tensor | None  # (r,) the received rows ordered by local expert


def capacity(num_pairs: int, num_experts: int, factor: float) -> int:
    """The most pairs one rank sends to one expert under a capacity factor (GShard's, per rank)."""
    return math.ceil(factor * num_pairs / num_experts)


def route(chosen: torch.Tensor, num_experts: int, ep: int, group, capacity_factor: float | None,
          lanes: Lanes | None) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    """Steps 1-2: (routing, the local expert of each received row in `regroup` order, its tokens' source
    index into the sorted pairs). `chosen` (n, k) in [0, num_experts); the counts' all-to-all (ep > 1) goes
    through `lanes`."""
    flat = chosen.reshape(-1)  # (n * k,)
    order = torch.argsort(flat, stable=True)  # pairs by expert, token order kept within one
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    if capacity_factor is not None:
        cap = capacity(len(flat), num_experts, capacity_factor)
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        place = torch.arange(len(flat), device=flat.device) - starts[flat[order]]  # each pair's place at its expert
        order = order[place < cap]
        counts = counts.clamp(max=cap)
    local = num_experts // ep
    sent_per_expert = counts.view(ep, local)  # (ep, E / ep)
    if ep == 1:
        return Routing(order, [len(order)], [len(order)], None), flat[order], order
    received_per_expert = torch.empty_like(sent_per_expert)  # (ep, E / ep): from each peer
    lanes.exchange(
        lambda: dist.all_to_all_single(received_per_expert, sent_per_expert, group=group, async_op=True),
        "the token counts of an expert-parallel all-to-all")
    both = torch.stack([sent_per_expert.sum(1), received_per_expert.sum(1)]).tolist()  # (one host sync)
    expert_of_row = torch.repeat_interleave(torch.arange(local, device=flat.device).repeat(ep),
                                            received_per_expert.reshape(-1))  # (r,) peer-major, then expert
    regroup = torch.argsort(expert_of_row, stable=True)
    return Routing(order, both[0], both[1], regroup), expert_of_row[regroup], order


class ExpertParallel:
    """Splits one experts module's E experts over the 1-d DeviceMesh `mesh` ("ep") and routes its calls; with
    mesh None, only routes them (one rank: the capacity factor's drops, as ep ranks would make them)."""

    def __init__(self, module: nn.Module, mesh=None, *, capacity_factor: float | None = None,
                 lanes: Lanes | None = None) -> None:
        from torch.distributed.tensor import Shard, distribute_tensor

        self.mesh, self.group = mesh, mesh.get_group() if mesh is not None else None
        self.lanes = lanes if lanes is not None else Lanes(DEFAULT_TIMEOUT)  # (a Pipeline's: its pairs, timeout)
        self.ep, self.capacity_factor = mesh.size() if mesh is not None else 1, capacity_factor
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"the experts' capacity factor must be > 0 (e.g. 1.25), got {capacity_factor}")
        self.num_experts = count_experts(module, self.ep, type(module).__name__)
        per_expert = [n for n, p in module.named_parameters(recurse=False) if p.dim() < 3 and p.shape[:1] == (
            self.num_experts,)]
        if mesh is not None and per_expert:
            raise ValueError(f"{type(module).__name__} holds per-expert parameters {per_expert} that are not 3-d; "
                             "expert parallel splits 3-d expert weights only: use ep=1 for this model")
        self.names = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3] if mesh is not None else []
        for name in self.names:
            whole = getattr(module, name)
            part = distribute_tensor(whole.detach(), mesh, [Shard(0)], src_data_rank=None)  # (no communication)
            setattr(module, name, nn.Parameter(part, requires_grad=whole.requires_grad))
        if hasattr(module, "num_experts"):  # transformers' experts count their experts (one-hot of the choices)
            module.num_experts = self.num_experts // self.ep
        inner = module.forward
        module.forward = lambda x, chosen, weights: self(module, inner, x, chosen, weights)

    def __call__(self, module: nn.Module, inner: Callable, x: torch.Tensor, chosen: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        local_count = self.num_experts // self.ep
        pieces: dict[str, tuple[torch.Tensor, ...]] = {}  # this call's local experts, in one or two pieces

        def local_experts(tokens: torch.Tensor, expert: torch.Tensor, piece: tuple[int, int] | None = None):
            """The module's own forward on its local experts (gradients reach the DTensors); `piece` (cut, 0 or 1):
            only experts [0, cut) or [cut, E / ep), the tensors split once per call (one gradient each, not two)."""
            cut, which = piece if piece is not None else (local_count, 0)
            first, last = (0, cut) if which == 0 else (cut, local_count)
            if first == last:  # (no expert in this piece, so no token either)
                return tokens.new_zeros(0, tokens.shape[-1])
            if not pieces:
                for name in self.names:
                    part = module._parameters[name].to_local()  # (differentiable)
                    pieces[name] = part.split([cut, local_count - cut]) if 0 < cut < local_count else (part, part)
            swapped = {name: module._parameters[name] for name in self.names}
            try:
                for name in self.names:
                    module._parameters[name] = pieces[name][which]
                if hasattr(module, "num_experts"):
                    module.num_experts = last - first
                ones = torch.ones(len(tokens), 1, dtype=weights.dtype, device=weights.device)
                return inner(tokens, (expert - first)[:, None], ones)
            finally:
                module._parameters.update(swapped)
                if hasattr(module, "num_experts"):
                    module.num_experts = local_count

        return dispatch_combine(local_experts, x, chosen, weights, num_experts=self.num_experts, ep=self.ep,
                                group=self.group, capacity_factor=self.capacity_factor, lanes=self.lanes)


def dispatch_combine(local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                     chosen: torch.Tensor, weights: torch.Tensor, *, num_experts: int, ep: int = 1, group=None,
                     capacity_factor: float | None = None, lanes: Lanes | None = None) -> torch.Tensor:
    """Steps 1-5 for x (n, d), chosen (n, k), weights (n, k) -> (n, d); `local_experts(tokens (r, d), expert
    (r,) in [0, E / ep)) -> (r, d)` runs this rank's experts on the tokens it received, grouped by expert
    (under overlapped pairs twice, `local_experts(tokens, expert, (cut, 0 or 1))`: the experts [0, cut), then
    [cut, E / ep); `_experts_in_halves`). With ep 1 (no group), the same routing in one process: a capacity
    factor drops the same pairs. The all-to-alls go through `lanes` (an overlapped pair's turns, bounded waits;
    default: a timeout of 60 s)."""
    n, k = chosen.shape
    if lanes is None and ep > 1:
        lanes = Lanes(DEFAULT_TIMEOUT)
    routing, local_expert, order = route(chosen, num_experts, ep, group, capacity_factor, lanes)
    tokens = x[order // k]  # (m, d) by expert
    if routing.regroup is None:
        back = local_experts(tokens, local_expert)  # (m, d)
    else:
        got = all_to_all(tokens, routing.received, routing.sent, group, lanes)[routing.regroup]  # (r, d) by expert
        out = _experts_in_halves(local_experts, got, local_expert, num_experts // ep, lanes) \
            if lanes.paired and got.requires_grad else _linked(local_experts(got, local_expert), got)  # (r, d)
        back = torch.empty_like(out).index_copy(0, routing.regroup, out)  # (r, d) peer-major again
        back = all_to_all(back, routing.sent, routing.received, group, lanes)  # (m, d) by expert
    pairs = back.new_zeros(n * k, back.shape[-1]).index_copy(0, routing.order, back)  # dropped pairs: 0
    return (pairs.view(n, k, x.shape[-1]) * weights[..., None].to(pairs.dtype)).sum(1).to(x.dtype)


def _linked(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The experts' output, its gradient reaching `tokens` even where no token came (an empty output made without
    them): the backward all-to-alls then run on every rank."""
    return out + 0.0 * tokens if tokens.requires_grad and out.grad_fn is None else out


def _experts_in_halves(local_experts: Callable, got: torch.Tensor, local_expert: torch.Tensor, local_count: int,
                       lanes: Lanes) -> torch.Tensor:
    """The local experts in two pieces, [0, cut) then [cut, E / ep), about half the rows each, with the backward
    lane's third turn (`Lanes.pause`) between the two pieces' backward: the forward makes three all-to-alls per
    layer to the backward's two, and so the forward's token counts are in flight while half the experts' backward
    runs. The second piece's input is taken after the first piece's output, so its pre-hook runs right after its
    own backward (autograd runs the newest ready node first), before the first piece's; on every rank alike (it
    runs where no token came too), or the ranks' all-to-alls would launch in different orders."""
    starts = [0, *torch.bincount(local_expert, minlength=local_count).cumsum(0).tolist()]  # each expert's first row
    cut = min(range(local_count + 1), key=lambda e: abs(starts[e] - len(got) // 2))  # the expert boundary nearest
    half = starts[cut]  # half the rows: each expert runs once
    head = got[:half]
    first = _linked(local_experts(head, local_expert[:half], (cut, 0)), head)
    rest = got[half:]
    rest.register_hook(lambda grad: lanes.pause())
    return torch.cat([first, _linked(local_experts(rest, local_expert[half:], (cut, 1)), rest)])


def count_experts(module: nn.Module, ep: int, where: str) -> int:
    """The number of experts E of an experts module (its 3-d parameters' first dimension), checked: ValueError
    unless it holds its experts so and ep divides E."""
    experts = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    if not experts or any(p.shape[0] != experts[0].shape[0] for p in experts):
        raise ValueError(f"{where}: {type(module).__name__} is named as an experts module but does not hold its "
                         "experts as 3-d parameters (E, ...) with one E")
    if experts[0].shape[0] % ep:
        raise ValueError(f"expert parallel ep={ep} must divide the number of experts, {experts[0].shape[0]} in "
                         f"{where}: choose ep among its divisors")
    return experts[0].shape[0]


def is_expert_parallel(param: torch.Tensor) -> bool:
    """Whether `param` is an expert weight split over an "ep" mesh (its gradient holds every ep rank's tokens)."""
    mesh = getattr(param, "device_mesh", None)
    return mesh is not None and tuple(mesh.mesh_dim_names or ()) == ("ep",)


def parallelize_experts(layers: Mapping[int, nn.Module], all_layers: list[nn.Module], mesh,
                        capacity_factor: float | None = None, lanes: Lanes | None = None) -> None:
    """Split the experts of each of `layers` (this rank's, by index) over the 1-d "ep" `mesh` (None: route
    them in place, for a capacity factor alone); see `expert_splitter`."""
    split = expert_splitter(all_layers, mesh, capacity_factor, lanes)
    for i, layer in layers.items():
        split(i, layer)


def expert_splitter(all_layers: list[nn.Module], mesh, capacity_factor: float | None = None,
                    lanes: Lanes | None = None) -> Callable[[int, nn.Module], None]:
    """`split(index, layer)`, which splits the experts of `layer` (the model's layer `index`) over the 1-d "ep"
    `mesh` (None: routes them in place, for a capacity factor alone), as each layer's `expert_parallel_plan() ->
    [submodule]` names them (the reference Llama's MoE blocks and from_hf MoE layers do). Every layer's plan is
    checked here, on every rank, so an ep that does not divide a layer's experts fails on every rank alike."""
    ep = mesh.size() if mesh is not None else 1
    plans = [layer.expert_parallel_plan() if hasattr(layer, "expert_parallel_plan") else [] for layer in all_layers]
    if not any(plans):
        raise ValueError(f"expert parallel (ep={ep}) or an expert capacity needs layers with experts that say where "
                         "they are, `expert_parallel_plan() -> [submodule]` (the reference Llama with n_experts and "
                         "from_hf MoE models do); none of these layers has experts: use ep=1")
    for i, plan in enumerate(plans):
        for path in plan:
            count_experts(all_layers[i].get_submodule(path), ep, f"layer {i} ({path})")

    def split(index: int, layer: nn.Module) -> None:
        for path in plans[index]:
            ExpertParallel(layer.get_submodule(path), mesh, capacity_factor=capacity_factor, lanes=lanes)

    return split
