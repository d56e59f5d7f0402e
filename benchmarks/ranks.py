"""What each benchmark process runs: pipetrain and torch.distributed.pipelining side by side, A/B/A/B."""

from __future__ import annotations

import resource
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import pipetrain as pt
from pipetrain import models
from pipetrain.models.gpt import GPTConfig, gpt_loss
from pipetrain.models.llama import LlamaConfig
from pipetrain.pipeline.profile import phase_costs
from pipetrain.runtime.host_memory import keep_freed_memory
from pipetrain.schedule.choose import rank_schedules
from pipetrain.schedule.placement import looped, vshape

# pipetrain schedule -> torch.distributed.pipelining class name and placement ("loop" or "v")
TORCH_SCHEDULES = {
    "gpipe": ("ScheduleGPipe", "loop"),
    "1f1b": ("Schedule1F1B", "loop"),
    "interleaved-1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "looped-bfs": ("ScheduleLoopedBFS", "loop"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}


def model_config(fields: dict) -> models.ModelConfig:
    """A workload's model: the reference GPT, or the reference Llama when `family` is "llama"."""
    fields = dict(fields)
    return LlamaConfig(**fields) if fields.pop("family", "gpt") == "llama" else GPTConfig(**fields)


def fixed_batch(cfg: models.ModelConfig, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random token batch (inputs, targets) on every rank and in every process."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=gen)
    return x, torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=gen)


def layer_costs(cfg: models.ModelConfig, x: torch.Tensor, y: torch.Tensor, m: int) -> list[tuple[float, float, float]]:
    """Each layer's measured (F, I, W) seconds on one microbatch, the head's with the loss, 1 thread
    (measured once, in the parent)."""
    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(0)
    rows = x.shape[0] // m
    return phase_costs(models.build(cfg), x[:rows], loss_fn=gpt_loss, target=y[:rows])


def planned(costs: list[tuple[float, float, float]], name: str, world: int, m: int, per_rank: int | None = None):
    """pipetrain's plan for one schedule, which both libraries run: of the split of the measured F + I + W
    that evens out the ranks and the one that evens out the stages, the one whose simulated step is shorter
    (`rank_schedules`); zb-auto is built for it at 1F1B's memory. Returns the `Candidate`."""
    if per_rank is None:
        per_rank = 2 if name == "zb-auto" and world * 2 <= len(costs) else pt.schedules.build(
            name, num_ranks=world, num_microbatches=m).stages_per_rank
    ranked = rank_schedules(num_ranks=world, num_microbatches=m, layer_costs=costs, schedules=[name],
                            memory_limit=world if name == "zb-auto" else None, max_stages_per_rank=per_rank)
    return next(c for c in ranked if c.stages_per_rank == per_rank)


def pipetrain_runner(cfg: models.ModelConfig, name: str, world: int, m: int, x, y, costs):
    torch.manual_seed(0)
    layers = models.build(cfg)
    plan = planned(costs, name, world, m)
    pipe = pt.Pipeline(layers, schedule=plan.schedule, loss_fn=gpt_loss, balance=list(plan.balance))

    def step() -> None:
        pipe.step(x, y)
        for p in pipe.parameters():
            p.grad = None

    return step, pipe


def torch_runner(cfg: models.ModelConfig, name: str, world: int, rank: int, m: int, x, y, costs):
    from torch.distributed import pipelining

    cls_name, placement = TORCH_SCHEDULES[name]
    torch.manual_seed(0)
    layers = models.build(cfg)
    per_rank = 1 if name in ("gpipe", "1f1b") else 2
    num_stages = world * per_rank
    placement = vshape(world) if placement == "v" else looped(world, per_rank)
    plan = planned(costs, name, world, m, per_rank)
    assert plan.schedule.stage_to_rank == placement, (name, plan.schedule.stage_to_rank, placement)
    balance = plan.balance
    bounds = [0]
    for n in balance:
        bounds.append(bounds[-1] + n)
    mine = [s for s, r in enumerate(placement) if r == rank]
    stages = [pipelining.PipelineStage(nn.Sequential(*layers[bounds[s]:bounds[s + 1]]), s, num_stages,
                                       torch.device("cpu")) for s in mine]
    schedule = getattr(pipelining, cls_name)(stages[0] if per_rank == 1 else stages, m, loss_fn=gpt_loss)
    first, last = 0 in mine, num_stages - 1 in mine

    def step() -> None:
        kwargs = {"target": y, "losses": []} if last else {}
        if first:
            schedule.step(x, **kwargs)
        else:
            schedule.step(**kwargs)
        for stage in stages:
            stage.submod.zero_grad(set_to_none=True)

    return step


def bench_rank(rank: int, world: int, spec: dict) -> dict:
    """Every schedule of `spec` at `spec["microbatches"]`: pipetrain, torch and the single-process baselines
    (on rank 0 while the others wait: 1 thread, and P threads, what a user of the P cores would run instead)
    rotating block by block (A B C D, D C B A, ...). Times are max over ranks.

    Then, for each extra microbatch count in `spec["sweep"]`, one block of each (the efficiency curve).
    Every contender runs with malloc keeping freed memory, as a pipetrain stage on the CPU sets it."""
    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = model_config(spec["model"])
    x, y = fixed_batch(cfg, spec["batch_size"])
    single = single_process_step(cfg, x, y) if rank == 0 else None
    out = {"sweep": {}}
    for name in spec["schedules"]:
        out[name] = _measure_schedule(rank, world, spec, cfg, name, spec["microbatches"], x, y, single,
                                      spec["rounds"], timeline=spec.get("timelines", False))
    for m in spec.get("sweep", ()):
        if single:
            single(m)  # warm-up at this microbatch size
        short = {**spec, "warmup": 1, "steps": 1}  # one block of one step per library
        out["sweep"][m] = {name: _measure_schedule(rank, world, short, cfg, name, m, x, y, single, 1)
                           for name in spec["schedules"]}
    return out


def _measure_schedule(rank: int, world: int, spec: dict, cfg: models.ModelConfig, name: str, m: int, x, y, single,
                      rounds: int, timeline: bool = False) -> dict:
    pt_step, pipe = pipetrain_runner(cfg, name, world, m, x, y, spec["layer_costs"])
    runners = {"pipetrain": pt_step}
    if name in TORCH_SCHEDULES and spec.get("torch", True):
        runners["torch"] = torch_runner(cfg, name, world, rank, m, x, y, spec["layer_costs"])
    for step in runners.values():  # warm-up (shape inference, allocator)
        for _ in range(spec["warmup"]):
            step()
    runners["single"] = (lambda: single(m)) if single else (lambda: None)
    runners["single_p_threads"] = (lambda: _with_threads(world, single, m)) if single else (lambda: None)
    steps = {"pipetrain": spec["steps"], "torch": spec["steps"], "single": 1, "single_p_threads": 1}
    times = {lib: [] for lib in runners}
    bubbles = []
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))  # A B C, C B A, ...
        for lib in order:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps[lib]):
                runners[lib]()
                if lib == "pipetrain":
                    bubbles.append(pipe.last_step.bubble_fraction)
            dist.barrier()
            times[lib].append((time.perf_counter() - start) / steps[lib])
    measured = None
    if timeline:
        pipe.step(x, y)
        measured = pipe.gather_timeline()
        for p in pipe.parameters():
            p.grad = None
    return {"times": times, "bubble": statistics.fmean(bubbles),
            "timeline": pt.schedules.io.timeline_to_json(measured, pipe.schedule) if measured else None}


def _with_threads(threads: int, single, m: int) -> None:
    """One single-process step using `threads` threads (the cores the pipeline's ranks use together)."""
    torch.set_num_threads(threads)
    try:
        single(m)
    finally:
        torch.set_num_threads(1)


def peak_memory_rank(rank: int, world: int, spec: dict, lib: str, name: str) -> int:
    """Peak resident memory (bytes) of a fresh process that builds one library's pipeline and runs 2 steps
    (malloc keeping freed memory, for either library)."""
    torch.set_num_threads(1)
    keep_freed_memory()
    cfg = model_config(spec["model"])
    x, y = fixed_batch(cfg, spec["batch_size"])
    if lib == "pipetrain":
        step, _ = pipetrain_runner(cfg, name, world, spec["microbatches"], x, y, spec["layer_costs"])
    else:
        step = torch_runner(cfg, name, world, rank, spec["microbatches"], x, y, spec["layer_costs"])
    for _ in range(2):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def single_process_step(cfg: models.ModelConfig, x: torch.Tensor, y: torch.Tensor):
    """The fair baseline: the whole model in this process (1 thread), `m` microbatches accumulated.
    Returns step(m), which runs one training step (forward, backward, gradients cleared)."""
    torch.manual_seed(0)
    model = nn.Sequential(*models.build(cfg))

    def step(m: int) -> None:
        for xm, ym in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
            (gpt_loss(model(xm), ym) / m).backward()
        model.zero_grad(set_to_none=True)

    step(1)  # warm-up
    return step
