"""The user-facing Pipeline: layers + balance + schedule + loss -> step(inputs, targets) -> loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .comm import DistTransport, InProcessTransport, Transport, wait_or_raise
from .data_parallel import GradientAverager, average_over
from .partition import BalanceError, partition
from .profile import param_costs, time_costs, uniform_costs
from .runtime import Executor, RankStep
from .schedule import Action, Event, Op, Schedule, Timeline, check, lower
from .schedule.lowering import PREFETCH, message_order
from .stage import Stage

Balance = str | Sequence[int]
_OPS = list(Op)
_TIED = -1  # the gradient bucket of weights tied across ranks


def _groups_of(mesh, group, dp_group, transport):
    """The (pp, dp) process groups of a DeviceMesh with dimensions named "pp" and optionally "dp"."""
    if group is not None or dp_group is not None or transport is not None:
        raise ValueError("pass either mesh= or group=/dp_group=/transport=, not both")
    names = tuple(mesh.mesh_dim_names or ())
    if "pp" not in names or not set(names) <= {"dp", "pp"}:
        raise ValueError(f"mesh dimensions must be named 'pp' and optionally 'dp', got {names}: e.g. "
                         "init_device_mesh('cpu', (dp, pp), mesh_dim_names=('dp', 'pp'))")
    return mesh.get_group("pp"), (mesh.get_group("dp") if "dp" in names else None)


@dataclass(frozen=True)
class _Tie:
    peer: int  # the other rank using the weight
    owner: bool  # this rank holds its first use


class Pipeline:
    """Runs `layers` split into the schedule's stages; call `step` with the same batch on every rank.

    Each rank keeps (and moves to `device`) only the layers of its own stages; their gradients
    accumulate in the modules passed in, as in plain PyTorch, so a torch optimizer over
    `pipe.parameters()` trains this rank's part of the model.

    Args:
        layers: modules, each mapping one tensor to one tensor; the last one's output goes to `loss_fn`.
        schedule: from `pipetrain.schedules.build(...)`.
        loss_fn: `(output, targets) -> scalar`, the mean over a microbatch (e.g. cross-entropy).
        balance: layers per stage, or how to compute it: "uniform", "params", or "time" (profiles each
            layer on rank 0 with `sample`, one microbatch of input, and shares the result).
        group: the torch.distributed group of the pipeline's ranks (default: the world).
        dp_group: the group of this rank's data-parallel replicas (the ranks at the same pipeline position
            in the other pipelines); each stage's gradients are averaged over it as soon as the stage's
            last backward finishes. `step()` then takes this replica's share of the global batch.
        mesh: instead of `group`/`dp_group`, a DeviceMesh with dimensions named "pp" (and "dp"), e.g.
            `init_device_mesh("cpu", (dp, pp), mesh_dim_names=("dp", "pp"))`.
        device: where this rank's layers run (default: cuda:current for NCCL, else CPU).
        transport: instead of `group`, a transport (e.g. `InProcessHub(n).transport(rank)`).
        timeout: seconds any transfer may wait before the step fails naming the action and peer.
        split_directions: one communicator per direction of each rank pair (default: only for NCCL,
            where it is needed; see `DistTransport`). Collective over the default group.
        checkpoint: activation checkpointing, for every stage (True) or the listed stage indices: F keeps
            only the stage input and backward recomputes the rest (less memory, about one more forward).
        prefetch: post each receive this many compute actions before the one that needs it (each
            posted receive holds its buffer from then on).
        precision: "fp32", or "bf16" to run forwards (and their recomputation) under bf16 autocast; the
            parameters, their gradients and the optimizer stay fp32.
    """

    def __init__(self, layers: Sequence[nn.Module], *, schedule: Schedule,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], balance: Balance = "uniform",
                 group=None, device: torch.device | str | None = None, transport: Transport | None = None,
                 timeout: float = 60.0, sample: torch.Tensor | None = None,
                 split_directions: bool | None = None, checkpoint: bool | Sequence[int] = False,
                 prefetch: int = PREFETCH, precision: str = "fp32", dp_group=None, mesh=None) -> None:
        layers = list(layers)
        if mesh is not None:
            group, dp_group = _groups_of(mesh, group, dp_group, transport)
        bad = [i for i, layer in enumerate(layers) if not isinstance(layer, nn.Module)]
        if bad:
            raise TypeError(f"layers[{bad[0]}] is a {type(layers[bad[0]]).__name__}, not an nn.Module")
        if not isinstance(schedule, Schedule):
            raise TypeError("schedule must be a pipetrain Schedule, e.g. pipetrain.schedules.build('1f1b', ...)")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f'precision must be "fp32" or "bf16", got {precision!r}')
        schedule = schedule.compute_only()
        check(schedule)
        if not schedule.has_backward:
            raise ValueError(f"schedule {schedule.name!r} has no backward actions; Pipeline needs a training "
                             "schedule (evaluate() derives the forward-only one)")
        if len(layers) < schedule.num_stages:
            raise BalanceError(f"{len(layers)} layers cannot fill {schedule.num_stages} stages: use a schedule "
                               f"with at most {len(layers)} stages (ranks x stages_per_rank) or more layers")
        if isinstance(balance, str) and balance == "time" and sample is None:
            raise ValueError('balance="time" needs `sample=`, one microbatch of model input to profile on')
        self.schedule = schedule
        self.timeout = float(timeout)
        if transport is None:
            transport = DistTransport(group, torch.device(device) if device is not None else None,
                                      pairs=list(message_order(schedule)), split_directions=split_directions)
        if transport.world_size != schedule.num_ranks:
            raise ValueError(f"schedule {schedule.name!r} is for {schedule.num_ranks} ranks but the process group "
                             f"has {transport.world_size}: build the schedule with num_ranks="
                             f"{transport.world_size} or launch {schedule.num_ranks} processes")
        self.transport = transport
        self.rank = transport.rank
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.device = torch.device(device) if device is not None else transport.device
        self.balance = self._resolve_balance(balance, layers, sample)
        bounds = [0]
        for n in self.balance:
            bounds.append(bounds[-1] + n)
        self.layer_ranges = {s: range(bounds[s], bounds[s + 1]) for s in range(schedule.num_stages)}
        checkpointed = set(range(schedule.num_stages)) if checkpoint is True else set(checkpoint or ())
        unknown = sorted(checkpointed - set(range(schedule.num_stages)))
        if unknown:
            raise ValueError(f"checkpoint lists stages {unknown}, but the stages are 0..{schedule.num_stages - 1}")
        self.stages = {
            s: Stage(s, schedule.num_stages, [layers[i].to(self.device) for i in self.layer_ranges[s]],
                     loss_fn=loss_fn, checkpoint=s in checkpointed,
                     autocast=torch.bfloat16 if precision == "bf16" else None)
            for s in schedule.stages_of(self.rank)
        }
        self._ties = self._find_ties(layers)
        if self._ties and isinstance(transport, InProcessTransport):
            raise ValueError("a parameter is shared by layers on different ranks (tied weights); in-process ranks "
                             "share one Python object for it, so run such a model in separate processes")
        self._train_actions = lower(schedule, prefetch=prefetch).actions[self.rank]
        self._eval_actions = lower(schedule.forward_only(), prefetch=prefetch).actions[self.rank]
        self._executor = Executor(rank=self.rank, stage_to_rank=schedule.stage_to_rank, stages=self.stages,
                                  transport=transport, timeout=self.timeout)
        self.last_step: RankStep | None = None
        self._averager = self._make_averager() if self.dp_size > 1 else None

    # --- public API ----------------------------------------------------------------------------------
    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None, *, scale: float = 1.0,
             sync_gradients: bool = True) -> float:
        """One training step over the batch; returns the mean microbatch loss (same float on every rank).

        Gradients accumulate into this rank's layers scaled so that they equal the gradient of
        `scale` x the full-batch mean loss; zero them between optimizer steps as usual. Accumulating k
        batches with `scale=1/k` gives the gradient of the mean over all k batches.

        With data parallelism, each replica passes its own share of the global batch (equal sizes); the
        gradients and the returned loss are then the means over the replicas. `sync_gradients=False`
        skips the gradient averaging (e.g. all but the last of several accumulated steps: the last one
        averages everything accumulated).
        """
        before = [p.grad.clone() if p.grad is not None else None for _, p in self._ties]
        sync = self._averager is not None and sync_gradients
        try:
            loss = self._run(self._train_actions, inputs, targets, grad=True, scale=scale,
                             on_stage_done=self._averager.start if sync else None)
            self._sync_tied_gradients(before)
            if sync:
                self._averager.start(_TIED)  # tied weights: after the peer's contribution is added
                self._averager.finish()
        except BaseException:
            if self._averager is not None:
                self._averager.abandon()
            raise
        return self._replica_mean(loss)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> float:
        """Forward only (no activations kept, no gradients): the mean microbatch loss on every rank (and
        over the replicas, with data parallelism)."""
        return self._replica_mean(self._run(self._eval_actions, inputs, targets, grad=False))

    def gather_timeline(self, dst: int = 0) -> Timeline | None:
        """The last step's measured timeline of every rank, on rank `dst` (None elsewhere). Collective.

        Times are seconds from the earliest rank's step start. Ranks on one host share the clock; across
        hosts the rows are aligned only as well as the hosts' clocks are.
        """
        step = self.last_step
        if step is None:
            raise RuntimeError("gather_timeline() needs a step first: call step() or evaluate()")
        rows = [[e.action.stage, _OPS.index(e.action.op), e.action.mb, e.start + step.t0, e.end + step.t0, kind]
                for kind, events in ((0, step.events + step.comms), (1, step.waits)) for e in events]
        data = torch.tensor(rows, dtype=torch.float64, device=self.transport.device).reshape(-1, 6)
        header = torch.tensor([len(rows), step.step_time, step.t0], dtype=torch.float64,
                              device=self.transport.device)
        what = "gathering the timeline"
        if self.rank != dst:
            for work in (self.transport.isend(header, dst), self.transport.isend(data, dst)):
                wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=dst, what=what)
            return None
        per_rank = {self.rank: (data, header)}
        for r in range(self.transport.world_size):
            if r == dst:
                continue
            head = torch.zeros(3, dtype=torch.float64, device=self.transport.device)
            wait_or_raise(self.transport.irecv(head, r), timeout=self.timeout, transport=self.transport, peer=r,
                          what=what)
            body = torch.zeros(int(head[0].item()), 6, dtype=torch.float64, device=self.transport.device)
            wait_or_raise(self.transport.irecv(body, r), timeout=self.timeout, transport=self.transport, peer=r,
                          what=what)
            per_rank[r] = (body, head)
        origin = min(float(head[2]) for _, head in per_rank.values())
        events, waits, step_times = [], [], [0.0] * self.transport.world_size
        for r, (body, head) in per_rank.items():
            step_times[r] = float(head[2]) + float(head[1]) - origin
            for stage, op, mb, start, end, kind in body.tolist():
                event = Event(r, Action(int(stage), _OPS[int(op)], int(mb)), start - origin, end - origin)
                (waits if kind else events).append(event)
        return Timeline(self.transport.world_size, tuple(sorted(events, key=lambda e: (e.rank, e.start, e.end))),
                        tuple(sorted(waits, key=lambda e: (e.rank, e.start))), tuple(step_times))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of this rank's stages, each once (what this rank's optimizer should own)."""
        seen = set()
        for stage in self.stages.values():
            for p in stage.module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def owned_parameters(self) -> Iterator[nn.Parameter]:
        """Like `parameters()`, but a weight tied across ranks only on the rank of its first use: summing
        over every rank's owned parameters counts each weight once (e.g. for a global gradient norm)."""
        copies = {id(p) for tie, p in self._ties if not tie.owner}
        return (p for p in self.parameters() if id(p) not in copies)

    def local_layers(self) -> list[nn.Module]:
        return [layer for stage in self.stages.values() for layer in stage.layers]

    def train(self, mode: bool = True) -> Pipeline:
        for stage in self.stages.values():
            stage.module.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)

    # --- internals -----------------------------------------------------------------------------------
    def _find_ties(self, layers: list[nn.Module]) -> list[tuple[_Tie, nn.Parameter]]:
        """Parameters used by layers on two different ranks (one nn.Parameter object in both layers, as
        with tied input/output embeddings). Their gradients are summed across the two ranks after every
        step, so both copies see the single-process gradient and stay equal under the same optimizer."""
        first_use: dict[int, int] = {}
        ties = []
        rank_of_layer = {i: self.schedule.stage_to_rank[s] for s, r in self.layer_ranges.items() for i in r}
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                if id(p) not in first_use:
                    first_use[id(p)] = i
                    continue
                a, b = rank_of_layer[first_use[id(p)]], rank_of_layer[i]
                if a != b and self.rank in (a, b):
                    ties.append((_Tie(peer=b if self.rank == a else a, owner=self.rank == a), p))
        return ties

    def _sync_tied_gradients(self, before: list[torch.Tensor | None]) -> None:
        """Add the peer's gradient contribution of this step to each tied weight (both ranks, same order);
        `before` holds each tied weight's gradient from before the step."""
        for old, (tie, p) in zip(before, self._ties, strict=True):
            mine = p.grad - old if old is not None else (p.grad if p.grad is not None else torch.zeros_like(p))
            mine = mine.contiguous()
            theirs = torch.empty_like(mine)
            works = [(self.transport.isend(mine, tie.peer), "send"), (self.transport.irecv(theirs, tie.peer), "recv")]
            for work, what in works:
                wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=tie.peer,
                              what=f"tied-weight gradient {what}")
            first, second = (mine, theirs) if tie.owner else (theirs, mine)  # same sum order on both ranks
            total = first + second
            p.grad = total if old is None else old + total

    def _make_averager(self) -> GradientAverager:
        """One bucket per stage, each parameter in the bucket of the last of its stages to finish its
        weight gradients (a weight shared by two stages of this rank), tied weights in their own."""
        if isinstance(self.transport, InProcessTransport):
            raise ValueError("dp_group needs torch.distributed ranks; in-process ranks have no data parallelism")
        mine = (self.rank, self.schedule.name, self.schedule.num_microbatches, tuple(self.balance))
        replicas: list = [None] * self.dp_size
        dist.all_gather_object(replicas, mine, group=self.dp_group)
        if any(r != mine for r in replicas):
            raise ValueError(f"the dp_group's replicas disagree on (pipeline rank, schedule, microbatches, balance): "
                             f"{replicas}; each data-parallel group must hold the ranks at the same pipeline "
                             "position of identical pipelines (a DeviceMesh with dims ('dp', 'pp') does this)")
        last_action = {a.stage: i for i, a in enumerate(self._train_actions) if a.op in (Op.B, Op.W)}
        tied = {id(p) for _, p in self._ties}
        bucket_of: dict[int, int] = {}
        params: dict[int, nn.Parameter] = {}
        for s in sorted(self.stages, key=lambda s: last_action[s]):
            for p in self.stages[s].module.parameters():
                bucket_of[id(p)] = _TIED if id(p) in tied else s
                params[id(p)] = p
        buckets: dict[int, list[nn.Parameter]] = {}
        for key, p in params.items():
            buckets.setdefault(bucket_of[key], []).append(p)
        return GradientAverager(self.dp_group, buckets, self.timeout)

    def _replica_mean(self, loss: float) -> float:
        if self.dp_size == 1:
            return loss
        value = torch.tensor([loss], dtype=torch.float64, device=self.transport.device)
        return float(average_over(self.dp_group, value, self.timeout)[0])

    def _run(self, actions, inputs, targets, *, grad: bool, scale: float = 1.0, on_stage_done=None) -> float:
        m = self.schedule.num_microbatches
        last = self.schedule.num_stages - 1
        for needed, name, stage in ((inputs, "inputs", 0), (targets, "targets", last)):
            if needed is None and stage in self.stages:
                raise ValueError(f"rank {self.rank} runs stage {stage} and needs `{name}`, got None: pass the "
                                 "same batch to step() on every rank")
        split_inputs = self._split(inputs, "inputs", m)
        split_targets = self._split(targets, "targets", m)
        result = self._executor.run(actions, inputs=split_inputs, targets=split_targets, num_microbatches=m,
                                    grad=grad, loss_scale=scale / m, on_stage_done=on_stage_done)
        self.last_step = result
        return result.loss

    def _split(self, batch: torch.Tensor | None, name: str, m: int) -> list[torch.Tensor] | None:
        if batch is None:
            return None
        if not isinstance(batch, torch.Tensor) or batch.dim() == 0:
            raise TypeError(f"{name} must be a tensor with a batch dimension first")
        if batch.shape[0] % m:
            lower_ok = batch.shape[0] - batch.shape[0] % m
            raise ValueError(f"{name} has batch size {batch.shape[0]}, which does not split into {m} equal "
                             f"microbatches: use a batch size that is a multiple of {m} (e.g. {lower_ok or m}) "
                             "or change the number of microbatches")
        return list(batch.to(self.device).tensor_split(m))

    def _resolve_balance(self, balance: Balance, layers: list[nn.Module], sample) -> list[int]:
        num_stages = self.schedule.num_stages
        if isinstance(balance, str):
            if balance == "uniform":
                return partition(uniform_costs(layers), num_stages)
            if balance == "params":
                return partition(param_costs(layers), num_stages)
            if balance == "time":
                return partition(self._shared_time_costs(layers, sample), num_stages)
            raise ValueError(f'balance must be "uniform", "params", "time" or a list of layer counts, got {balance!r}')
        counts = list(balance)
        if (len(counts) != num_stages or any(not isinstance(n, int) or n < 1 for n in counts)
                or sum(counts) != len(layers)):
            raise BalanceError(f"balance {counts} must list {num_stages} positive layer counts (one per stage) "
                               f"summing to the {len(layers)} layers")
        return counts

    def _shared_time_costs(self, layers: list[nn.Module], sample: torch.Tensor) -> list[float]:
        """Rank 0 measures; every rank partitions with rank 0's numbers so all agree on the split."""
        costs = torch.zeros(len(layers), dtype=torch.float64, device=self.transport.device)
        if self.rank == 0:
            costs.copy_(torch.tensor(time_costs(layers, sample), dtype=torch.float64))
            works = [(self.transport.isend(costs, r), r) for r in range(1, self.transport.world_size)]
        else:
            works = [(self.transport.irecv(costs, 0), 0)]
        for work, peer in works:  # rank 0 profiles every layer first: raise `timeout` for a large model
            wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=peer,
                          what="sharing the measured layer times")
        if self.dp_size > 1:  # every replica must split the layers alike: the mean of their measurements
            average_over(self.dp_group, costs, self.timeout)
        return costs.tolist()
