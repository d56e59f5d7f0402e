"""The trainer: any layers (or a Pipeline), a loss and a batch source -> optimizer steps with an LR schedule,
global clipping, accumulation, evaluation, checkpoints and metrics."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..pipeline.pipeline import Pipeline
from ..planner.calibrate import measure_peak_flops
from ..runtime.comm import Transport, fail_together
from ..runtime.tensor_parallel import local
from ..runtime.values import flatten
from ..schedule import build as build_schedule
from . import checkpoint as ckpt
from . import distributed_checkpoint as dist_ckpt
from . import report
from .config import ConfigError, NonFiniteError, TrainConfig, process_layout, resolve_pp, warmup_cosine
from .loader import BatchSource, share
from .metrics import JsonlWriter, peak_memory_bytes, plot_losses
from .report import ensure_log_handler, format_record, logger, perplexity, progress_bar, summary_lines, tqdm_logging

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class Trainer:
    """Trains a pipeline; create it on every rank (under torchrun) and call `fit()`.

    Args:
        model: the layers (a list of nn.Module, as `Pipeline` takes them; every rank builds the same ones)
            or a ready `Pipeline` (its schedule, balance and groups are then used as they are).
        loss_fn: as `Pipeline`'s: a mean, or `(loss_sum, count)` for an exact token mean (with layers only).
        data: a map-style dataset of `(inputs, targets)` samples, batched by `config.batch_size` in a seeded
            shuffle per epoch, or an iterable of global `(inputs, targets)` batches. Every rank draws the same
            global batches and each data-parallel replica takes its contiguous share (of a dataset, it reads only
            those samples, e.g. `pipetrain.data.PackedRows`); resumable (see loader).
        config: `TrainConfig` (schedule, microbatches, dp, ... build the Pipeline when `model` is layers).
        eval_data: held-out data of the same kinds: its first `config.eval_batches` batches are evaluated.
        optimizer: builds any torch optimizer from parameter groups (weight decay on matrices only); default
            AdamW(lr, betas). The LR schedule multiplies each group's initial learning rate.
        flops_per_token: training FLOPs per target element, to report MFU (None: no MFU).
        count_tokens: `targets -> count` for a `(loss_sum, count)` loss (e.g. `lambda y: (y != -100).sum()`):
            the trainer then counts each optimizer step's global batches up front and passes the total as
            `num_tokens`, which auxiliary losses next to a token mean need.
        model_info: a JSON-able description of the model, stored in checkpoints and checked on resume.
        sample: one microbatch of inputs for balance="time" (default: from the first held-out batch).
        transport, device, mesh: as `Pipeline`'s; with `config.dp > 1` and neither a mesh nor a
            Pipeline, the trainer lays the world out as a (dp, pp) DeviceMesh itself.
    """

    def __init__(self, model: Sequence[nn.Module] | Pipeline, *, data: Any, config: TrainConfig | None = None,
                 loss_fn: Callable[[Any, Any], Any] | None = None, eval_data: Any = None,
                 optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
                 flops_per_token: float | None = None, model_info: dict | None = None, sample: Any = None,
                 count_tokens: Callable[[Any], Any] | None = None,
                 transport: Transport | None = None, device: torch.device | str | None = None,
                 mesh: DeviceMesh | None = None) -> None:
        config = config or TrainConfig()
        if config.pp is not None and transport is None and mesh is None and dist.is_initialized():
            config = resolve_pp(config, dist.get_world_size())
        config.validate()
        ensure_log_handler()
        self.config = config
        self.train_data = BatchSource(data, batch_size=config.batch_size, seed=config.seed)
        self.eval_set = []
        if eval_data is not None:
            held_out = BatchSource(eval_data, batch_size=config.batch_size, seed=config.seed + 1, shuffle=False)
            self.eval_set = [held_out.next() for _ in range(config.eval_batches)]
        self.pipe = model if isinstance(model, Pipeline) else self._pipeline(list(model), loss_fn, sample, transport,
                                                                               device, mesh)
        if isinstance(model, Pipeline) and loss_fn is not None:
            raise ConfigError("the Pipeline given has its own loss_fn; pass loss_fn only with a list of layers")
        if (given := (self.pipe.dp_size, self.pipe.tp_size)) != (config.dp, config.tp):
            raise ConfigError(f"(dp, tp) = {(config.dp, config.tp)}, but the pipeline given has {given}")
        if self.pipe.shard != config.shard:
            raise ConfigError(f"shard={config.shard!r}, but the pipeline given shards {self.pipe.shard!r}")
        self.global_rank = self.pipe.rank if transport is not None or not torch.distributed.is_initialized() \
            else torch.distributed.get_rank()
        if config.checkpoint_dir and self.pipe.world_size > 1 and not torch.distributed.is_initialized():
            raise ConfigError("checkpoints are written by torch.distributed.checkpoint, which in-process ranks "
                              "(threads) cannot use: launch with torchrun, or leave checkpoint_dir out")
        self.model_info = model_info if model_info is not None else {"num_layers": self.num_layers}
        self.flops_per_token = flops_per_token
        self.count_tokens = count_tokens
        self.skipped_steps = 0
        self.pipe.unshard()  # (shard="params": a stepped pipeline holds released parameters; groups read shapes)
        params = list(self.pipe.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        make = optimizer or (lambda g: torch.optim.AdamW(g, lr=config.lr, betas=config.betas))
        self.optimizer = self.pipe.optimizer(make, groups) if groups else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup=config.warmup, total=config.steps, lr=config.lr,
                                                    min_lr=config.min_lr)) if self.optimizer else None
        self.step = 0
        self.history: list[dict] = []
        self.final_loss = math.nan  # the held-out loss at the end of `fit`
        self._fit_start = time.perf_counter()  # `fit` restarts it; train_step(stop_after=) measures from it
        self.peak_flops = None
        if flops_per_token is not None:  # every rank's measured matmul peak, summed over the job
            peak = torch.tensor([measure_peak_flops(self.pipe.device)], dtype=torch.float64)
            self.peak_flops = float(self.pipe.all_reduce(peak)[0]) * self.pipe.tp_size  # (tp ranks: the largest)
        if config.resume:
            self.load()

    @property
    def num_layers(self) -> int:
        return sum(self.pipe.balance)

    def _pipeline(self, layers, loss_fn, sample, transport, device, mesh) -> Pipeline:
        cfg = self.config
        if loss_fn is None:
            raise ConfigError("Trainer(layers, ...) needs loss_fn=")
        mesh, pp = process_layout(cfg, mesh, transport, device)
        schedule = build_schedule(cfg.schedule, num_ranks=pp, num_microbatches=cfg.microbatches,
                                  stages_per_rank=cfg.stages_per_rank)
        if cfg.balance == "time" and sample is None:
            if not self.eval_set:
                raise ConfigError('balance="time" needs sample= (one microbatch of inputs) or eval_data to take '
                                  "it from")
            sample = share(self.eval_set[0][0], cfg.dp * cfg.microbatches, 0)
        return Pipeline(layers, schedule=schedule, loss_fn=loss_fn, balance=cfg.balance, device=device,
                        transport=transport, timeout=cfg.timeout, sample=sample,
                        checkpoint=cfg.activation_checkpointing, precision=cfg.precision, mesh=mesh,
                        seed=cfg.seed, shard=cfg.shard, sequence_parallel=cfg.sequence_parallel,
                        expert_capacity=cfg.expert_capacity, overlap=cfg.overlap, vocab_parallel=cfg.vocab_parallel)

    # --- one optimizer step --------------------------------------------------------------------------
    def train_step(self, *, stop_after: float | None = None) -> dict:
        """One optimizer step over `accumulation` batches. With `stop_after` (seconds since `fit` began, on
        every rank's clock), the record's "stop" says whether any rank ran out of time."""
        cfg = self.config
        start = time.perf_counter()
        losses, tokens, aux, busy, pipeline_time, targets = [], [], 0.0, 0.0, 0.0, 0
        dp = self.pipe.dp_size
        # each replica reads only its rows of the global batches (a map-style dataset: only those samples)
        shares = [self.train_data.next_share(dp, self.pipe.dp_rank) for _ in range(cfg.accumulation)]
        num_tokens = self._count_tokens(shares) if self.count_tokens else None
        for k, (x, y) in enumerate(shares):  # the replicas reduce gradients once, after the last
            losses.append(self.pipe.step(x, y, scale=1.0 / cfg.accumulation, num_tokens=num_tokens,
                                         sync_gradients=k == cfg.accumulation - 1))
            step = self.pipe.last_step
            tokens.append(step.tokens)
            aux += step.aux_loss
            busy += step.busy_time
            pipeline_time += step.step_time
            targets += _targets((x, y)) * dp  # (the replicas' shares have the same shape)
        loss = self._combine(losses, tokens)
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer else cfg.lr
        world = self.pipe.world_size
        # one sum over every rank: gradient norm, non-finite flag, time's up, idle and memory per rank
        shared = torch.zeros(3 + 2 * world, dtype=torch.float64)
        shared[0] = self.pipe.gradient_sum_of_squares()
        shared[1] = 0.0 if math.isfinite(loss) else 1.0
        shared[2] = 1.0 if stop_after is not None and time.perf_counter() - self._fit_start > stop_after else 0.0
        shared[3 + self.pipe.rank] = 1.0 - busy / pipeline_time if pipeline_time > 0 else 0.0
        shared[3 + world + self.pipe.rank] = peak_memory_bytes(self.pipe.device)
        shared = self.pipe.all_reduce(shared).tolist()
        grad_norm = math.sqrt(shared[0])
        finite = shared[1] == 0 and math.isfinite(grad_norm)
        if not finite and cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"step {self.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; "
                                 f"stopping (on_nonfinite='stop'). The weights are still those of step {self.step}; "
                                 "resume from the latest checkpoint, e.g. with a lower lr")
        if finite:
            self._clip(grad_norm)
        if self.optimizer:
            if finite:
                self.optimizer.step()
            self.scheduler.step()  # the LR schedule follows the step count, skipped or not
            self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.skipped_steps += 1
            self._say(f"step {self.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite: update "
                      f"skipped ({self.skipped_steps} so far)")
        self.step += 1
        elapsed = time.perf_counter() - start
        record = {
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": targets / elapsed, "step_time": elapsed,
            "bubble_fraction": sum(shared[3:3 + world]) / dp / world,
            "bubble_per_rank": [b / dp for b in shared[3:3 + world]],
            "peak_memory_per_rank": [int(m / dp) for m in shared[3 + world:]],
            "skipped": not finite, "stop": shared[2] > 0,
        }
        if self.peak_flops:
            record["mfu"] = targets * self.flops_per_token / elapsed / self.peak_flops
        if aux:
            record["aux_loss"] = aux
        return record

    def _count_tokens(self, shares: list) -> float:
        """`count_tokens` over the step's global batches: each replica counts its shares, summed over the job
        (every rank of a pipeline holds its replica's shares, so the sum counts each pipeline_size times)."""
        count = torch.tensor([sum(float(self.count_tokens(y)) for _, y in shares)], dtype=torch.float64)
        if self.pipe.dp_size == 1:
            return float(count[0])
        return float(self.pipe.all_reduce(count)[0]) / self.pipe.world_size

    def clip_gradients(self) -> float:
        """The global L2 norm of all stages' gradients; scales them to `grad_clip` if above (collective). The
        coefficient is the one torch.nn.utils.clip_grad_norm_ computes for the whole model. (`train_step`
        does this itself; this is for loops of your own.)"""
        sumsq = torch.tensor([self.pipe.gradient_sum_of_squares()], dtype=torch.float64)
        norm = math.sqrt(float(self.pipe.all_reduce(sumsq)[0]))
        if math.isfinite(norm):
            self._clip(norm)
        return norm

    def _clip(self, norm: float) -> None:
        """Scale the gradients to `grad_clip` if the global norm is above it (torch's clip_grad_norm_ rule)."""
        if self.config.grad_clip > 0:
            coef = self.config.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                for grad in self.pipe.gradients():
                    grad.mul_(coef)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss over the held-out batches (forward-only schedule; each replica takes its share of every batch,
        as in training); a token mean weighs each batch by its count."""
        if not self.eval_set:
            return math.nan
        self.pipe.eval()
        try:
            losses, tokens = [], []
            for batch in self.eval_set:
                losses.append(self.pipe.evaluate(*share(batch, self.pipe.dp_size, self.pipe.dp_rank)))
                tokens.append(self.pipe.last_step.tokens)
        finally:
            self.pipe.train()
        return self._combine(losses, tokens)

    def _combine(self, losses: list[float], tokens: list[float]) -> float:
        """The loss of several pipeline steps: token means weighted by their counts, means averaged."""
        if self.pipe.last_step.token_mean:
            return sum(v * n for v, n in zip(losses, tokens, strict=True)) / max(sum(tokens), 1)
        return sum(losses) / len(losses)

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to `steps`, logging, evaluating and checkpointing as configured; returns the records."""
        cfg = self.config
        lead = self.global_rank == 0
        writer = JsonlWriter(cfg.metrics_jsonl) if cfg.metrics_jsonl and lead else None
        board = None
        if cfg.tensorboard and lead:
            from torch.utils.tensorboard import SummaryWriter

            board = SummaryWriter(cfg.tensorboard)
        bar = progress_bar(cfg, self.step) if lead else None
        self._fit_start = time.perf_counter()
        size = sum(local(p).numel() for p in self.pipe.parameters())  # (tensor parallel: this rank's part)
        self._say(f"training {self.model_info.get('name', 'a model')} ({size:,} parameters on global rank 0) on "
                  f"{report.layout(self.pipe)}: schedule {self.pipe.schedule.name}, "
                  f"{self.pipe.schedule.num_microbatches} microbatches")
        if self.step == 0 and self.eval_set:
            first = self.evaluate()
            self._say(f"held-out loss before training {first:.4f} (perplexity {perplexity(first)})")
        redirect = tqdm_logging() if bar is not None else nullcontext()
        try:
            with redirect:
                end = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.steps
                while self.step < end:
                    record = self.train_step(stop_after=cfg.max_seconds)
                    stop = record.pop("stop")
                    if self.eval_set and ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == end):
                        record["eval_loss"] = self.evaluate()
                    if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
                    self.history.append(record)
                    self._report(record, writer, board, bar, last=self.step == end)
                    if stop:
                        self._say(f"stopping at step {self.step}: --max-seconds {cfg.max_seconds:g} reached")
                        break
                last = self.history[-1] if self.history else {}
                final = last["eval_loss"] if "eval_loss" in last and last["step"] == self.step else self.evaluate()
                self.final_loss = final
                just_saved = cfg.checkpoint_every and self.history and self.step % cfg.checkpoint_every == 0
                if cfg.checkpoint_dir and not just_saved:
                    self.save()
        finally:
            for closable in (bar, writer, board):
                if closable is not None:
                    closable.close()
        if lead:
            elapsed = time.perf_counter() - self._fit_start
            for line in summary_lines(self.history, final if self.eval_set else None, elapsed, report.layout(self.pipe),
                                      self.skipped_steps):
                self._say(line)
            if cfg.plot and self.history:
                plot_losses(self.history, cfg.plot, title=f"{self.pipe.schedule.name}, {report.layout(self.pipe)}")
                self._say(f"loss curve: {cfg.plot}")
        return self.history

    def _report(self, record: dict, writer, board, bar, *, last: bool) -> None:
        if writer:
            writer.write(record)
        if board is not None:
            for key in ("loss", "eval_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "bubble_fraction",
                        "step_time"):
                if record.get(key) is not None:
                    board.add_scalar(key, record[key], self.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.step % self.config.log_every == 0 or last:
            self._say(format_record(record))

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective). Returns its path on global rank 0."""
        root = Path(self.config.checkpoint_dir)
        tmp = root / f".tmp-step_{self.step:08d}"
        if self.global_rank == 0:
            ckpt.discard(tmp)  # what an interrupted save of this step left behind
        self._barrier()
        trainer_state = {"step": self.step, "data": self.train_data.state_dict(),
                         "scheduler": self.scheduler.state_dict() if self.scheduler else None}
        dist_ckpt.save(tmp, self.pipe, self.optimizer, trainer_state, self.global_rank)  # (DCP: collective)
        self._barrier()  # every shard is on disk before rank 0 publishes
        path = None
        if self.global_rank == 0:
            manifest = {
                "format": dist_ckpt.FORMAT, "step": self.step, "world_size": self.pipe.job_size,
                "dp": self.pipe.dp_size, "pp": self.pipe.world_size, "tp": self.pipe.tp_size, "ep": self.pipe.ep_size,
                "num_layers": self.num_layers, "model": self.model_info,
                "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "extra"},
            }
            path = ckpt.publish(root, tmp, self.step, manifest)
            if self.config.keep_last:
                ckpt.prune(root, self.config.keep_last)
        self._barrier()  # nobody reads `latest` before it is published
        return path

    def load(self) -> bool:
        """Resume from `config.resume`: a checkpoint's path, or (True) the latest in checkpoint_dir; on any
        number of ranks. False if there is none yet. Every rank reads and checks its part before the first
        step, and all agree: if any rank finds the checkpoint damaged or of another model, every rank raises
        with that rank's one-line error (naming the file)."""
        error, path, manifest, req = None, None, None, None
        self.pipe.unshard()  # (shard="params": loading writes whole weights; each replica then takes its range)
        try:
            resume = self.config.resume
            path = ckpt.checkpoint_at(resume) if isinstance(resume, str) else ckpt.latest(self.config.checkpoint_dir)
            if path is not None:
                manifest = ckpt.read_manifest(path)
                if manifest["model"] != self.model_info:
                    raise ConfigError(f"{path} holds a model {manifest['model']}, but this run builds "
                                      f"{self.model_info}: resume with the same model settings")
                same_layout = tuple(manifest.get(k, 1) for k in ("world_size", "dp", "tp", "ep")) == (
                    self.pipe.job_size, self.pipe.dp_size, self.pipe.tp_size, self.pipe.ep_size)
                if manifest.get("format", 2) >= dist_ckpt.FORMAT:  # (read after every rank has checked its part)
                    req = dist_ckpt.request(path, self.pipe, self.global_rank, same_layout=same_layout)
                else:  # pipetrain's own format of earlier runs (one file per layer): read, not written
                    ckpt.load_format_2(path, self.pipe, self.optimizer, self.train_data)
        except (ckpt.CheckpointError, ConfigError, OSError) as err:
            error = err
            self.pipe.reshard()  # (shard="params": whatever was loaded part-way is dropped)
        fail_together(error, rank=self.global_rank, world_size=self.pipe.job_size,
                      sum_all=self.pipe.all_reduce, what="resuming from the checkpoint", tell=True)
        if path is None:
            self._say(f"no checkpoint in {self.config.checkpoint_dir}: starting from step 0")
            return False
        trainer_state = manifest  # (format 2: the manifest holds the step and the LR scheduler)
        if req is not None:  # (DCP: collective; a failure on any rank raises on every rank)
            trainer_state = dist_ckpt.load(req, self.pipe, self.optimizer, self.global_rank)
            self.train_data.load_state_dict(trainer_state["data"])
        if self.scheduler and trainer_state["scheduler"]:
            self.scheduler.load_state_dict(trainer_state["scheduler"])
            for group, lr in zip(self.optimizer.param_groups, trainer_state["scheduler"]["_last_lr"], strict=False):
                group["lr"] = lr
        restored = req.rng is not None if req is not None else same_layout and ckpt.load_rng(path, self.global_rank)
        if not restored:  # (another layout: a seed of its own for each rank, one for all of a tp group)
            position = self.pipe.dp_rank * self.pipe.world_size + self.pipe.rank
            torch.manual_seed(self.config.seed * 1_000_003 + trainer_state["step"] * 101 + position)
        self.step = trainer_state["step"]
        self._say(f"resumed from {path} at step {self.step}")
        return True

    # --- helpers -------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        self.pipe.all_reduce(torch.zeros(1, dtype=torch.float64))

    def _say(self, text: str) -> None:
        if self.global_rank == 0:
            logger.info(text)

def _targets(batch) -> int:
    """Elements of the targets (the first tensor of the batch's second half): tokens, for a language model."""
    leaves, _ = flatten(batch[1], what="targets")
    return leaves[0].numel() if leaves else 0
