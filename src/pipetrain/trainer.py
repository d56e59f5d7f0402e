"""The small trainer: optimizer, LR schedule, global clipping, accumulation, eval, checkpoints, metrics."""

from __future__ import annotations

import base64
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .comm import all_reduce_sum
from .config import ConfigError, NonFiniteError, TrainConfig, warmup_cosine
from .data import Batches, Corpus, load_corpus
from .data_parallel import sum_over
from .metrics import JsonlWriter, measure_peak_flops, peak_memory_bytes, plot_losses
from .models.gpt import build_gpt, flops_per_token, gpt_loss
from .pipeline import Pipeline
from .schedule import build as build_schedule


class Trainer:
    """Trains the reference GPT with a pipeline; create it on every rank (under torchrun) and call `fit`."""

    def __init__(self, config: TrainConfig, *, group=None, transport=None, device=None, mesh=None,
                 corpus: Corpus | None = None,
                 optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None) -> None:
        """`optimizer` builds any torch optimizer from parameter groups (weight decay set per group);
        default AdamW(lr, betas). The LR schedule multiplies each group's initial learning rate.

        With `config.dp > 1` the trainer lays the world out as a (dp, pp) DeviceMesh itself, or uses
        `mesh` (dimensions named "dp" and "pp"); `group`/`transport` are for one pipeline (dp = 1)."""
        config.validate()
        mesh = _mesh_for(config, mesh, group, transport, device)
        self.config = config
        self.model_config = config.model_config()
        torch.manual_seed(config.seed)  # every rank builds the same weights, then keeps its own stages
        layers = build_gpt(self.model_config)
        corpus = corpus or load_corpus()
        self.train_data = Batches(corpus.train, batch_size=config.batch_size, seq_len=self.model_config.seq_len,
                                  seed=config.seed)
        held_out = Batches(corpus.val, batch_size=config.batch_size, seq_len=self.model_config.seq_len,
                           seed=config.seed + 1)
        self.eval_set = [held_out.next() for _ in range(config.eval_batches)]
        pp = mesh["pp"].size() if mesh is not None else _world_size(group, transport)
        schedule = build_schedule(config.schedule, num_ranks=pp,
                                  num_microbatches=config.microbatches, stages_per_rank=config.stages_per_rank)
        sample = self.eval_set[0][0][: config.batch_size // config.dp // config.microbatches]
        self.pipe = Pipeline(layers, schedule=schedule, loss_fn=gpt_loss, balance=config.balance, group=group,
                             device=device, transport=transport, timeout=config.timeout, sample=sample,
                             checkpoint=config.activation_checkpointing, precision=config.precision, mesh=mesh)
        # rank/world: this pipeline's; dp_rank/dp: the replica's; global_rank: in the whole job
        self.rank, self.world = self.pipe.rank, self.pipe.transport.world_size
        self.dp, self.dp_rank = self.pipe.dp_size, self.pipe.dp_rank
        self.global_rank = self.rank if transport is not None else torch.distributed.get_rank()
        self.skipped_steps = 0
        self.local_layers = {i: layers[i] for s in self.pipe.stages for i in self.pipe.layer_ranges[s]}
        params = list(self.pipe.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        make = optimizer or (lambda g: torch.optim.AdamW(g, lr=config.lr, betas=config.betas))
        self.optimizer = make(groups) if groups else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup=config.warmup, total=config.steps, lr=config.lr,
                                                    min_lr=config.min_lr)) if self.optimizer else None
        self.step = 0
        self.history: list[dict] = []
        peak = torch.tensor([measure_peak_flops(self.pipe.device)], dtype=torch.float64,
                            device=self.pipe.transport.device)
        self.peak_flops = float(self._world_sum(peak)[0])  # every rank's matmul peak, summed
        if config.resume:
            self.load()

    # --- one optimizer step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.config
        start = time.perf_counter()
        loss, busy, pipeline_time = 0.0, 0.0, 0.0
        for k in range(cfg.accumulation):  # the replicas average gradients once, after the last
            x, y = self._my_share(self.train_data.next())
            loss += self.pipe.step(x, y, scale=1.0 / cfg.accumulation,
                                   sync_gradients=k == cfg.accumulation - 1) / cfg.accumulation
            busy += self.pipe.last_step.busy_time
            pipeline_time += self.pipe.last_step.step_time
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer else cfg.lr
        grad_norm = self.clip_gradients()
        # a NaN/inf loss or gradient on any rank of any replica: every rank skips (or stops) together
        finite = not self._agree(not (math.isfinite(loss) and math.isfinite(grad_norm)))
        if not finite and cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"step {self.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite; "
                                 f"stopping (on_nonfinite='stop'). The weights are still those of step {self.step}; "
                                 "resume from the latest checkpoint, e.g. with a lower lr")
        if self.optimizer:
            if finite:
                self.optimizer.step()
            self.scheduler.step()  # the LR schedule follows the step count, skipped or not
            self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self.skipped_steps += 1
            self._say(f"step {self.step + 1}: loss {loss} / gradient norm {grad_norm} is not finite: update "
                      f"skipped ({self.skipped_steps} so far)", None)
        self.step += 1
        elapsed = time.perf_counter() - start
        per_rank = torch.zeros(2 * self.world, dtype=torch.float64, device=self.pipe.transport.device)
        per_rank[self.rank] = 1.0 - busy / pipeline_time if pipeline_time > 0 else 0.0
        per_rank[self.world + self.rank] = peak_memory_bytes(self.pipe.device)
        per_rank = (self._world_sum(per_rank) / self.dp).tolist()  # per pipeline rank, mean over replicas
        tokens = cfg.accumulation * cfg.batch_size * self.model_config.seq_len
        return {
            "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed, "step_time": elapsed,
            "bubble_fraction": sum(per_rank[: self.world]) / self.world,
            "bubble_per_rank": per_rank[: self.world],
            "peak_memory_per_rank": [int(m) for m in per_rank[self.world:]],
            "mfu": tokens * flops_per_token(self.model_config) / elapsed / self.peak_flops,
            "skipped": not finite,
        }

    def clip_gradients(self) -> float:
        """Global L2 norm of all stages' gradients (summed over ranks); scale them to `grad_clip` if above.

        The coefficient is the one torch.nn.utils.clip_grad_norm_ computes for the whole model."""
        grads = [p.grad for p in self.pipe.parameters() if p.grad is not None]
        sumsq = torch.zeros(1, dtype=torch.float64, device=self.pipe.transport.device)
        for p in self.pipe.owned_parameters():  # a weight tied across ranks counts once
            if p.grad is not None:
                sumsq += p.grad.detach().double().pow(2).sum().to(sumsq.device)
        # replicas hold the same (averaged) gradients: the pipeline's ranks together have the whole model
        norm = math.sqrt(float(self._all_reduce(sumsq)[0]))
        if self.config.grad_clip > 0 and math.isfinite(norm):
            coef = self.config.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over the fixed evaluation batches (forward-only schedule; each replica
        takes its share of every batch, as in training)."""
        self.pipe.eval()
        try:
            return sum(self.pipe.evaluate(*self._my_share(b)) for b in self.eval_set) / len(self.eval_set)
        finally:
            self.pipe.train()

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
        bar = _progress(cfg, self.step) if lead else None
        start = time.perf_counter()
        self._say(f"training {cfg.preset} GPT ({sum(p.numel() for p in self.pipe.parameters()):,} parameters on "
                  f"global rank 0) on {self._layout()}: schedule {cfg.schedule}, {cfg.microbatches} microbatches, "
                  f"global batch {cfg.batch_size} x {self.model_config.seq_len} tokens", bar)
        if self.step == 0:
            first = self.evaluate()
            self._say(f"held-out loss before training {first:.4f} (perplexity {math.exp(first):.2f})", bar)
        try:
            end = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step is not None else cfg.steps
            while self.step < end:
                record = self.train_step()
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == end:
                    record["eval_loss"] = self.evaluate()
                if cfg.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                self.history.append(record)
                if writer:
                    writer.write(record)
                if board is not None:
                    for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "bubble_fraction",
                                "step_time"):
                        if record.get(key) is not None:
                            board.add_scalar(key, record[key], self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if lead and (self.step % cfg.log_every == 0 or self.step == end):
                    self._say(_format(record, self.world), bar)
                if cfg.max_seconds is not None and self._agree(time.perf_counter() - start > cfg.max_seconds):
                    self._say(f"stopping at step {self.step}: --max-seconds {cfg.max_seconds:g} reached", bar)
                    break
            final = self.history[-1]["eval_loss"] if self.history and self.history[-1]["step"] == self.step \
                else self.evaluate()
            just_saved = cfg.checkpoint_every and self.history and self.step % cfg.checkpoint_every == 0
            if cfg.checkpoint_dir and not just_saved:
                self.save()
        finally:
            if bar is not None:
                bar.close()
            if writer:
                writer.close()
            if board is not None:
                board.close()
        if lead:
            self._summary(final, time.perf_counter() - start)
            if cfg.plot and self.history:
                plot_losses(self.history, cfg.plot, title=f"{cfg.preset} GPT, {cfg.schedule}, {self._layout()}")
                print(f"loss curve: {cfg.plot}")
        return self.history

    # --- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective). Returns its path on rank 0."""
        root = Path(self.config.checkpoint_dir)
        tmp = root / f".tmp-step_{self.step:08d}"
        # replicas hold the same weights and optimizer state: the first one writes the layers
        ckpt.write_shards(tmp, self.global_rank, self.local_layers if self.dp_rank == 0 else {}, self.optimizer)
        self._barrier()  # every shard is on disk before rank 0 publishes
        path = None
        if self.global_rank == 0:
            manifest = {
                "format": 1, "step": self.step, "world_size": self.world * self.dp, "dp": self.dp, "pp": self.world,
                "num_layers": sum(self.pipe.balance),
                "model": dataclasses.asdict(self.model_config),
                "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "extra"},
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "data": base64.b64encode(self.train_data.generator.get_state().numpy().tobytes()).decode(),
            }
            path = ckpt.publish(root, tmp, self.step, manifest)
        self._barrier()  # nobody reads `latest` before it is published
        return path

    def load(self) -> bool:
        """Resume from the latest checkpoint in checkpoint_dir (on any number of ranks). False if none."""
        path = ckpt.latest(self.config.checkpoint_dir)
        if path is None:
            self._say(f"no checkpoint in {self.config.checkpoint_dir}: starting from step 0", None)
            return False
        manifest = ckpt.read_manifest(path)
        if manifest["model"] != dataclasses.asdict(self.model_config):
            raise ConfigError(f"{path} holds a model {manifest['model']}, but this run builds "
                              f"{dataclasses.asdict(self.model_config)}: resume with the same model settings")
        ckpt.load_layers(path, self.local_layers, self.optimizer)
        if self.scheduler and manifest["scheduler"]:
            self.scheduler.load_state_dict(manifest["scheduler"])
            for group, lr in zip(self.optimizer.param_groups, manifest["scheduler"]["_last_lr"], strict=False):
                group["lr"] = lr
        state = torch.frombuffer(bytearray(base64.b64decode(manifest["data"])), dtype=torch.uint8)
        self.train_data.generator.set_state(state)
        same_layout = manifest["world_size"] == self.world * self.dp and manifest.get("dp", 1) == self.dp
        if not same_layout or not ckpt.load_rng(path, self.global_rank):
            torch.manual_seed(self.config.seed * 1_000_003 + manifest["step"] * 101 + self.global_rank)
        self.step = manifest["step"]
        self._say(f"resumed from {path} at step {self.step}", None)
        return True

    # --- helpers -------------------------------------------------------------------------------------
    def _my_share(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's contiguous slice of a global batch (every rank draws the same global batches,
        so the data order does not depend on dp, and resuming on another dp continues the same stream)."""
        if self.dp == 1:
            return batch
        n = batch[0].shape[0] // self.dp
        return tuple(t[self.dp_rank * n:(self.dp_rank + 1) * n] for t in batch)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over this pipeline's ranks."""
        return all_reduce_sum(self.pipe.transport, tensor, self.config.timeout)

    def _world_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over every rank of the job: over the pipeline, then over the replicas."""
        return sum_over(self.pipe.dp_group, self._all_reduce(tensor), self.config.timeout)

    def _barrier(self) -> None:
        self._world_sum(torch.zeros(1, dtype=torch.float64, device=self.pipe.transport.device))

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so all ranks stop at the same step)."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.pipe.transport.device)
        return float(self._world_sum(t)[0]) > 0

    def _layout(self) -> str:
        return f"dp {self.dp} x pp {self.world} ranks" if self.dp > 1 else f"{self.world} ranks"

    def _say(self, text: str, bar) -> None:
        if self.global_rank != 0:
            return
        if bar is not None:
            bar.write(text)
        else:
            print(text, flush=True)

    def _summary(self, final: float, seconds: float) -> None:
        h = self.history
        if not h:
            return
        k = min(10, len(h))
        first = sum(r["loss"] for r in h[:k]) / k
        last = sum(r["loss"] for r in h[-k:]) / k
        tokens = sum(r["tokens_per_s"] * r["step_time"] for r in h)
        bubbles = [sum(r["bubble_per_rank"][i] for r in h) / len(h) for i in range(self.world)]
        print(f"\nsummary: {len(h)} steps in {seconds:.1f}s on {self._layout()}, {tokens / seconds:.0f} tokens/s, "
              f"MFU {sum(r['mfu'] for r in h) / len(h):.1%} of measured matmul peak")
        print(f"  train loss (mean of {k} steps) {first:.4f} -> {last:.4f}; held-out loss {final:.4f} "
              f"(perplexity {math.exp(final):.2f})")
        print(f"  idle (bubble) per rank {' '.join(f'{b:.1%}' for b in bubbles)}; peak memory per rank "
              f"{' '.join(f'{m / 2**20:.0f}MiB' for m in h[-1]['peak_memory_per_rank'])}")
        if self.skipped_steps:
            print(f"  {self.skipped_steps} step(s) skipped: non-finite loss or gradients (on_nonfinite='skip')")


def _mesh_for(config: TrainConfig, mesh, group, transport, device):
    """The (dp, pp) DeviceMesh for config.dp > 1 (built over the whole world unless given), else `mesh`."""
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        dp = mesh["dp"].size() if "dp" in names else 1
        if dp != config.dp:
            raise ConfigError(f"dp={config.dp}, but the mesh given has {dp} data-parallel replicas")
        return mesh
    if config.dp == 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if transport is not None or group is not None:
        raise ConfigError(f"dp={config.dp} lays out the whole torch.distributed world; pass no group/transport")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: launch with torchrun")
    world = dist.get_world_size()
    if world % config.dp:
        raise ConfigError(f"dp={config.dp} does not divide the {world} ranks: launch a multiple of {config.dp} "
                          "processes (pipeline ranks = world size / dp)")
    kind = torch.device(device).type if device is not None else "cpu"
    return init_device_mesh(kind, (config.dp, world // config.dp), mesh_dim_names=("dp", "pp"))


def _world_size(group, transport) -> int:
    if transport is not None:
        return transport.world_size
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: launch with torchrun (or pass transport=)")
    return dist.get_world_size(group)


def _format(r: dict, world: int) -> str:
    extra = f" | held-out {r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
    return (f"step {r['step']:5d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {r['grad_norm']:.3f} | "
            f"{r['tokens_per_s']:7.0f} tokens/s | MFU {r['mfu']:.1%} | idle "
            f"{' '.join(f'{b:.0%}' for b in r['bubble_per_rank'])}{extra}")


def _progress(cfg: TrainConfig, initial: int):
    """A tqdm bar when asked (or stdout is a terminal) and tqdm is installed; None for plain lines."""
    wanted = cfg.progress if cfg.progress is not None else sys.stdout.isatty()
    if not wanted:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True)
