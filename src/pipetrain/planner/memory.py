"""The memory of one pipeline rank as pipetrain's runtime holds it, by shard mode, precision and backend.

The runtime keeps fp32 parameters (bf16 is autocast: matmuls in bf16, weights and gradients fp32) and
AdamW's two fp32 moments (1/dp of them under any shard mode). A rank's memory peaks at one of these moments
of a step (bytes per parameter; "stage": of its largest stage):

    backward: weights + optimizer state + the activations of the microbatches in flight (their peak) + the
        gradients: a stage's first backward comes with the most microbatches in flight (1F1B: right after
        the warmup's forwards), and its gradients' buffer exists from then on
    reduction: weights + state + gradients (whole) + what the reduction of a stage adds as it starts: none
        and optimizer, nothing (the gradients accumulated in the buffer the reduction reads);
        gradients, the kept range (+4/dp stage); params, the range too, but the stage's weights are released
        first (-4 + 4/dp stage)
    optimizer step: weights, gradients (1/dp under gradients | params), state, and the all-gather of the
        updates that follows it (optimizer | gradients)
    gather (params): this replica's ranges, the state, and the weights gathered again at the step's start

gloo's reduce-scatter and all-gather work on a copy of the whole buffer (+4 stage; measured: 52 and 49 MiB
on a 49 MiB tensor, its all-reduce 2 MiB); NCCL's run in place. AdamW's foreach temporaries (~0.2 of its
state, measured) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .specs import ClusterSpec, ModelSpec

SHARD_MODES = ("none", "optimizer", "gradients", "params")
WEIGHT, GRAD, ADAM = 4.0, 4.0, 8.0  # bytes per parameter (fp32 weights and gradients, AdamW's m and v)


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at each moment of a step that can be its peak, and between steps."""

    moments: dict[str, float] = field(default_factory=dict)
    between_steps: float = 0.0

    @property
    def peak(self) -> float:
        return max(self.moments.values())


def rank_memory(params: float, largest_stage: float, activations: float, *, dp: int, shard: str,
                backend: str = "nccl") -> RankMemory:
    """The memory of a rank holding `params` parameters (of which its largest stage `largest_stage`) and
    `activations` bytes at their peak, under data parallelism over `dp` replicas with `shard`."""
    if shard not in SHARD_MODES:
        raise ValueError(f"shard={shard!r}: choose one of {', '.join(SHARD_MODES)}")
    mode = shard if dp > 1 else "plain"
    stage, copy = largest_stage, WEIGHT * largest_stage if backend == "gloo" else 0.0
    weights = params * WEIGHT
    own = weights / dp if mode == "params" else 0.0
    state = params * ADAM / (dp if mode not in ("none", "plain") else 1)
    grads = params * GRAD
    moment = {"plain": 0.0, "none": 0.0, "optimizer": 0.0, "gradients": GRAD * stage / dp + copy,
              "params": (WEIGHT / dp - WEIGHT) * stage + copy}[mode]
    grads_after = grads / dp if mode in ("gradients", "params") else grads
    weights_after = own if mode == "params" else weights
    gather_after = copy if mode in ("optimizer", "gradients") else 0.0
    moments = {"backward": weights + own + state + grads + activations,
               "reduction": weights + own + state + grads + moment,
               "optimizer step": weights_after + grads_after + state + gather_after}
    if mode == "params":
        moments["gather"] = own + state + weights + copy
    return RankMemory(moments, weights_after + grads_after + state)


def first_rank_memory(model: ModelSpec, cluster: ClusterSpec, *, tp: int, dp: int, stages_per_rank: int,
                      microbatch_size: int, recompute: bool, peak_in_flight: float, blocks_per_stage: int,
                      shard: str, sequence_parallel: bool = True, ep: int = 1,
                      vocab_shards: int = 0) -> RankMemory:
    """The fullest rank's memory (the first stage's: it holds the embedding) for a model's plan, holding
    `peak_in_flight` microbatches' activations at once: `rank_memory` of its parameters and activations.
    With expert parallel, each rank holds 1/ep of the routed experts (the rest 1/tp). Vocabulary parallel over
    `vocab_shards` ranks: each holds that share of the embedding and the head (one table if tied), and the
    fp32 logits of its rows for the two microbatches between an S and its T."""
    experts = model.layer_expert_params()
    block = (model.layer_params() - experts) / tp + experts / ep
    stage = blocks_per_stage * block + (model.table_params() / vocab_shards if vocab_shards
                                        else model.embedding_params() / tp)
    params = stage + (stages_per_rank - 1) * blocks_per_stage * block
    width = 2.0 if cluster.dtype == "fp32" else 1.0  # (the activation model counts bf16's bytes)
    tokens = microbatch_size * model.seq
    act = peak_in_flight * blocks_per_stage * model.layer_activation_bytes(tokens, tp, recompute, sequence_parallel)
    if recompute:
        act += model.layer_activation_bytes(tokens, tp, False, sequence_parallel)  # one block recomputed at a time
    logits = (2 * tokens * model.vocab * 4 / vocab_shards if vocab_shards  # (fp32: two microbatches' of its rows)
              else tokens * model.vocab * 4 / tp)  # fp32 logits of one microbatch on the last stage
    return rank_memory(params, stage, width * act + logits, dp=dp, shard=shard, backend=cluster.backend)


def best_shard(dp: int, fits, modes: tuple[str, ...] | None = None) -> str:
    """The shard mode a plan takes: none without replicas; else the first of optimizer, gradients, params (or of
    `modes`) whose memory `fits(shard)` (they cost the same communication; optimizer if none fits)."""
    if dp == 1:
        return "none"
    return next((s for s in modes or SHARD_MODES[1:] if fits(s)), "optimizer")
