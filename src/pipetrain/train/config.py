"""The training configuration (`TrainConfig`), its validation, the process layout it asks for, and the
learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..models import PRESETS, ModelConfig
from ..models.gpt import GPTConfig
from ..schedule import names as schedule_names
from ..schedule.registry import default_stages_per_rank


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the field and the fix."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/inf and `on_nonfinite="stop"` (raised on every rank)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; `pipetrain train` fills it from a TOML file and flags."""

    preset: str = "tiny"  # a GPT or Llama size from pipetrain.models.PRESETS; the fields below override it
    hf: str | None = None  # instead of a preset: a local Hugging Face model directory (config.json, weights if any)
    save_pretrained: str | None = None  # with hf: write the trained model here at the end (HF safetensors)
    data: list[str] | None = None  # local text (.txt, .jsonl, .parquet files or folders) instead of the byte corpus
    text_field: str = "text"  # with data: the field of a .jsonl record / .parquet column holding the text
    eval_fraction: float | None = None  # with data: hold out this last fraction of the documents (default 0.05)
    eval_data: list[str] | None = None  # with data: held-out files instead of eval_fraction
    document_mask: bool = False  # with data: attention and positions restart at each document of a packed row
    tokenizer: str | None = None  # with data and a preset: the tokenizer's folder (the model's vocab becomes its size)
    data_cache: str | None = None  # where tokenized data is cached (default $PIPETRAIN_CACHE or ~/.cache/pipetrain)
    layers: int | None = None
    d_model: int | None = None
    heads: int | None = None
    seq_len: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool = False
    schedule: str = "1f1b"
    stages_per_rank: int | None = None
    microbatches: int = 4
    batch_size: int = 16  # sequences per step over all replicas (each replica: batch_size / dp, in microbatches)
    dp: int = 1  # data-parallel replicas of the pipeline; pipeline ranks = world size / (dp x tp)
    tp: int = 1  # tensor-parallel ranks splitting each layer (models with a tensor_parallel_plan)
    pp: int | None = None  # pipeline ranks; given, dp = world size / (pp x tp) (resolve_pp at launch)
    ep: int = 1  # expert-parallel ranks splitting each MoE layer's experts: they are dp replicas (ep divides dp)
    expert_capacity: float | None = None  # experts' capacity factor (tokens over it dropped); None: dropless
    sequence_parallel: bool = False  # with tp: activations split by sequence between split layers and stages
    overlap: bool = False  # with ep: forwards paired with backwards, hiding each other's all-to-alls
    vocab_parallel: bool = False  # the head's projection and cross-entropy split by vocabulary over the pp ranks
    shard: str = "none"  # over the replicas, 1/dp per rank: "optimizer" (ZeRO-1), "gradients" (2), "params" (3)
    accumulation: int = 1  # pipeline steps per optimizer step
    balance: str = "params"
    steps: int = 100  # optimizer steps (the LR schedule spans them)
    stop_at_step: int | None = None  # end this run early (a time-sliced job); resume later to continue
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 10  # steps of linear warm-up, then cosine decay to min_lr at `steps`
    weight_decay: float = 0.1  # applied to matrices only (not biases, norms)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # global gradient-norm clip across all stages; 0 disables
    on_nonfinite: str = "skip"  # a NaN/inf loss or gradient on any rank: "skip" the update, or "stop"
    precision: str = "fp32"  # or "bf16" autocast with fp32 master weights
    activation_checkpointing: bool = False
    eval_every: int = 0  # 0: evaluate at the start and the end only
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (when checkpoint_dir is set)
    keep_last: int = 0  # keep only the newest K checkpoints in checkpoint_dir (0: keep all)
    resume: bool | str = False  # True: the latest in checkpoint_dir; a path: that checkpoint
    metrics_jsonl: str | None = None
    tensorboard: str | None = None  # a log directory for TensorBoard (needs the tensorboard package)
    plot: str | None = None  # loss curve PNG written at the end
    sample_tokens: int = 0  # at the end, continue a held-out prompt by this many tokens (pipe.generate) and print it
    seed: int = 0
    timeout: float = 60.0
    max_seconds: float | None = None
    progress: bool | None = None  # progress bar on rank 0: default when stdout is a terminal
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, reported by validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        if self.extra:
            known = ", ".join(f.name for f in dataclasses.fields(self) if f.name != "extra")
            raise ConfigError(f"unknown setting(s) {sorted(self.extra)}; known: {known}")
        if self.hf is None and self.preset not in PRESETS:
            raise ConfigError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        if self.save_pretrained and not self.hf:
            raise ConfigError("save_pretrained writes a Hugging Face model: it needs hf (the model's directory)")
        if self.schedule not in schedule_names():
            raise ConfigError(f"schedule={self.schedule!r} is not one of {schedule_names()}")
        for name in ("microbatches", "batch_size", "accumulation", "steps", "eval_batches", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "eval_every", "checkpoint_every", "sample_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("dp", "tp", "ep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        self._check_experts()
        if self.tp > 1 and self.tie_embeddings:
            raise ConfigError(f"tp={self.tp} does not split tied embeddings yet: drop tie_embeddings or use tp=1")
        if self.sequence_parallel and (self.tp == 1 or self.hf is not None):
            raise ConfigError("sequence_parallel splits the activations over the tensor-parallel ranks of the "
                              "reference GPT and Llama: it needs tp > 1 and no hf model (from_hf layers do not yet)")
        if self.sequence_parallel and self.dropout:
            raise ConfigError("sequence_parallel with dropout: the tp ranks draw alike, so each part of the sequence "
                              "would repeat the others' masks; use dropout 0")
        if self.sequence_parallel and self.model_config().seq_len % self.tp:
            raise ConfigError(f"sequence_parallel splits each sequence over tp={self.tp} ranks, but seq_len="
                              f"{self.model_config().seq_len} is not a multiple of it: choose a seq_len tp divides")
        if self.batch_size % (self.dp * self.microbatches):
            replicas = f"dp={self.dp} replicas x " if self.dp > 1 else ""
            raise ConfigError(f"batch_size={self.batch_size} does not split into {replicas}microbatches="
                              f"{self.microbatches}: use a multiple of {self.dp * self.microbatches}")
        if self.shard not in ("none", "optimizer", "gradients", "params"):
            raise ConfigError(f'shard must be "none", "optimizer", "gradients" or "params", got {self.shard!r}')
        if self.shard != "none" and self.dp == 1:
            raise ConfigError(f'shard="{self.shard}" shards over data-parallel replicas: set dp to 2 or more, or '
                              'shard="none"')
        if self.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f'on_nonfinite must be "skip" or "stop", got {self.on_nonfinite!r}')
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip and weight_decay must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f'precision must be "fp32" or "bf16", got {self.precision!r}')
        if self.balance not in ("uniform", "params", "time"):
            raise ConfigError(f'balance must be "uniform", "params" or "time", got {self.balance!r}')
        if self.stop_at_step is not None and (not isinstance(self.stop_at_step, int) or self.stop_at_step < 1):
            raise ConfigError(f"stop_at_step must be a positive integer, got {self.stop_at_step!r}")
        if self.sample_tokens and self.hf is None and self.sample_tokens >= self.model_config().seq_len:
            raise ConfigError(f"sample_tokens={self.sample_tokens} leaves no room for a prompt within the model's "
                              f"seq_len={self.model_config().seq_len} positions: use fewer")
        if self.resume is True and not self.checkpoint_dir:
            raise ConfigError("resume needs checkpoint_dir (where to look for the latest checkpoint), or a "
                              "checkpoint's path (--resume PATH)")
        if not isinstance(self.resume, bool | str) or self.resume == "":
            raise ConfigError(f"resume must be true/false or a checkpoint's path, got {self.resume!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ConfigError(f"keep_last must be an integer >= 0 (0: keep every checkpoint), got {self.keep_last!r}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError(f"tensorboard={self.tensorboard!r} needs the tensorboard package: pip install "
                                  "tensorboard (or drop the setting; metrics_jsonl needs nothing)") from None
        self._check_data()
        if self.hf is not None:
            check_hf_model(self)
            return
        try:
            self.model_config()
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None

    def _check_experts(self) -> None:
        if self.pp is not None and (not isinstance(self.pp, int) or self.pp < 1):
            raise ConfigError(f"pp must be a positive integer, got {self.pp!r}")
        if self.dp % self.ep:
            raise ConfigError(f"ep={self.ep} borrows its ranks from data parallel, but dp={self.dp} is not a multiple "
                              f"of it: launch dp = world size / (pp x tp) a multiple of {self.ep} (e.g. --dp "
                              f"{self.ep * max(1, self.dp // self.ep)}, or --pp so that it is)")
        if self.ep > 1 and self.shard != "none":
            raise ConfigError(f"ep={self.ep} with shard={self.shard!r}: the sharded optimizer does not split experts "
                              "yet; use shard none with ep")
        if self.ep > 1 and self.tp > 1:
            raise ConfigError(f"ep={self.ep} with tp={self.tp}: expert and tensor parallel together are not "
                              "supported yet; use one of them")
        if self.expert_capacity is not None and not self.expert_capacity > 0:
            raise ConfigError(f"expert_capacity must be > 0 (e.g. 1.25) or unset (dropless), got "
                              f"{self.expert_capacity!r}")
        wants = "ep" if self.ep > 1 else "expert_capacity" if self.expert_capacity is not None else None
        if wants and self.hf is None and self.preset in PRESETS and not getattr(PRESETS[self.preset], "n_experts", 0):
            moe = sorted(name for name, preset in PRESETS.items() if getattr(preset, "n_experts", 0))
            raise ConfigError(f"{wants} splits or caps a mixture of experts' experts, but preset {self.preset!r} has "
                              f"none: use a MoE preset ({', '.join(moe)}) or an --hf MoE model, or drop {wants}")
        if self.vocab_parallel and (self.ep > 1 or self.shard == "params" or self.sequence_parallel):
            raise ConfigError("vocab_parallel splits the vocabulary over the pipeline (and tp) ranks, with "
                              "data-parallel replicas, but not yet with ep, shard params or sequence_parallel: drop "
                              "them (or vocab_parallel)")
        if self.overlap and self.ep == 1:
            raise ConfigError("overlap pairs forwards with backwards to hide expert parallel's all-to-alls; with "
                              "ep=1 there are none: add --ep 2 (or more), or drop --overlap")

    def _check_data(self) -> None:
        """The data settings, before any process-group work: files there, a tokenizer in the model folder."""
        for name in ("data", "eval_data"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.data:
            used = [n for n in ("eval_fraction", "eval_data", "document_mask", "data_cache", "tokenizer")
                    if getattr(self, n)]
            if used:
                raise ConfigError(f"{used} go with data (local text files); without it the byte corpus is used")
            return
        if (self.hf is None) == (self.tokenizer is None):
            raise ConfigError("data is tokenized by the model folder's tokenizer (hf) or, for a preset, by the one "
                              "in tokenizer: give exactly one of them")
        if self.eval_fraction is not None and self.eval_data:
            raise ConfigError("give eval_fraction or eval_data (held-out files), not both")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        from ..data import DataError, data_files
        from ..data.tokens import check_tokenizer_dir

        try:
            data_files(self.data)
            if self.eval_data:
                data_files(self.eval_data)
            check_tokenizer_dir(self.hf or self.tokenizer)
        except DataError as err:
            raise ConfigError(str(err)) from None

    def model_config(self) -> ModelConfig:
        """The preset's model config with this config's overrides."""
        overrides = {"n_layers": self.layers, "d_model": self.d_model, "n_heads": self.heads, "seq_len": self.seq_len,
                     "tie_embeddings": self.tie_embeddings}
        base = PRESETS[self.preset]
        if isinstance(base, GPTConfig):
            overrides["dropout"] = self.dropout
        elif self.dropout:
            raise ValueError(f"preset {self.preset!r} (Llama) has no dropout; drop the dropout setting")
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k.replace("-", "_"): v for k, v in values.items() if k.replace("-", "_") in names}
        extra = {k: v for k, v in values.items() if k.replace("-", "_") not in names}
        if "betas" in known:
            known["betas"] = tuple(known["betas"])
        return cls(**known, extra=extra)


def warmup_cosine(step: int, *, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Multiplier of `lr` for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


def process_layout(config: TrainConfig, mesh, transport, device) -> tuple:
    """(mesh, pipeline ranks): the (dp, pp[, tp]) DeviceMesh for config.dp or config.tp > 1 (built over the whole
    world unless given), else `mesh` (None for one pipeline), and how many ranks a pipeline has."""
    mesh = _mesh_for(config, mesh, transport, device)
    return mesh, (mesh["pp"].size() if mesh is not None else _world_size(transport))


def _mesh_for(config: TrainConfig, mesh, transport, device):
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        sizes = {name: mesh[name].size() if name in names else 1 for name in ("dp", "ep", "tp")}
        for name, size in (("dp", sizes["dp"] * sizes["ep"]), ("ep", sizes["ep"]), ("tp", sizes["tp"])):
            if size != getattr(config, name):
                raise ConfigError(f"{name}={getattr(config, name)}, but the mesh given has {size} along {name!r}"
                                  + (" (dp counts the ep ranks too)" if name == "dp" and sizes["ep"] > 1 else ""))
        return mesh
    if config.dp == 1 and config.tp == 1:
        return None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if transport is not None:
        raise ConfigError(f"dp={config.dp} x tp={config.tp} lays out the whole torch.distributed world; pass no "
                          "transport")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: launch with torchrun")
    world = dist.get_world_size()
    _check_divides(config, world)
    import torch

    kind = torch.device(device).type if device is not None else "cpu"
    shape = {"dp": config.dp // config.ep, "ep": config.ep, "pp": world // (config.dp * config.tp), "tp": config.tp}
    names = tuple(n for n in shape if n == "pp" or (n == "dp" and config.ep == 1) or shape[n] > 1)
    return init_device_mesh(kind, tuple(shape[n] for n in names), mesh_dim_names=names)


def resolve_pp(config: TrainConfig, world: int) -> TrainConfig:
    """With `pp` given, the config with dp = world / (pp x tp) (ConfigError if they do not fit the world)."""
    if config.pp is None:
        return config
    if world % (config.pp * config.tp):
        raise ConfigError(f"pp={config.pp} x tp={config.tp} does not divide the {world} ranks: launch a multiple "
                          f"of {config.pp * config.tp} processes")
    dp = world // (config.pp * config.tp)
    if config.dp not in (1, dp):
        raise ConfigError(f"dp={config.dp} and pp={config.pp} x tp={config.tp} do not make the {world} ranks: give "
                          "one of dp and pp")
    return dataclasses.replace(config, dp=dp)


def _check_divides(config: TrainConfig, world: int) -> None:
    replicas = config.dp * config.tp
    if world % replicas:
        names = f"dp={config.dp} x tp={config.tp}" if config.tp > 1 else f"dp={config.dp}"
        raise ConfigError(f"{names} does not divide the {world} ranks: launch a multiple of {replicas} processes "
                          "(pipeline ranks = world size / (dp x tp))")


def _world_size(transport) -> int:
    if transport is not None:
        return transport.world_size
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: launch with torchrun (or pass transport=)")
    return dist.get_world_size()


def check_hf_model(config: TrainConfig):
    """The HF config of `config.hf`, after checking that pipetrain can train it here (ConfigError if not)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConfigError("hf needs transformers: pip install 'pipetrain[hf]'") from None
    path = Path(config.hf)
    if not (path / "config.json").is_file():
        raise ConfigError(f"hf={config.hf!r} is not a directory with a config.json (a local Hugging Face model; "
                          "nothing is downloaded)")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:  # an unknown model_type, a broken config.json
        raise ConfigError(f"{path / 'config.json'}: transformers cannot read it: {err}") from None
    check_hf_architecture(config, hf_config)
    if config.tp > 1 and getattr(hf_config, "tie_word_embeddings", False):
        raise ConfigError(f"tp={config.tp} does not split tied embeddings yet, and the model in {config.hf} ties them "
                          "(tie_word_embeddings in config.json): use tp=1")
    if hf_config.vocab_size < 256 and not config.data:
        raise ConfigError(f"the model in {config.hf} has a vocabulary of {hf_config.vocab_size} tokens; the "
                          "built-in corpus is bytes, which needs >= 256")
    ignored = [name for name in ("layers", "d_model", "heads", "tie_embeddings") if getattr(config, name)]
    if ignored or config.dropout:
        raise ConfigError(f"{ignored or ['dropout']} set the size of a preset; with hf the model's config.json does")
    hf_seq_len(config, hf_config)
    return hf_config


def check_hf_architecture(config: TrainConfig, hf_config) -> None:
    """ConfigError, from config.json alone (before any weight is read), if pipetrain cannot split the model."""
    from ..models.hf_layout import NOT_YET, SUPPORTED, supported_model_types

    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    if set(architectures) & set(SUPPORTED) or (not architectures and model_type in supported_model_types()):
        return
    why = next((f": {a} {NOT_YET[a]}" for a in architectures if a in NOT_YET), "")
    raise ConfigError(f"the model in {config.hf} is {', '.join(architectures) or model_type!s} (config.json){why}; "
                      f"pipetrain trains {', '.join(SUPPORTED)} from a Hugging Face folder (for other models, "
                      "write the layers yourself: see the guide's 'any model' page)")


def check_fits(config: TrainConfig, world_size: int) -> None:
    """ConfigError if the model has fewer pipeline layers than the launch has stages, in the user's terms."""
    _check_divides(config, world_size)
    ranks = world_size // (config.dp * config.tp)
    per_rank = config.stages_per_rank or default_stages_per_rank(config.schedule)
    stages = ranks * per_rank
    if config.hf is not None:
        blocks = int(getattr(check_hf_model(config), "num_hidden_layers", 0))
        layers, fix = blocks + 2, "fewer ranks (or a schedule with fewer stages per rank)"
    else:
        import torch

        from ..models import build

        model = config.model_config()
        with torch.device("meta"):  # (no memory: only the count)
            layers = len(build(model))
        blocks = model.n_layers
        fix = f"layers={blocks + stages - layers} or more, or fewer ranks"
    if layers < stages:
        raise ConfigError(f"the model has {layers} pipeline layers (the embedding, {blocks} block(s), the head), "
                          f"fewer than the {stages} stages of {ranks} pipeline rank(s) x {per_rank} stage(s) per rank "
                          f"({config.schedule}): use {fix}")


def hf_seq_len(config: TrainConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2**31
    seq = config.seq_len or min(128, limit - 1)
    if seq + 1 > limit:
        raise ConfigError(f"seq_len={seq} needs {seq + 1} positions, but the model has {limit}")
    return seq
