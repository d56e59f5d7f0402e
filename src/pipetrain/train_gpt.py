"""The reference GPT on the Python stdlib's source as a Trainer: what `pipetrain train` runs."""

from __future__ import annotations

import dataclasses

import torch

from .config import TrainConfig
from .data import Batches, Corpus, load_corpus
from .models.gpt import build_gpt, flops_per_token, gpt_loss
from .trainer import Trainer


def gpt_trainer(config: TrainConfig, *, corpus: Corpus | None = None, **kwargs) -> Trainer:
    """A Trainer for the GPT that `config` describes (preset and overrides), on byte-level batches of `corpus`
    (default: the stdlib's .py files, every 10th held out). `kwargs` go to Trainer (optimizer=, mesh=, ...)."""
    config.validate()
    model = config.model_config()
    torch.manual_seed(config.seed)  # every rank builds the same weights, then keeps its own stages
    layers = build_gpt(model)
    corpus = corpus or load_corpus()
    train = Batches(corpus.train, batch_size=config.batch_size, seq_len=model.seq_len, seed=config.seed)
    held_out = Batches(corpus.val, batch_size=config.batch_size, seq_len=model.seq_len, seed=config.seed + 1)
    return Trainer(layers, loss_fn=gpt_loss, data=train, eval_data=held_out, config=config,
                   flops_per_token=flops_per_token(model),
                   model_info={"name": f"{config.preset} GPT", **dataclasses.asdict(model)}, **kwargs)
