"""The `pipetrain` command line: `train` (under torchrun), `simulate`, `compare` and `plan`."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time

from . import schedule as schedules
from .schedule import Costs, format_table, format_timeline, simulate


def _simulate(args: argparse.Namespace) -> int:
    try:
        sched = schedules.build(args.schedule, num_ranks=args.ranks, num_microbatches=args.microbatches,
                                stages_per_rank=args.stages_per_rank)
    except ValueError as err:
        _to_stderr(f"pipetrain simulate: {err}")
        return 2
    costs = Costs(f=args.cost_f, b=args.cost_b, w=args.cost_w, comm=args.cost_comm, reduce=args.cost_reduce,
                  gather=args.cost_gather, all_to_all=args.cost_a2a, s=args.cost_s, t=args.cost_t)
    if args.vocab_parallel:  # every rank's S and T passes, placed for these costs
        sched = schedules.with_vocabulary(sched, costs)
    if args.overlap:  # forwards paired with backwards where the simulation says the step gets faster
        sched = schedules.overlap(sched, costs)
    collectives = args.cost_reduce > 0 or args.cost_gather > 0
    if collectives:  # data parallel: each stage's collectives, placed as the runtime places them
        sched = schedules.with_collectives(sched, reduce=args.cost_reduce > 0, gather=args.cost_gather > 0)
    result = simulate(sched, costs)
    a2a = args.cost_a2a > 0
    title = f"{args.schedule}: {sched.num_ranks} ranks, {sched.num_microbatches} microbatches"
    if args.png:
        from .viz import save

        save(result.timeline, args.png, title=title)
    if args.trace:
        from .schedule import save_chrome_trace

        save_chrome_trace(result.timeline, args.trace, time_unit=1e-3)  # one cost unit drawn as 1 ms
    if args.json:
        print(json.dumps({
            "schedule": args.schedule, "ranks": args.ranks, "microbatches": args.microbatches,
            "stages_per_rank": sched.stages_per_rank, "step_time": result.step_time,
            "bubble_fraction": result.bubble_fraction,
            "per_rank": [{"rank": s.rank, "busy_time": s.busy_time, "bubble_fraction": s.bubble_fraction,
                          "peak_activations": s.peak_activations,
                          **({"exposed_collectives": s.exposed_collectives} if collectives else {}),
                          **({"exposed_all_to_all": s.exposed_all_to_all} if a2a else {})}
                         for s in result.per_rank],
        }))
        return 0
    print(format_table(sched))
    print()
    unit = min(c for c in (args.cost_f, args.cost_b, args.cost_w) if c > 0)
    print(format_timeline(result.timeline, unit=unit))
    print(f"\nstep time {result.step_time:g}, bubble fraction {result.bubble_fraction:.4f}")
    for s in result.per_rank:
        exposed = f", exposed collectives {s.exposed_collectives:g}" if collectives else ""
        exposed += f", exposed all-to-all {s.exposed_all_to_all:g}" if a2a else ""
        print(f"  rank {s.rank}: busy {s.busy_time:g}, bubble {s.bubble_fraction:.4f}, "
              f"peak activations {s.peak_activations}{exposed}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .schedule import load_timeline
    from .schedule.compare import compare

    try:
        timeline, sched = load_timeline(args.timeline)
    except (FileNotFoundError, ValueError) as err:
        _to_stderr(f"pipetrain compare: {err}")
        return 2
    if sched is None:
        _to_stderr(f"pipetrain compare: {args.timeline} holds no schedule; write it with save_timeline(..., schedule)")
        return 2
    result = compare(sched, timeline)
    print(f"{sched.name}: {sched.num_ranks} ranks, {sched.num_microbatches} microbatches")
    print(result.report())
    if args.png:
        from .viz import save_comparison

        save_comparison(result.predicted.timeline, result.measured, args.png, title=sched.name)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .planner import SpecError, cluster_from, model_from
    from .planner.command import train_command
    from .planner.plan import plan, plan_assumptions

    try:
        model = model_from(args.model)
        if args.global_batch:
            model = dataclasses.replace(model, global_batch=args.global_batch)
        cluster = cluster_from(args.cluster, model, args.microbatch_size)
        start = time.perf_counter()
        plans = plan(model, cluster, devices=args.gpus, tp=args.tp, pp=args.pp, dp=args.dp, schedule=args.schedule,
                     microbatch_size=args.microbatch_size, stages_per_rank=args.stages_per_rank, shard=args.shard,
                     ep=args.ep, vocab_parallel=args.vocab_parallel, top=args.top)
        seconds = time.perf_counter() - start
    except (SpecError, ValueError) as err:
        _to_stderr(f"pipetrain plan: {err}")
        return 2
    assumptions = plan_assumptions(cluster)
    if args.json:
        print(json.dumps({"model": dataclasses.asdict(model), "cluster": dataclasses.asdict(cluster),
                          "plans": [{**p.as_dict(), **dict(zip(("command", "notes"), train_command(p, model, cluster),
                                                               strict=True))} for p in plans],
                          "assumptions": assumptions,
                          "seconds": seconds}))
        return 0
    n = model.params()
    size = f"{n / 1e12:.2f}T" if n >= 1e12 else f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    active = model.active_params()
    size += f", {active / 1e9:.1f}B active" if model.moe else ""
    print(f"{model.name} ({size} parameters, global batch {model.global_batch} x {model.seq} "
          f"tokens) on {cluster.name}: {args.gpus or cluster.devices} devices, {cluster.notes}")
    print(f"{'#':>2} {'devices':>7} {'tp':>3} {'pp':>4} {'dp':>5} {'ep':>4} {'v':>2} {'mb':>3} {'M':>5} "
          f"{'schedule':17s} {'recomp':6s} {'shard':9s} {'vocab':5s} {'step':>9} {'tokens/s':>11} {'MFU':>6} "
          f"{'bubble':>7} {'memory':>9}")
    for i, p in enumerate(plans, 1):
        print(f"{i:>2} {p.devices:>7} {p.tp:>3} {p.pp:>4} {p.dp:>5} {p.ep:>4} {p.stages_per_rank:>2} "
              f"{p.microbatch_size:>3} "
              f"{p.microbatches:>5} {p.schedule:17s} {'yes' if p.recompute else 'no':6s} {p.shard:9s} "
              f"{'split' if p.vocab_parallel else 'whole':5s} {_seconds(p.step_time):>9} "
              f"{p.tokens_per_s:>11.4g} {p.mfu:>6.1%} {p.bubble_fraction:>7.1%} {p.memory_per_device / 2**30:>7.1f}Gi")
    print(f"\nplanned in {seconds:.1f}s; each plan listed was simulated in full")
    if plans:
        command, notes = train_command(plans[0], model, cluster)
        print(f"run the best plan:\n  {command}")
        for note in notes:
            print(f"  ({note})")
    for line in assumptions:
        print(f"  - {line}")
    if args.png and plans:
        from .planner.plan import timeline_of
        from .viz import save

        best = plans[0]
        save(timeline_of(model, cluster, best), args.png, unit="s",
             title=f"{model.name} on {cluster.name}: tp{best.tp} pp{best.pp} dp{best.dp} {best.schedule} "
                   f"(first microbatches)")
        print(f"timeline of the best plan: {args.png}")
    return 0


def _seconds(t: float) -> str:
    return f"{t * 1e3:.1f}ms" if t < 1 else f"{t:.2f}s"


# `pipetrain train` flags: name -> (type, help). Each sets the TrainConfig field of the same name.
_TRAIN_FLAGS = {
    "preset": (str, "model: tiny, small, gpt-8x256, gpt-16x512 (GPT); llama-tiny, llama-small, llama-8x256"),
    "hf": (str, "instead of a preset: a local Hugging Face model directory (config.json, weights if present)"),
    "save-pretrained": (str, "with --hf: write the trained model here at the end (HF safetensors)"),
    "text-field": (str, "with --data: the .jsonl field / .parquet column holding the text"),
    "eval-fraction": (float, "with --data: hold out this last fraction of the documents (default 0.05)"),
    "tokenizer": (str, "with --data and a preset: a folder with a tokenizer (the model's vocabulary becomes its "
                  "size)"),
    "data-cache": (str, "with --data: where tokenized data is cached (default $PIPETRAIN_CACHE or "
                   "~/.cache/pipetrain/tokens)"),
    "layers": (int, "transformer blocks (overrides the preset)"),
    "d-model": (int, "model width"),
    "heads": (int, "attention heads"),
    "seq-len": (int, "sequence length"),
    "schedule": (str, "pipeline schedule (pipetrain simulate --help lists them)"),
    "stages-per-rank": (int, "stages each rank holds (interleaved / V schedules)"),
    "microbatches": (int, "microbatches per pipeline step"),
    "batch-size": (int, "sequences per step over all replicas (each replica takes batch-size / dp)"),
    "dp": (int, "data-parallel replicas of the pipeline (pipeline ranks = world size / (dp x tp))"),
    "tp": (int, "tensor-parallel ranks splitting each layer (heads, MLP, vocabulary) of a stage"),
    "pp": (int, "pipeline ranks (then dp = world size / (pp x tp)); default world size / (dp x tp)"),
    "ep": (int, "expert-parallel ranks splitting each MoE layer's experts (they are dp replicas: ep divides dp)"),
    "expert-capacity": (float, "experts' capacity factor, e.g. 1.25 (tokens over it dropped); default dropless"),
    "shard": (str, "over the dp replicas: none, optimizer (ZeRO-1), gradients (ZeRO-2) or params (ZeRO-3)"),
    "accumulation": (int, "pipeline steps per optimizer step"),
    "balance": (str, "uniform, params or time"),
    "steps": (int, "optimizer steps"),
    "stop-at-step": (int, "end this run at this step (resume later to go on)"),
    "lr": (float, "peak learning rate"),
    "min-lr": (float, "final learning rate of the cosine decay"),
    "warmup": (int, "linear warm-up steps"),
    "weight-decay": (float, "AdamW weight decay for matrices"),
    "grad-clip": (float, "global gradient-norm clip (0: off)"),
    "on-nonfinite": (str, "a NaN/inf loss or gradient: skip the update or stop"),
    "precision": (str, "fp32 or bf16"),
    "eval-every": (int, "evaluate every K steps (0: start and end only)"),
    "eval-batches": (int, "held-out batches per evaluation"),
    "log-every": (int, "print a line every K steps"),
    "checkpoint-dir": (str, "where checkpoints go"),
    "checkpoint-every": (int, "checkpoint every K steps (0: at the end)"),
    "keep-last": (int, "keep only the newest K checkpoints (0: all)"),
    "metrics-jsonl": (str, "append one JSON object per step to this file"),
    "tensorboard": (str, "also log scalars to this TensorBoard directory (needs tensorboard)"),
    "plot": (str, "write the loss curve to this PNG at the end"),
    "sample-tokens": (int, "at the end, print a held-out prompt continued by this many generated tokens"),
    "seed": (int, "random seed (weights, data order)"),
    "timeout": (float, "seconds any transfer may wait"),
    "max-seconds": (float, "stop after this long (all ranks at the same step)"),
}


def _train(args: argparse.Namespace) -> int:
    import os

    from .train.config import ConfigError, TrainConfig, check_fits, resolve_pp

    values: dict = {}
    if args.config:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        with open(args.config, "rb") as f:
            values.update(tomllib.load(f))
    for flag in _TRAIN_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            values[flag.replace("-", "_")] = value
    for flag in ("activation_checkpointing", "tie_embeddings", "document_mask", "sequence_parallel", "overlap",
                 "vocab_parallel"):
        if getattr(args, flag):
            values[flag] = True
    for flag in ("data", "eval_data"):
        if getattr(args, flag):
            values[flag] = getattr(args, flag)
    if args.resume is not None:
        values["resume"] = args.resume
    if args.progress is not None:
        values["progress"] = args.progress
    config = TrainConfig.from_dict(values)
    if config.hf and not config.save_pretrained and config.checkpoint_dir:
        config.save_pretrained = os.path.join(config.checkpoint_dir, "hf")  # the trained model, as HF loads it
    try:  # before any process group work (one line per rank: torchrun stops the others at the first exit)
        if "WORLD_SIZE" in os.environ:
            config = resolve_pp(config, int(os.environ["WORLD_SIZE"]))
        config.validate()
        if "WORLD_SIZE" in os.environ:
            check_fits(config, int(os.environ["WORLD_SIZE"]))
    except ConfigError as err:
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        _to_stderr(f"pipetrain train{rank}: bad configuration: {err}")
        return 2
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _to_stderr("pipetrain train: launch it under torchrun, e.g. torchrun --standalone --nproc-per-node 2 "
              "-m pipetrain train --preset tiny")
        return 2
    import torch
    import torch.distributed as dist

    from .runtime.comm import CommError
    from .train.config import NonFiniteError
    from .train.data import load_corpus
    from .train.runs import trainer_from_config

    if args.log_file and int(os.environ["RANK"]) == 0:
        sys.stdout = _Tee(sys.stdout, open(args.log_file, "a"))  # noqa: SIM115 - lives for the process
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = None
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _init_process_group(backend)
    try:
        corpus = None if config.data else load_corpus()  # (read once: the batches, then the sample's prompt)
        trainer = trainer_from_config(config, corpus=corpus, device=device)
        trainer.fit()
        if config.sample_tokens:
            from .train.runs import held_out_sample

            prompt, continuation = held_out_sample(trainer.pipe, config, corpus=corpus)
            if dist.get_rank() == 0:
                print(f"\nsample: a held-out prompt, continued by the pipeline ({config.sample_tokens} tokens, "
                      f"temperature 0.8, top-k 40):\n  prompt:    {prompt!r}\n  generated: {continuation!r}")
        if config.save_pretrained:
            from .models.hf import save_pretrained

            save_pretrained(trainer.pipe, config.save_pretrained, source=config.hf)
            if dist.get_rank() == 0:
                print(f"saved the trained model to {config.save_pretrained} (AutoModelForCausalLM.from_pretrained "
                      "loads it)")
    except (ValueError, TypeError, OSError, NonFiniteError, CommError) as err:
        # what the user can fix (bad data, settings, files; a peer's failure, which names the first one):
        # one line per rank; PIPETRAIN_TRACEBACK=1 shows the traceback instead
        if os.environ.get("PIPETRAIN_TRACEBACK") == "1":
            raise
        _to_stderr(f"pipetrain train (rank {dist.get_rank()}): {type(err).__name__}: {err}")
        return 1 if isinstance(err, CommError) else 2
    finally:
        # the trainer's objects (kept alive by reference cycles) go before the process group: gloo can
        # abort the process at exit when its objects outlive destroy_process_group()
        gc.collect()
        dist.destroy_process_group()
    return 0


def _init_process_group(backend: str) -> None:
    """init_process_group, safe across torchrun's elastic restarts.

    torchrun (>= 2.5) shares its rendezvous TCPStore with the workers and keeps it across restarts, so a
    restarted worker can read a dead worker's address left by the previous attempt (gloo: "connection
    refused", NCCL: a stale unique id; pytorch/pytorch#135712). On one node every worker restarts
    together, so each attempt gets its own key prefix. Across nodes the restart counts can differ:
    there, torchrun must be told not to share the store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    import os

    import torch.distributed as dist

    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts_allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    if shared_store and restarts_allowed and os.environ.get("GROUP_WORLD_SIZE") == "1":
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"pipetrain/attempt_{attempt}", store), rank=rank,
                                world_size=world)
        return
    if shared_store and restarts_allowed and os.environ.get("RANK") == "0":
        _to_stderr("pipetrain train: warning: with --max-restarts on several nodes, set "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node, or a restarted rank may read "
              "a dead rank's address (pytorch#135712)")
    dist.init_process_group(backend)


class _Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return self.streams[0].isatty()


def _to_stderr(line: str) -> None:
    """One line on stderr in one write: ranks sharing a pipe (torchrun, PYTHONUNBUFFERED=1) never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a preset GPT/Llama or a Hugging Face model (launch under torchrun)",
                           description="Train a preset GPT or Llama, or a local Hugging Face model (--hf DIR), "
                           "on the Python stdlib's source (bytes) or local text (--data) with a pipeline. "
                           "Settings come from --config FILE.toml (keys named like the flags, with _ or -) "
                           "and the flags below, which win.")
    train.add_argument("--config", metavar="FILE.toml", help="a TOML file of settings")
    from .train.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for flag, (kind, text) in _TRAIN_FLAGS.items():  # (default None: a config file's value is not overridden)
        default = defaults.get(flag.replace("-", "_"))
        train.add_argument(f"--{flag}", type=kind, default=None,
                           help=text if default is None else f"{text} (default: {default})")
    train.add_argument("--data", nargs="+", metavar="PATH", help="train on local text instead of the byte corpus: "
                       ".txt, .jsonl, .parquet files or folders, tokenized by the --hf folder's tokenizer (cached)")
    train.add_argument("--eval-data", nargs="+", metavar="PATH", help="with --data: held-out files (instead of "
                       "--eval-fraction)")
    train.add_argument("--document-mask", action="store_true", help="with --data: positions and attention restart "
                       "at each document of a packed row")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue from the latest checkpoint in --checkpoint-dir, or from the checkpoint PATH")
    train.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    train.add_argument("--tie-embeddings", action="store_true", help="the output head reuses the token embedding")
    train.add_argument("--sequence-parallel", action="store_true",
                       help="with --tp: activations between the split layers and stages split by sequence")
    train.add_argument("--overlap", action="store_true",
                       help="with --ep: run forwards and backwards in pairs that hide each other's all-to-alls")
    train.add_argument("--vocab-parallel", action="store_true",
                       help="split the output head and its cross-entropy by vocabulary over the pipeline ranks")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on rank 0 (default: when stdout is a terminal)")
    train.add_argument("--log-file", help="also write rank 0's output to this file")
    train.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl with CUDA, else gloo")
    train.set_defaults(func=_train)
    sim = sub.add_parser("simulate", help="simulate a schedule: step time, bubble, peak activations")
    sim.add_argument("--schedule", required=True, choices=schedules.names())
    sim.add_argument("--ranks", type=_positive_int, required=True)
    sim.add_argument("--microbatches", type=_positive_int, required=True)
    sim.add_argument("--stages-per-rank", type=_positive_int, default=None,
                     help="stages each rank holds (default: the schedule's own, 1 or 2)")
    sim.add_argument("--cost-f", type=_non_negative, default=1.0, help="forward time per stage and microbatch")
    sim.add_argument("--cost-b", type=_non_negative, default=1.0, help="input-gradient (I) time")
    sim.add_argument("--cost-w", type=_non_negative, default=1.0, help="weight-gradient (W) time; B = b + w")
    sim.add_argument("--cost-comm", type=_non_negative, default=0.0, help="one stage-to-stage transfer")
    sim.add_argument("--cost-reduce", type=_non_negative, default=0.0,
                     help="data parallel: one stage's gradient reduction (adds a REDUCE per stage after its last B/W)")
    sim.add_argument("--cost-gather", type=_non_negative, default=0.0,
                     help="shard=params: one stage's parameter all-gather (adds a GATHER per stage at the start)")
    sim.add_argument("--cost-a2a", type=_non_negative, default=0.0,
                     help="expert parallel: the all-to-alls inside one F, and again inside one B or I")
    sim.add_argument("--vocab-parallel", action="store_true",
                     help="vocabulary parallelism: every rank's S and T passes of the split output layer placed in")
    sim.add_argument("--cost-s", type=_non_negative, default=1.0,
                     help="vocabulary parallel: one rank's S (its shard's logits) per microbatch")
    sim.add_argument("--cost-t", type=_non_negative, default=2.0,
                     help="vocabulary parallel: one rank's T (its shard's backward) per microbatch")
    sim.add_argument("--overlap", action="store_true",
                     help="pair forwards with backwards where that is faster (the pairs hide each other's all-to-alls)")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument("--png", metavar="FILE", help="draw the timeline (.png or .svg; needs matplotlib)")
    sim.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (one cost unit = 1 ms)")
    sim.set_defaults(func=_simulate)
    pl = sub.add_parser("plan", help="map a model onto a cluster: ranked pipeline plans",
                        description="Search tensor, pipeline and data parallel degrees, stages per rank, "
                        "microbatches and schedule for a model on a cluster; predict step time, tokens/s, MFU, "
                        "bubble and memory per device. Pinned values restrict the search.")
    pl.add_argument("--model", required=True, help="llama3-8b, llama3-70b, llama3-405b, dense-1t, dense-10t, "
                    "deepseek-v3, grok-moe, qwen3-235b-a22b, gpt-8x256, gpt-16x512, or a TOML file")
    pl.add_argument("--cluster", required=True, help="h100-16k, a100-3k, h800-2k, gb300-220k, local (this machine, "
                    "measured), or a TOML file")
    pl.add_argument("--gpus", type=_positive_int, help="devices to use (default: the whole cluster)")
    pl.add_argument("--tp", type=_positive_int, help="tensor-parallel degree")
    pl.add_argument("--pp", type=_positive_int, help="pipeline-parallel degree")
    pl.add_argument("--dp", type=_positive_int, help="data-parallel degree")
    pl.add_argument("--ep", type=_positive_int, help="expert-parallel degree (MoE models; ep ranks are dp replicas)")
    pl.add_argument("--schedule", choices=["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"])
    pl.add_argument("--microbatch-size", type=_positive_int, help="sequences per microbatch")
    pl.add_argument("--global-batch", type=_positive_int, help="sequences per optimizer step (default: the model's)")
    pl.add_argument("--stages-per-rank", type=_positive_int, help="stages per rank (interleaved: 2, 3 or 4)")
    pl.add_argument("--shard", choices=["none", "optimizer", "gradients", "params"],
                    help="over the dp replicas (default: each plan's first that fits: optimizer, gradients, params)")
    pl.add_argument("--vocab-parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="plan only with (or, --no-vocab-parallel, without) the embedding and head split by "
                         "vocabulary over the pp x tp ranks (default: both searched)")
    pl.add_argument("--top", type=_positive_int, default=10, help="plans to list")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.add_argument("--png", metavar="FILE", help="draw the best plan's simulated timeline (needs matplotlib)")
    pl.set_defaults(func=_plan)
    cmp = sub.add_parser("compare", help="simulated vs measured step for a measured timeline (JSON)")
    cmp.add_argument("timeline", help="a timeline JSON written by the example's --trace-dir or save_timeline")
    cmp.add_argument("--png", metavar="FILE", help="draw simulated above measured (.png or .svg)")
    cmp.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
