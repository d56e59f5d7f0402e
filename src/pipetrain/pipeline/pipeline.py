"""The user-facing Pipeline: layers + balance + schedule + loss -> step(inputs, targets) -> loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..runtime.comm import Transport, wait_replicas
from ..runtime.data_parallel import TIED, averager_for, sum_over
from ..runtime.dist_transport import DistTransport
from ..runtime.executor import AUX_SUM, LOSS_COUNT, LOSS_SUM, PAIR_LOSSES, Executor, RankStep, gather_timeline
from ..runtime.expert_parallel import expert_splitter
from ..runtime.in_process import InProcessTransport
from ..runtime.overlap import Lanes
from ..runtime.stage import LossWeights, Stage
from ..runtime.tensor_parallel import parallelize
from ..runtime.ties import TiedWeights
from ..runtime.window import Window
from ..schedule import Action, Event, Op, Schedule, Timeline, lower, with_collectives
from ..schedule.lowering import PREFETCH, message_order
from ..schedule.overlap import overlap as overlap_pairs
from .auto_plan import PipelinePlan, plan_pipeline, schedule_to_run
from .balance import Balance, resolve_balance
from .checks import check_expert_parallel, check_shard, checked_schedule, groups_of, splits_backward
from .materialize import materialize
from .microbatches import step_microbatches
from .parameters import RankParameters
from .profile import time_costs
from .rank0_measure import measured_on_pipeline_rank_0
from .same_weights import check_same_weights
from .step_collectives import check_step_collectives
from .vocabulary import (
    check_vocabulary_parallel,
    schedule_with_vocabulary,
    vocabulary_costs,
    vocabulary_shards,
    vocabulary_tables,
    whole_tables,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

class Pipeline(RankParameters):
    """Runs `layers` split into the schedule's stages; call `step` with the same batch on every rank.

    Each rank keeps (and moves to `device`) only the layers of its own stages; their gradients
    accumulate in the modules passed in, as in plain PyTorch, so a torch optimizer over
    `pipe.parameters()` trains this rank's part of the model.

    Args:
        layers: modules; each receives the previous one's output as its single argument: a tensor, or a
            tuple/list/dict (nested) of tensors. Floating-point tensors that require grad get their
            gradient back; all other tensors (masks, position ids) travel forward only. The last layer's
            output goes to `loss_fn`.
        schedule: what to run: a Schedule (`pipetrain.schedules.build(...)`); a registered name such as
            "1f1b" (built for this pipeline's ranks and `num_microbatches=`, at the schedule's own stages per
            rank); a `PipelinePlan` from `pipetrain.plan_pipeline(...)` (its schedule and split); or "auto",
            which is `plan_pipeline` called here on `sample` for `num_microbatches=` (to pass it
            `sample_target=` or `memory_limit=`, call it yourself); it weighs vocabulary parallelism too
            unless `vocab_parallel=` says.
        loss_fn: `(output, targets) -> loss`: a scalar mean over the microbatch, or a pair
            `(loss_sum, count)` for an exact token mean over the whole batch (see `step`).
        balance: layers per stage, or how to compute it: "uniform", "params", or "time" (profiles each
            layer on rank 0 with `sample`, one microbatch of input, and shares the result).
        mesh: the ranks, as a DeviceMesh with dimensions named "pp" and optionally "dp" and "tp", e.g.
            `init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))`: "pp" is this pipeline's
            ranks, "dp" this rank's data-parallel replicas (the same pipeline position in the other pipelines),
            over which each stage's gradients are summed as soon as its last backward finishes (`step()` then
            takes this replica's share of the global batch); "tp" the ranks that split each of its layers by the
            layer's `tensor_parallel_plan` (runtime/tensor_parallel.py; they pass the same batch and hold the
            same activations between layers); "ep", after "dp", ranks that are data-parallel replicas too
            (each its own share of the batch) and split each MoE layer's experts, as its
            `expert_parallel_plan` names them, sending tokens to their experts with all-to-all
            (runtime/expert_parallel.py), e.g. `mesh_dim_names=("dp", "ep", "pp")`. Default: every rank of the
            default process group is one pipeline.
        shard: with replicas ("dp"), "optimizer" (ZeRO-1), "gradients" (ZeRO-2) or "params" (ZeRO-3): each
            replica's optimizer owns 1/dp of every stage's parameters; build it with `pipe.optimizer(make)`
            (see `RankParameters.optimizer`). "gradients" also reduce-scatters each stage's gradients when its
            last B or W is done and frees the full ones; "params" also releases the parameters between steps
            (each stage's GATHER brings them back; `unshard()` for use outside a step). Default "none".
        sequence_parallel: with "tp", Megatron's sequence parallelism: between the split modules, and between
            stages, each tp rank holds its part of the sequence (norms, residuals, dropout: 1/tp of their
            activations; the row-split linears reduce-scatter, the norms all-gather). Needs layers whose plans
            mark it (the reference GPT and Llama) and a sequence length tp divides.
        device: where this rank's layers run (default: cuda:current for NCCL, else CPU).
        transport: instead of a process group, a transport (e.g. `InProcessHub(n).transport(rank)`).
        timeout: seconds any transfer may wait before the step fails naming the action and peer.
        split_directions: one communicator per direction of each rank pair (default: only for NCCL,
            where it is needed; see `DistTransport`). Collective over the default group.
        checkpoint: activation checkpointing, for every stage (True) or the listed stage indices: F keeps
            only the stage input and backward recomputes the rest (less memory, about one more forward).
        prefetch: post each receive this many compute actions before the one that needs it (each
            posted receive holds its buffer from then on).
        precision: "fp32", or "bf16" to run forwards (and their recomputation) under bf16 autocast; the
            parameters, their gradients and the optimizer stay fp32.
        expert_capacity: a capacity factor for the experts (e.g. 1.25): each rank sends an expert at most
            ceil(factor * pairs / experts) of its (token, expert) pairs per call and drops the rest (their
            weight's share of the token's output is 0). Default None: dropless.
        overlap: with "ep", pair forwards with backwards of other microbatches (`pipetrain.schedules.overlap`,
            where the simulation says the step gets faster) and run each pair as two lanes taking turns at
            their all-to-alls, so one lane's all-to-all is in flight while the other computes
            (runtime/overlap.py). A schedule given with pairs (`+1B0`) runs them either way.
        vocab_parallel: split the first layer's token embedding and the last layer's projection with its
            cross-entropy by vocabulary over every rank (docs/vocabulary.md). None (the default): as the plan says
            with schedule="auto" or a PipelinePlan, else off.
        seed: layers built on the meta device (`with torch.device("meta"): ...`) get storage on this rank
            only for its own stages, initialized by their `init_weights()` (or each submodule's
            `reset_parameters()`) under a seed made of `seed` and the layer's index: the same weights
            however many ranks split the model (on one kind of device). A weight tied across ranks starts
            from its first use's value on both.
    """

    def __init__(self, layers: Sequence[nn.Module], *, schedule: Schedule | PipelinePlan | str,
                 loss_fn: Callable[[Any, Any], Any], balance: Balance = "uniform", mesh: DeviceMesh | None = None,
                 device: torch.device | str | None = None, transport: Transport | None = None, timeout: float = 60.0,
                 sample: Any = None, split_directions: bool | None = None, checkpoint: bool | Sequence[int] = False,
                 prefetch: int = PREFETCH, precision: str = "fp32", seed: int = 0,
                 num_microbatches: int | None = None, shard: str = "none", sequence_parallel: bool = False,
                 expert_capacity: float | None = None, overlap: bool = False,
                 vocab_parallel: bool | None = None) -> None:
        layers = list(layers)
        groups = groups_of(mesh, transport)

        def check_vocabulary():
            return check_vocabulary_parallel(layers, loss_fn, transport=transport, tp=groups.tp_size,
                                             ep=groups.ep_size, shard=shard, sequence_parallel=sequence_parallel)

        if vocab_parallel:
            check_vocabulary()  # (before any communication)
        check_expert_parallel(groups.ep_size, shard=shard, tp=groups.tp_size, overlap=overlap)
        dp_group = groups.dp
        check_shard(shard, dp_group)
        # what to run: a Schedule, a name, a PipelinePlan (schedule and split) or "auto" (planned here)
        if isinstance(schedule, str) and schedule == "auto":
            weigh = False if vocab_parallel is None and sequence_parallel else vocab_parallel
            schedule = plan_pipeline(layers, num_microbatches=num_microbatches, sample=sample, loss_fn=loss_fn,
                                     mesh=mesh, transport=transport, timeout=timeout, vocab_parallel=weigh,
                                     shard=shard)
        if isinstance(schedule, PipelinePlan):
            if vocab_parallel is not None and bool(vocab_parallel) != schedule.vocab_parallel:
                raise ValueError(f"vocab_parallel={vocab_parallel}, but the PipelinePlan was made "
                                 f"{'with' if schedule.vocab_parallel else 'without'} vocabulary parallelism: plan "
                                 f"with plan_pipeline(..., vocab_parallel={vocab_parallel}), or leave it out here")
            vocab_parallel = schedule.vocab_parallel
        vocab_parallel = bool(vocab_parallel)
        vocabulary = check_vocabulary() if vocab_parallel else None
        schedule, balance = schedule_to_run(schedule, balance, num_microbatches=num_microbatches,
                                            num_ranks=lambda: transport.world_size if transport is not None
                                            else _group_size(groups.pp))
        if overlap and not any(a.paired for acts in schedule.actions for a in acts):
            schedule = overlap_pairs(schedule.compute_only())
        self.schedule = schedule = checked_schedule(schedule, layers, timeout, precision, balance, sample)
        self.timeout = float(timeout)
        self.transport = transport or DistTransport(groups.pp, torch.device(device) if device is not None else None,
                                                    pairs=list(message_order(schedule)),
                                                    split_directions=split_directions, vocabulary=vocab_parallel)
        if self.transport.world_size != schedule.num_ranks:
            raise ValueError(f"schedule {schedule.name!r} is for {schedule.num_ranks} ranks but the process group "
                             f"has {self.transport.world_size}: build the schedule with num_ranks="
                             f"{self.transport.world_size} or launch {schedule.num_ranks} processes")
        self.rank = self.transport.rank
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.tp_mesh = groups.tp  # this rank's tensor-parallel group (a 1-d DeviceMesh), or None
        self.tp_size = groups.tp_size
        self.tp_rank = groups.tp.get_local_rank() if groups.tp is not None else 0
        self._replica_groups = groups.replicas
        if sequence_parallel and self.tp_size == 1:
            raise ValueError("sequence_parallel=True splits activations over the tensor-parallel ranks: give a mesh "
                             "with a \"tp\" dimension of 2 or more (CLI: --tp), or leave it off")
        self.sequence_parallel = sequence_parallel
        self.ep_mesh = groups.ep  # this rank's expert-parallel group (a 1-d DeviceMesh), or None
        self.ep_size = groups.ep_size
        self.expert_dp_group = groups.expert_dp  # the replicas holding this rank's experts ("dp" alone), or None
        self.expert_capacity = expert_capacity
        self.device = torch.device(device) if device is not None else self.transport.device
        self._lanes = Lanes(self.timeout, self.device)  # overlapped pairs' turns, and every all-to-all's wait
        self._lanes.paired = any(a.paired for acts in schedule.actions for a in acts)
        # split
        self.balance = resolve_balance(balance, layers, schedule,
                                       measured_costs=lambda: self._shared_time_costs(layers, sample),
                                       projection=vocabulary.projection if vocabulary else None)
        if vocabulary is not None:  # every rank's E, S, T and G passes, placed for the split's costs
            schedule = self.schedule = schedule_with_vocabulary(schedule, vocabulary_costs(
                layers, self.balance, vocabulary, schedule.num_ranks))
        starts = [sum(self.balance[:s]) for s in range(schedule.num_stages + 1)]
        self.layer_ranges = {s: range(starts[s], starts[s + 1]) for s in range(schedule.num_stages)}
        # place
        rank_of_layer = {i: schedule.stage_to_rank[s] for s, r in self.layer_ranges.items() for i in r}
        self._ties = TiedWeights(layers, rank_of_layer, self.rank,
                                 local=vocabulary_tables(layers, vocabulary) if vocabulary else set())
        if self._ties and isinstance(self.transport, InProcessTransport):
            raise ValueError("a parameter is shared by layers on different ranks (tied weights); in-process ranks "
                             "share one Python object for it, so run such a model in separate processes")
        self._vocabulary, self._embedding, self._extra_layers = vocabulary_shards(
            layers, vocabulary, schedule, pp_group=groups.pp, device=self.device, seed=seed, loss_fn=loss_fn,
            transport=self.transport, timeout=self.timeout,
            autocast=torch.bfloat16 if precision == "bf16" else None, pp_tp=groups.pp_and_tp(),
            tp_group=groups.tp.get_group() if groups.tp is not None else None) if vocabulary else (None, None, {})
        self.stages = self._place(layers, None if vocabulary else loss_fn, checkpoint, precision, seed)
        check_same_weights(layers, self.transport, self.timeout)  # after every check one rank may fail alone
        self._ties.share_values(self.transport, self.timeout)
        # hand over to one executor
        train = with_collectives(schedule, reduce=self.dp_size > 1, gather=shard == "params")
        self._train_actions = lower(train, prefetch=prefetch).actions[self.rank]
        self._eval_actions = lower(schedule.forward_only(), prefetch=prefetch).actions[self.rank]
        self._executor = Executor(rank=self.rank, stage_to_rank=schedule.stage_to_rank, stages=self.stages,
                                  transport=self.transport, timeout=self.timeout, lanes=self._lanes,
                                  vocabulary=self._vocabulary, embedding=self._embedding)
        self.shard = shard
        self._averager = None
        if self.dp_size > 1:
            if isinstance(self.transport, InProcessTransport):
                raise ValueError("dp_group needs torch.distributed ranks; in-process ranks have no data parallelism")
            identity = (self.rank, schedule.name, schedule.num_microbatches, tuple(self.balance), shard)
            tables = self._vocabulary.tables() + self._embedding.tables() if self._vocabulary else []
            self._averager = averager_for(self.stages, self._train_actions, self._ties.params + tables, dp_group,
                                          self.timeout, identity, shard, expert_group=groups.expert_dp)
        check_step_collectives(self._train_actions, self.transport, dp_group, self._ties)
        self._training = True
        self._window: Window | None = None
        self.last_step: RankStep | None = None
        self.last_generation: RankStep | None = None  # the last generate call's measured events
        self.last_generation_groups: list[list[int]] = []  # and its groups (prompt indices), in circulation order

    # --- training and evaluation --------------------------------------------------------------------
    def step(self, inputs: Any = None, targets: Any = None, *, microbatches: Sequence[tuple[Any, Any]] | None = None,
             scale: float = 1.0, sync_gradients: bool = True, num_tokens: float | None = None) -> float:
        """One training step; returns its loss (the same float on every rank).

        `inputs` and `targets` are a tensor or a tuple/list/dict of tensors, split along dim 0 into the
        schedule's M microbatches; or pass `microbatches=[(inputs_0, targets_0), ...]` (M pairs, which may
        differ in shape). Every rank passes the same batch (the ranks use its shapes to agree on the shapes
        between stages); `targets` may be None on ranks without the last stage.

        The loss and gradients are those of the whole batch: with a mean loss, the mean of the microbatch
        losses (each weighted `scale / M`); with a `(loss_sum, count)` loss, the token mean
        `sum(loss_sum) / sum(count)` over every microbatch (and replica). Auxiliary losses
        (`pt.add_aux_loss`) are weighted `scale / M` per microbatch (and averaged over replicas), whatever
        the main loss's normalization. Gradients accumulate into this rank's layers; zero them between
        optimizer steps as usual.

        Accumulation: k steps with `scale=1/k` give the mean of k batches' mean losses (and weigh each
        auxiliary loss as accumulating all k x M microbatches would). A `(loss_sum, count)` loss is
        normalized by counts instead of `scale`: pass `sync_gradients=False` to every step but the last of
        the window; the last one divides the window's gradients by its total count, which is then the
        exact token mean over all k batches. `num_tokens`, the window's total count over all replicas when
        known up front, normalizes each microbatch during its backward instead (needed together with
        auxiliary losses, whose weight relative to the token mean depends on it).
        With data parallelism, each replica passes its own share of the global batch; gradients are
        reduced over the replicas at the steps with `sync_gradients=True`.
        """
        xs, ys, keys = self._microbatches(inputs, targets, microbatches, grad=True)
        m = self.schedule.num_microbatches
        if num_tokens is not None and not num_tokens > 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
        weights = LossWeights(mean=scale / m, total=1.0 if num_tokens is None else 1.0 / num_tokens,
                              aux=scale / m if num_tokens is None else scale / (m * self.dp_size))
        window = self._window = self._window or Window(list(self.parameters()), num_tokens)
        sync = self._averager is not None and sync_gradients
        try:
            result = self._executor.run(self._train_actions, inputs=xs, targets=ys, keys=keys, grad=True,
                                        weights=weights, collectives=self._averager, reduce=sync)
            if sync_gradients:  # the window's tied gradients, then their replicas' (after the peer's part is in)
                self._ties.sync(self.transport, self.timeout)
                if sync:
                    self._averager.reduce(TIED)
            # the reductions' waits, timed before the loss all-reduce (which may queue behind them: NCCL)
            waited = self._averager.wait() if sync else []
            totals = self._finish(result)
            self._record_reduce_waits(waited)
            window.add(totals, num_tokens)
            if sync_gradients:
                self._window = None
                factor = window.close(self.dp_size)
                if sync:
                    self._averager.finish(factor)
                elif factor != 1.0:
                    for p in window.params:
                        if p.grad is not None:
                            p.grad.mul_(factor)
                window.restore()
                if sync:
                    self._averager.settle()
        except BaseException:
            if self._averager is not None:
                self._averager.abandon()
            self._window = None
            window.restore(drop_new=True)
            raise
        return self.last_step.loss

    @torch.no_grad()
    def evaluate(self, inputs: Any = None, targets: Any = None, *,
                 microbatches: Sequence[tuple[Any, Any]] | None = None) -> float:
        """Forward only (no activations kept, no gradients): the batch's loss on every rank (over the
        replicas too, with data parallelism), computed as `step` computes it."""
        xs, ys, keys = self._microbatches(inputs, targets, microbatches, grad=False)
        self.unshard()
        result = self._executor.run(self._eval_actions, inputs=xs, targets=ys, keys=keys, grad=False)
        self._finish(result)
        return self.last_step.loss

    def generate(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, num_groups: int | None = None, prefill_chunk: int = 16,
                 return_logprobs: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Continue each prompt (a 1-D token tensor; lengths may differ) on this pipeline's own stages, with a
        KV cache per stage and group of sequences; call on every rank with the same arguments. The groups'
        passes are the P/D actions of a circulation schedule (`pipetrain.schedule.circulation`), checked and run
        by the executor that runs training steps.

        Returns, on every rank, one 1-D int64 tensor per prompt with only the new tokens: up to and including
        the first `eos_token_id`, or `max_new_tokens` of them. temperature 0 is greedy; otherwise tokens are
        drawn after top-k and top-p, from one generator per sequence seeded by `seed` and its index (the same
        tokens at any rank count). `num_groups` (default 2 per rank, at least one per stage; 1 on one rank)
        groups circulate through the stages; each prefills its prompts `prefill_chunk` tokens per pass.
        With `return_logprobs=True` it returns (tokens, logprobs): each token's log-probability (float32) under
        the model's own distribution (log-softmax of the logits: temperature 1, nothing cut), as training
        computes it. Layers must implement `forward_cached` (kv_cache.py). The
        caches are freed on return; parameters (with shard="params": whole), gradients and train/eval modes are
        left as they were.
        `gather_timeline(of="generate")` then gives the call's measured timeline."""
        from .generate import generate

        with whole_tables(self._vocabulary, self._embedding):  # (vocab_parallel: the two tables whole meanwhile)
            done = generate(self, self._executor, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_token_id=eos_token_id, seed=seed, num_groups=num_groups,
                            prefill_chunk=prefill_chunk, return_logprobs=return_logprobs)
        self.last_generation, self.last_generation_groups = done.step, done.groups
        return done.tokens if done.logprobs is None else (done.tokens, done.logprobs)

    def gather_timeline(self, dst: int = 0, *, of: str = "step") -> Timeline | None:
        """The measured timeline of every rank, on rank `dst` (None elsewhere), of the last step (or
        evaluate), or with `of="generate"` of the last generate call. Collective.

        Times are seconds from the earliest rank's start. Ranks on one host share the clock; across
        hosts the rows are aligned only as well as the hosts' clocks are.
        """
        if of not in ("step", "generate"):
            raise ValueError(f'of must be "step" or "generate", got {of!r}')
        last = self.last_step if of == "step" else self.last_generation
        if last is None:
            raise RuntimeError("gather_timeline() needs a step first: call step() or evaluate()" if of == "step" else
                               'gather_timeline(of="generate") needs a generate() call first')
        return gather_timeline(last, self.transport, self.timeout, dst)

    # --- this rank's part of the model ---------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Ranks in this pipeline (one replica)."""
        return self.transport.world_size

    @property
    def job_size(self) -> int:
        """Ranks of the job: this pipeline's, times its data-parallel replicas, times its tensor-parallel ranks."""
        return self.world_size * self.dp_size * self.tp_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor (on any device) over this pipeline's ranks, then its data-parallel replicas; then
        the largest over the tensor-parallel group, whose ranks hold the same values (each gets the sum once) or
        raise flags of their own (a failure, a time limit: every rank sees them). In place; returns it."""
        moved = tensor.to(self.transport.device)
        self.transport.all_reduce(moved, self.timeout)
        sum_over(self.dp_group, moved, self.timeout)
        if self.tp_mesh is not None:
            wait_replicas(dist.all_reduce(moved, op=dist.ReduceOp.MAX, group=self.tp_mesh.get_group(), async_op=True),
                          self.timeout, "a tensor-parallel all-reduce")
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def train(self, mode: bool = True) -> Pipeline:
        self._training = mode
        for stage in self.stages.values():
            stage.module.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)

    # --- internals -----------------------------------------------------------------------------------
    def _place(self, layers: list[nn.Module], loss_fn, checkpoint, precision: str, seed: int) -> dict[int, Stage]:
        num_stages = self.schedule.num_stages
        checkpointed = set(range(num_stages)) if checkpoint is True else set(checkpoint or ())
        unknown = sorted(checkpointed - set(range(num_stages)))
        if unknown:
            raise ValueError(f"checkpoint lists stages {unknown}, but the stages are 0..{num_stages - 1}")
        mine = {i: layers[i] for s in self.schedule.stages_of(self.rank) for i in self.layer_ranges[s]}
        split = None  # experts: each layer's split as it is made (a rank never holds all its layers' experts)
        if self.ep_mesh is not None or self.expert_capacity is not None:
            split = expert_splitter(layers, self.ep_mesh, self.expert_capacity, self._lanes)
        made: set[int] = set()

        def split_made(i: int, layer: nn.Module) -> None:
            split(i, layer)
            made.add(i)

        self._ties.materialized(materialize(mine, self.device, seed, then=split_made if split else None))
        for layer in mine.values():
            layer.to(self.device)
        if self.tp_mesh is not None:
            tables = self._vocabulary.tables() + self._embedding.tables() if self._vocabulary else []
            parallelize(mine, layers, self.tp_mesh, self.timeout, tied=bool(self._ties),
                        sequence_parallel=self.sequence_parallel, vocabulary=frozenset(map(id, tables)))
        for i in sorted(set(mine) - made) if split is not None else ():  # (layers given real)
            split(i, mine[i])
        return {s: Stage(s, num_stages, [layers[i] for i in self.layer_ranges[s]],
                         first_layer=self.layer_ranges[s].start, loss_fn=loss_fn, checkpoint=s in checkpointed,
                         autocast=torch.bfloat16 if precision == "bf16" else None, device=self.device,
                         split_backward=splits_backward(self.schedule), timeout=self.timeout,
                         sequence_parallel=self.sequence_parallel)
                for s in self.schedule.stages_of(self.rank)}

    def _microbatches(self, inputs, targets, microbatches, *, grad: bool):
        return step_microbatches(inputs, targets, microbatches, num_microbatches=self.schedule.num_microbatches,
                                 rank=self.rank, stages=self.stages, last=self.schedule.num_stages - 1,
                                 targets_everywhere=self._vocabulary is not None,
                                 device=self.device, key=(grad, self._training))

    def _finish(self, result: RankStep) -> torch.Tensor:
        """Sum the ranks' partial losses over the pipeline and the replicas; record the step's loss."""
        totals = self.all_reduce(result.partials)
        m = self.schedule.num_microbatches
        loss = float(totals[LOSS_SUM] / totals[LOSS_COUNT].clamp_min(1))  # a token mean of no tokens: 0
        aux = float(totals[AUX_SUM]) / (m * self.dp_size)
        self.last_step = dataclasses.replace(result, loss=loss, aux_loss=aux, token_mean=bool(totals[PAIR_LOSSES] > 0),
                                             tokens=float(totals[LOSS_COUNT]))
        return totals

    def _record_reduce_waits(self, waited: list[tuple[int, float, float]]) -> None:
        """Add the step's waits on its stages' gradient reductions to its measured timeline (the time they
        stayed exposed), which then ends when the last one does."""
        last, t0 = self.last_step, self.last_step.t0
        waits = tuple(Event(self.rank, Action(key, Op.REDUCE, 0), start - t0, end - t0)
                      for key, start, end in waited if key != TIED)
        self.last_step = dataclasses.replace(last, waits=last.waits + waits,
                                             step_time=max([last.step_time, *(end - t0 for _, _, end in waited)]))

    def _shared_time_costs(self, layers: list[nn.Module], sample) -> list[float]:
        """Rank 0 measures (raise `timeout` for a large model); every rank partitions with its numbers so all
        agree on the split (the mean over replicas with data or tensor parallelism)."""
        return measured_on_pipeline_rank_0(lambda: time_costs(layers, sample), len(layers), transport=self.transport,
                                           replica_groups=self._replica_groups, timeout=self.timeout,
                                           what='timing the layers on `sample` for balance="time"')


def _group_size(group: dist.ProcessGroup | None) -> int:
    """The ranks of the pipeline's process group (None: the default group), with the launch fix if there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: launch with torchrun and call "
                           "torch.distributed.init_process_group() first (or pass an in-process transport)")
    return dist.get_world_size(group)

