"""Map a model onto a cluster: search (tp, pp, dp, stages per rank, microbatches, microbatch size,
schedule, recomputation) under device memory, predict step time, tokens/s, MFU and memory.

The schedules are the registry's (`pipetrain.schedule.names()`), each at every stages-per-rank and microbatch
count its generator takes (`registry.refusal`, asked without building), so a newly registered schedule is
planned too. Those built from costs (zb-auto) are planned when pinned (`schedule="zb-auto"`): screened as
built for unit costs, and each plan kept built for its own stage costs.

The cost model (all per device):
- compute: a block's forward FLOPs / (peak x achievable x tp); backward = 2 x forward, split evenly into
  I and W; recomputation adds one forward to the backward. The first stage also holds the embedding,
  the last the head and loss (counted as one block of head FLOPs);
- vocabulary parallelism (`vocab_parallel`): the head and the embedding split by vocabulary over every pp x tp
  rank instead: each rank's S (1/pp of the head's forward) and T (twice that) are placed into the schedule
  (`schedule.with_vocabulary`); their collectives go to and from the root one rank after another, as the
  runtime sends them (pp - 1 transfers of a hidden state each); it runs without sequence parallelism and
  expert parallel, and with shard none, optimizer or gradients (as the runtime does);
- tensor parallelism (within a fast domain only): per block two all-reduces of the block's activations
  in forward and two in backward (Megatron-LM with sequence parallelism: all-gather + reduce-scatter),
  ring cost 2 (t-1)/t x bytes / domain bandwidth, not overlapped;
- pipeline transfers: one activation (or its gradient) per stage boundary and microbatch, over the fast
  domain when the pipeline's ranks fit in one domain, else over the NIC: latency + bytes / bandwidth;
- pipeline: the schedule itself, simulated with those costs (the step is affine in the microbatch count
  once the pipeline is full, so long schedules are simulated short and extended exactly);
- data parallelism: a ring reduce-scatter + all-gather of the first stage's gradients (bf16) over the
  NIC after its last backward (the other stages' overlap with the tail), plus the optimizer step;
- memory: as the runtime holds it (`memory.rank_memory`): fp32 weights and gradients, AdamW's moments
  1/dp under a shard mode, the activations of the most microbatches a rank holds at once (from the
  simulation; bf16's bytes, twice with fp32), and the moment a stage's reduction adds. Each plan takes the
  first shard mode that fits (none without replicas; else optimizer, gradients, params: the same
  communication), or the pinned one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from ..schedule import Costs, names, simulate, with_vocabulary
from ..schedule.registry import options, refusal
from .memory import RankMemory, best_shard, first_rank_memory
from .simulation import _build, _placement, _screen, _simulate
from .specs import ClusterSpec, ModelSpec

MAX_STAGES_PER_RANK = 4


@dataclass(frozen=True)
class Plan:
    tp: int
    pp: int
    dp: int
    stages_per_rank: int
    microbatch_size: int  # sequences
    microbatches: int
    schedule: str
    recompute: bool
    step_time: float
    tokens_per_s: float
    mfu: float  # model FLOPs (3 x forward) per second over the peak of the devices used
    hfu: float  # hardware FLOPs: with recomputation's extra forward
    bubble_fraction: float
    memory_per_device: float  # bytes, the fullest device
    compute_time: float  # per device, of the step
    dp_time: float  # exposed data-parallel reduction + optimizer
    pipeline_time: float
    simulated: bool  # False: the screening estimate only
    shard: str = "none"  # over the dp replicas: none, optimizer (ZeRO-1), gradients (ZeRO-2), params (ZeRO-3)
    ep: int = 1  # expert parallel: ranks (of the dp replicas) splitting each MoE block's experts
    vocab_parallel: bool = False  # the embedding and head split by vocabulary over the pp x tp ranks

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    def as_dict(self) -> dict:
        return {**asdict(self), "devices": self.devices}


@dataclass(frozen=True)
class _Candidate:
    tp: int
    pp: int
    dp: int
    v: int
    b: int
    m: int
    schedule: str
    recompute: bool
    shard: str | None = None  # pinned; None: the first that fits
    ep: int = 1
    vocab: bool = False


RANKED = 10  # plans simulated however few are asked for (plus the margin): one ranking for every `top`


def plan(model: ModelSpec, cluster: ClusterSpec, *, devices: int | None = None, tp: int | None = None,
         pp: int | None = None, dp: int | None = None, schedule: str | None = None,
         microbatch_size: int | None = None, stages_per_rank: int | None = None, shard: str | None = None,
         ep: int | None = None, vocab_parallel: bool | None = None, top: int = 10, margin: int = 5) -> list[Plan]:
    """The `top` best plans, fastest first, every one simulated in full (exact schedule, per-stage costs).
    Pinned arguments restrict the search (`vocab_parallel` None: with and without). The best
    `max(top, RANKED) + margin` screened estimates are simulated and re-ranked (an estimate is within a few
    percent of its simulation), so any `top` up to `RANKED` lists the first plans of one ranking: `top=5` is the
    default list's first five."""
    devices = devices or cluster.devices
    if devices > cluster.devices:
        raise ValueError(f"{devices} devices asked, the cluster {cluster.name!r} has {cluster.devices}")
    if schedule is not None and schedule not in names():
        raise ValueError(f"schedule {schedule!r} is not one of the registered schedules {names()}")
    candidates = [dataclasses.replace(c, shard=shard)
                  for c in _candidates(model, cluster, devices, tp, pp, dp, schedule, microbatch_size, vocab_parallel)
                  if (stages_per_rank is None or c.v == stages_per_rank) and (ep is None or c.ep == ep)
                  and (vocab_parallel is None or c.vocab == vocab_parallel)]
    if not candidates:
        raise ValueError(_why_none(model, cluster, devices, tp, pp, dp, microbatch_size))
    screened = [p for p in (_evaluate(model, cluster, c, exact=False) for c in candidates) if p is not None]
    if not screened:
        raise ValueError(f"no plan fits in {cluster.memory / 1e9:.0f} GB per device: even with recomputation, "
                         f"{model.name} needs more devices, more pipeline or tensor parallelism")
    screened.sort(key=lambda p: (p.step_time, p.devices))
    exact = [_evaluate(model, cluster, _Candidate(p.tp, p.pp, p.dp, p.stages_per_rank, p.microbatch_size,
                                                  p.microbatches, p.schedule, p.recompute, shard, p.ep,
                                                  p.vocab_parallel), exact=True)
             for p in screened[:max(top, RANKED) + margin]]
    return sorted([p for p in exact if p is not None], key=lambda p: (p.step_time, p.devices))[:top]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _candidates(model, cluster, devices, tp, pp, dp, schedule, microbatch_size, vocab_parallel=None):
    tps = [t for t in ([tp] if tp else (1, 2, 4, 8, 16, 32, 64))
           if t == 1 or (t <= cluster.domain and model.heads % t == 0 and model.kv % t == 0)]
    # a layout may leave some devices idle: dp must divide the global batch, so e.g. 220,000 devices
    # cannot all be used; for each (tp, pp) the largest such dp that fits is tried
    batch_divisors = _divisors(model.global_batch)
    for t in tps:
        pps = [pp] if pp else sorted({p for p in range(1, model.layers + 1) if devices // t // p >= 1 and (
            p & (p - 1) == 0 or (devices // t) % p == 0)})
        for p in pps:
            room = devices // (t * p)
            if room < 1:
                continue
            if dp:
                if dp > room:
                    continue
                d = dp
            else:
                d = max(x for x in batch_divisors if x <= room)
            if model.global_batch % d:
                continue
            per_replica = model.global_batch // d
            sizes = [microbatch_size] if microbatch_size else [s for s in (1, 2, 4, 8, 16) if per_replica % s == 0]
            for b in sizes:
                if per_replica % b:
                    continue
                m = per_replica // b
                for name in ([schedule] if schedule else _searched()):
                    if p == 1 and name != names()[0] and schedule is None:
                        continue  # one rank: the schedules differ little; keep one unless one is pinned
                    for v in range(1, MAX_STAGES_PER_RANK + 1):  # every size the registry says it takes
                        if p * v > model.layers or refusal(name, num_ranks=p, num_microbatches=m, stages_per_rank=v):
                            continue
                        for recompute in (False, True):
                            for e in _expert_parallel(model, t, d):
                                for vocab in _vocabulary_options(model, p, v, e, vocab_parallel):
                                    yield _Candidate(t, p, d, v, b, m, name, recompute, None, e, vocab)


VOCAB_MIN_SHARE = 0.05  # of a stage's compute, the least head for which the search tries vocabulary parallelism


def _vocabulary_options(model: ModelSpec, pp: int, v: int, ep: int, pinned: bool | None) -> tuple[bool, ...]:
    """With and without vocabulary parallelism, where it can run (pp > 1, no expert parallel) and, unless pinned,
    where the head is at least `VOCAB_MIN_SHARE` of a stage's compute (below, it could take at most that much
    off the last stage)."""
    if pp == 1 or ep > 1 or pinned is False:
        return (False,)
    stage = model.layers / (pp * v) * model.layer_forward_flops(1)
    return (False, True) if pinned or model.head_forward_flops(1) >= VOCAB_MIN_SHARE * stage else (False,)


def _expert_parallel(model: ModelSpec, tp: int, dp: int) -> list[int]:
    """The ep sizes tried: 1, and for an MoE without tensor parallel (the runtime does not compose them yet) the
    powers of two that divide both dp (ep ranks are replicas) and the experts."""
    if not model.moe or tp > 1:
        return [1]
    return [e for e in (1, 2, 4, 8, 16, 32, 64, 128, 256) if dp % e == 0 and model.experts % e == 0]


def _searched() -> list[str]:
    """The registered schedules the search tries unpinned: all but those built from costs (zb-auto), whose
    own search takes seconds per size at hundreds of ranks; pin one (`schedule="zb-auto"`) to plan it."""
    return [name for name in names() if "costs" not in options(name)]


def _why_none(model, cluster, devices, tp, pp, dp, b) -> str:
    return (f"no (tp, pp, dp) layout of {devices} devices fits {model.name} with the pinned values "
            f"tp={tp} pp={pp} dp={dp} microbatch_size={b}: tp must divide the heads ({model.heads}) and be at most "
            f"the fast domain ({cluster.domain}); tp x pp x dp = devices; dp must divide the global batch "
            f"({model.global_batch} sequences); pp at most the layers ({model.layers})")


def _evaluate(model: ModelSpec, cluster: ClusterSpec, c: _Candidate, *, exact: bool) -> Plan | None:
    stages = c.pp * c.v
    costs = _stage_costs(model, cluster, c)
    f, i_cost, w_cost = costs.f, costs.b, costs.w
    if exact:
        pipeline_time, bubble, peak_in_flight = _simulate(c, costs)
    else:
        # the busiest rank sets the pace: its stages' mean costs
        placement = _placement(c.schedule, c.pp, c.v)
        stages_of = [[s for s in range(stages) if placement[s] == r] for r in range(c.pp)]
        busiest = max(range(c.pp), key=lambda r: sum(f[s] + i_cost[s] + w_cost[s] for s in stages_of[r]))
        mine = stages_of[busiest]
        means = [sum(x[s] for s in mine) / len(mine) for x in (f, i_cost, w_cost)]
        comm = costs.comm
        if c.vocab:  # (a proxy, the plans kept are exact: each rank's S and T per microbatch spread over its
            means[0] += costs.s / c.v  # stages, and the collectives that carry the hidden state out and its
            means[1] += costs.t / c.v  # gradient back as one more transfer each way)
            comm += costs.collective_time
        pipeline_time, bubble, peak_in_flight = _screen(c, *means, comm)
    limit = cluster.memory * (1 - cluster.memory_reserved)

    def memory_of(shard: str) -> float:
        return _rank_memory(model, cluster, c, peak_in_flight, math.ceil(model.layers / stages), shard).peak

    if c.ep > 1 and c.shard not in (None, "none") or c.vocab and c.shard == "params":
        return None  # (the runtime does not shard an optimizer over experts, nor gather split tables, yet)
    shard = "none" if c.dp == 1 or c.ep > 1 else c.shard or best_shard(
        c.dp, lambda s: memory_of(s) <= limit, modes=("optimizer", "gradients") if c.vocab else None)
    memory = memory_of(shard)
    if memory > limit:
        return None
    dp_time = _dp_time(model, cluster, c)
    step = pipeline_time + dp_time
    compute = c.m * c.v * (sum(f) + sum(i_cost) + sum(w_cost)) / stages
    tokens_per_s = model.global_batch * model.seq / step
    mfu = tokens_per_s * model.flops_per_token() / (c.tp * c.pp * c.dp * cluster.peak)
    hfu = mfu * (4 / 3 if c.recompute else 1.0)
    return Plan(c.tp, c.pp, c.dp, c.v, c.b, c.m, c.schedule, c.recompute, step, tokens_per_s, mfu, hfu, bubble,
                memory, compute, dp_time, pipeline_time, exact, shard, c.ep, c.vocab)


def _stage_costs(model: ModelSpec, cluster: ClusterSpec, c: _Candidate) -> Costs:
    """F, I, W of every stage and the transfer time between stages, for one microbatch."""
    tokens = c.b * model.seq
    rate = cluster.peak * cluster.achievable * c.tp
    stages = c.pp * c.v
    blocks = _blocks_per_stage(model.layers, stages)
    whole = model.layer_moe_forward_flops(tokens) if c.tp > 1 else 0.0  # (experts run whole on every tp rank)
    f_block = (model.layer_forward_flops(tokens) - whole) / rate + whole / (rate / c.tp) + _tp_time(
        model, cluster, c, tokens)
    # the last stage also holds the head (and loss), the first the embedding (no FLOPs to speak of); split by
    # vocabulary, every rank's S and T run 1/pp of the head (and 2/pp), each rank's E and G a lookup
    w = [n * f_block for n in blocks]
    head = model.head_forward_flops(tokens) / rate
    if not c.vocab:
        w[-1] += head
    # an MoE's all-to-alls: in F, and again in I (the gradients go back the same way), not in W
    a2a = [n * _a2a_time(model, cluster, c, tokens) for n in blocks]
    f = [x + y for x, y in zip(w, a2a, strict=True)]
    i_cost = [x * (2 if c.recompute else 1) for x in f]
    act_bytes = tokens * model.hidden * 2 / (1 if c.vocab else c.tp)  # bf16, sequence-parallel (vocab: whole)
    latency, bandwidth = _p2p_link(cluster, c)
    comm = latency + act_bytes / bandwidth
    if not c.vocab:
        return Costs(f=f, b=i_cost, w=w, comm=comm)
    # the hidden state, its gradient, the embedding and its gradient: the root sends to (or takes from) the other
    # pp - 1 ranks one after another, a hidden state each (fp32 gradients: twice bf16's bytes)
    collective = (c.pp - 1) * (latency + 2 * act_bytes / bandwidth)
    return Costs(f=f, b=i_cost, w=w, comm=comm, s=head / c.pp, t=2 * head / c.pp, e=0.0, g=0.0,
                 collective=collective)


def _blocks_per_stage(layers: int, stages: int) -> list[int]:
    """Blocks per stage, as even as can be: the first stages take the remainder, one block each."""
    base, extra = divmod(layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def _tp_time(model, cluster, c, tokens) -> float:
    """Forward TP communication of one block: two ring all-reduces of its activations (bf16)."""
    if c.tp == 1:
        return 0.0
    volume = tokens * model.hidden * 2
    return 2 * (2 * (c.tp - 1) / c.tp * volume / cluster.domain_bandwidth + 2 * (c.tp - 1) * cluster.domain_latency)


def _a2a_time(model, cluster, c, tokens) -> float:
    """Forward expert-parallel communication of one block (averaged over the blocks): the dispatch and the
    combine all-to-alls, each token's hidden state (bf16) to and from its top_k experts, the (ep - 1) / ep of
    them on other ranks; inside the fast domain if the ep group's devices are (the runtime's mesh is
    (dp / ep, ep, pp, tp): ep x pp x tp consecutive devices), else over the NIC. Not overlapped (as the runtime
    runs it today)."""
    if c.ep == 1 or not model.moe:
        return 0.0
    moe_share = (model.layers - model.dense_layers) / model.layers
    volume = tokens * model.top_k * model.hidden * 2 * (c.ep - 1) / c.ep
    fast = c.ep * c.pp * c.tp <= cluster.domain
    bandwidth, latency = (cluster.domain_bandwidth, cluster.domain_latency) if fast else (cluster.nic_bandwidth,
                                                                                         cluster.nic_latency)
    return moe_share * 2 * (volume / bandwidth + (c.ep - 1) * latency)


def _p2p_link(cluster, c) -> tuple[float, float]:
    """(latency, bandwidth) between neighbouring pipeline ranks: inside a fast domain if one pipeline's
    devices (tp x pp, placed first) fit in it, else over the NIC."""
    if c.tp * c.pp <= cluster.domain:
        return cluster.domain_latency, cluster.domain_bandwidth
    return cluster.nic_latency, cluster.nic_bandwidth


def _dp_time(model, cluster, c) -> float:
    if c.dp == 1:
        return 0.0
    # the first stage's gradients (bf16), reduce-scatter + all-gather of the updated weights, ring over NICs;
    # experts split over ep are reduced over the dp / ep replicas that hold the same ones
    blocks = model.layers / (c.pp * c.v)
    experts = blocks * model.layer_expert_params() if c.ep > 1 else 0.0
    first_stage = (blocks * model.layer_params() - experts + model.embedding_params()) / c.tp
    if c.vocab:  # (the rank's rows of both tables, reduced after the step, instead of the whole embedding)
        first_stage += (model.table_params() / c.pp - model.embedding_params()) / c.tp
    bandwidth = cluster.nic_bandwidth if c.tp * c.pp * c.dp > cluster.domain else cluster.domain_bandwidth

    def ring(volume: float, n: int) -> float:
        return 2 * (n - 1) / n * volume / bandwidth + 2 * (n - 1) * cluster.nic_latency if n > 1 else 0.0

    return ring(first_stage * 2, c.dp) + ring(experts / c.ep * 2, c.dp // c.ep)


def predicted_memory(model: ModelSpec, *, pp: int, dp: int, microbatch_size: int, microbatches: int, schedule: str,
                     shard: str, precision: str = "bf16", backend: str = "nccl", stages_per_rank: int = 1,
                     tp: int = 1, recompute: bool = False, sequence_parallel: bool = True, ep: int = 1) -> RankMemory:
    """The memory the plan model predicts for the fullest rank of a layout (the first stage's: it holds the
    embedding), by what holds it: to set beside a measured run (`sequence_parallel`: with tp, whether it ran
    with it; the plans assume it)."""
    c = _Candidate(tp, pp, dp, stages_per_rank, microbatch_size, microbatches, schedule, recompute, shard, ep)
    peaks = [s.peak_activations for s in simulate(_build(schedule, pp, microbatches, stages_per_rank, None)).per_rank]
    cluster = ClusterSpec("predicted", tp * pp * dp, {precision: 1.0}, 0.0, 1, 1.0, 1.0, dtype=precision,
                          backend=backend)
    return _rank_memory(model, cluster, c, peaks[0], math.ceil(model.layers / (pp * stages_per_rank)), shard,
                        sequence_parallel)


def _rank_memory(model, cluster, c, peak_in_flight: float, blocks_per_stage: int, shard: str,
                 sequence_parallel: bool = True) -> RankMemory:
    return first_rank_memory(model, cluster, tp=c.tp, dp=c.dp, stages_per_rank=c.v, microbatch_size=c.b,
                             recompute=c.recompute, peak_in_flight=peak_in_flight, blocks_per_stage=blocks_per_stage,
                             shard=shard, sequence_parallel=sequence_parallel and not c.vocab, ep=c.ep,
                             vocab_shards=c.pp * c.tp if c.vocab else 0)


def timeline_of(model: ModelSpec, cluster: ClusterSpec, p: Plan, max_microbatches: int | None = None):
    """The simulated timeline of a plan (with at most `max_microbatches`, default 2 x pp, to stay legible)."""
    m = min(p.microbatches, max_microbatches or max(2 * p.pp, 4))
    while m < p.microbatches and refusal(p.schedule, num_ranks=p.pp, num_microbatches=m,
                                         stages_per_rank=p.stages_per_rank):
        m = min(p.microbatches, m + p.pp)  # the fewest microbatches the schedule takes (e.g. 1f1b: pp)
    c = _Candidate(p.tp, p.pp, p.dp, p.stages_per_rank, p.microbatch_size, m, p.schedule, p.recompute, ep=p.ep,
                   vocab=p.vocab_parallel)
    costs = _stage_costs(model, cluster, c)
    built = _build(c.schedule, c.pp, m, c.v, costs)
    return simulate(with_vocabulary(built, costs) if c.vocab else built, costs).timeline


def plan_assumptions(cluster: ClusterSpec) -> list[str]:
    """The cost model's assumptions, in words, for `cluster` (printed with every plan)."""
    return [
        f"compute: {cluster.achievable:.0%} of {cluster.peak / 1e12:g} TFLOP/s ({cluster.dtype}) per device; "
        "backward = 2 x forward (I = W = F); recomputation adds one forward",
        "FLOPs per token: 6 x matmul parameters + 12 x layers x hidden x seq (attention, not halved for "
        "causality); MFU counts these, HFU adds recomputation",
        "activations per block and token: 34 x hidden / tp bytes (bf16, flash attention, sequence parallel); "
        "2 x hidden / tp with recomputation",
        "memory as the runtime holds it: fp32 weights and gradients (bf16 autocast), AdamW state 1/dp under a "
        "shard mode (each plan takes the first that fits: optimizer, gradients, params); "
        f"{cluster.memory_reserved:.0%} of memory kept free",
        "tensor parallel within a fast domain only, its all-reduces not overlapped; pipeline transfers inside "
        "the domain if a pipeline's devices fit in it, else over the NIC",
        "data parallel: the first stage's gradient reduce-scatter + all-gather is exposed, the rest overlaps",
        "mixture of experts: MFU counts the active weights (attention, router, shared and top-k experts); expert "
        "parallel (ep ranks of the dp replicas, tp 1, no optimizer sharding: as the runtime runs it) splits the "
        "routed experts, its dispatch and combine all-to-alls (forward and backward) are not overlapped (the "
        "runtime's overlap is not modelled); with tp > 1 the MoE MLP runs whole on every tp rank (its FLOPs and "
        "activations not split); an MoE block keeps its routed tokens' copies and its experts' intermediates",
        "vocabulary parallel (vocab 'split'): each rank's S and T (1/pp of the head, and 2/pp) placed into the "
        "schedule; each of their collectives takes pp - 1 transfers of a hidden state (point to point from and "
        "to the root, as the runtime sends them); 1/(pp x tp) of both tables per rank; no sequence parallelism",
    ]
