"""The Trainer `pipetrain train` runs for a TrainConfig: a preset GPT or Llama, or a local Hugging Face model,
on byte-level batches of the Python stdlib's source (every 10th file held out), or a Hugging Face model on
local text (`data`: pipetrain.data's packed rows, tokenized by the model folder's tokenizer)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .. import models
from ..models.gpt import gpt_loss, gpt_loss_sum
from .config import TrainConfig, check_hf_model, hf_seq_len
from .data import Batches, CausalLMBatches, Corpus, load_corpus
from .report import ensure_log_handler
from .trainer import Trainer

logger = logging.getLogger("pipetrain")


def trainer_from_config(config: TrainConfig, *, corpus: Corpus | None = None, **kwargs) -> Trainer:
    """A Trainer for `config.hf` (a Hugging Face model directory) or else `config.preset` (with its overrides).
    `kwargs` go to Trainer (optimizer=, mesh=, device=, ...). An HF model is built on the meta device: each
    rank materializes only its own stages and reads only their weights (if the directory has any)."""
    config.validate()
    if not config.data:
        corpus = corpus or load_corpus()
    return _hf_trainer(config, corpus, **kwargs) if config.hf else _preset_trainer(config, corpus, **kwargs)


def _preset_trainer(config: TrainConfig, corpus: Corpus, **kwargs) -> Trainer:
    model = config.model_config()
    if config.data:  # the tokenizer's vocabulary
        train, held_out, vocab = _text_rows(config, model.seq_len)
        model = dataclasses.replace(model, vocab_size=vocab)
    else:
        train = Batches(corpus.train, batch_size=config.batch_size, seq_len=model.seq_len, seed=config.seed)
        held_out = Batches(corpus.val, batch_size=config.batch_size, seq_len=model.seq_len, seed=config.seed + 1)
    torch.manual_seed(config.seed)  # every rank builds the same weights, then keeps its own stages
    layers = models.build(model)
    # local text: a token mean (the document mask ignores some targets); the byte corpus: the mean
    loss = dict(loss_fn=gpt_loss_sum, count_tokens=lambda y: (y != -100).sum()) if config.data else \
        dict(loss_fn=gpt_loss)
    return Trainer(layers, **loss, data=train, eval_data=held_out, config=config,
                   flops_per_token=models.flops_per_token(model),
                   model_info={"name": f"{config.preset} {models.family(model)}", **dataclasses.asdict(model)},
                   **kwargs)


def _hf_trainer(config: TrainConfig, corpus: Corpus, **kwargs) -> Trainer:
    """Built on the meta device: each rank materializes only its own stages, then reads only their weights."""
    from transformers import AutoModelForCausalLM

    from ..data import DataError
    from ..models.hf import from_hf, load_weights
    from ..models.hf_checkpoint import has_weights

    hf_config = check_hf_model(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    layers, loss_fn = from_hf(model)
    seq = hf_seq_len(config, hf_config)
    if config.data:
        train, held_out, vocab = _text_rows(config, seq)
        if vocab > hf_config.vocab_size:
            raise DataError(f"the tokenizer in {config.hf} has {vocab} tokens, more than the model's "
                            f"vocab_size={hf_config.vocab_size}: set vocab_size >= {vocab} in its config.json")
    else:
        train = CausalLMBatches(corpus.train, batch_size=config.batch_size, seq_len=seq, seed=config.seed)
        held_out = CausalLMBatches(corpus.val, batch_size=config.batch_size, seq_len=seq, seed=config.seed + 1)
    params = sum(p.numel() for p in model.parameters())
    trainer = Trainer(layers, loss_fn=loss_fn, data=train, eval_data=held_out, config=config,
                      count_tokens=lambda labels: (labels[:, 1:] != -100).sum(), flops_per_token=6.0 * params,
                      model_info={"name": f"{type(model).__name__} from {config.hf}", "params": params,
                                  "config": hf_config.to_diff_dict()}, **kwargs)
    weights = has_weights(config.hf)
    if trainer.step == 0 and weights:  # a resumed run has its trained weights already
        load_weights(trainer.pipe, config.hf)
    elif trainer.step == 0:
        logger.info("%s has no weights: starting from the model's initialization (seed %d)", config.hf, config.seed)
    return trainer


def _text_rows(config: TrainConfig, seq: int):
    """(train rows, held-out rows, the tokenizer's vocabulary size) of `config.data`, tokenized by the model
    folder's tokenizer (or `config.tokenizer`'s, for a preset), cached; collective. DataError (on every rank)
    if a part is shorter than one batch."""
    data = _text_data(config, seq)
    ensure_log_handler()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        logger.info("data: %s documents, %s tokens (%s %s); %d training rows of %d tokens, %d held-out rows",
                    f"{data.tokens.documents:,}", f"{len(data.tokens):,}",
                    "read from the cache" if data.tokens.from_cache else "tokenized into", data.tokens.path,
                    len(data.train), seq + 1, len(data.held_out))
    return data.train, data.held_out, data.tokens.vocab_size


def _text_data(config: TrainConfig, seq: int):
    """pipetrain.data's rows of `config.data` (TextData), from the cache once one run has tokenized them."""
    from ..data import RowFormat, text_rows

    fraction = config.eval_fraction if config.eval_fraction is not None or config.eval_data else 0.05
    return text_rows(config.data, config.hf or config.tokenizer, seq_len=seq, eval_fraction=fraction or 0.0,
                     eval_paths=config.eval_data, text_field=config.text_field, document_mask=config.document_mask,
                     format=RowFormat.CAUSAL_LM if config.hf else RowFormat.SHIFTED, cache_dir=config.data_cache,
                     progress=config.progress, min_rows=config.batch_size)


def held_out_sample(pipe, config: TrainConfig, *, corpus: Corpus | None = None) -> tuple[str, str]:
    """(prompt, continuation): the start of a function definition in the held-out text, continued by
    `config.sample_tokens` bytes generated on `pipe` (collective; the same on every rank). The prompt is
    shortened so that prompt and continuation fit the model's positions (a preset's seq_len)."""
    if config.data:
        return _text_sample(pipe, config)
    corpus = corpus or load_corpus()
    text = bytes(corpus.val[:200_000].tolist())
    start = text.find(b"\ndef ", 1000) + 1  # 0 when there is none: the held-out text's start
    seq = config.model_config().seq_len if not config.hf else 10**9
    length = max(1, min(48, seq - config.sample_tokens))
    prompt = torch.tensor(list(text[start:start + length]), dtype=torch.int64)
    out = pipe.generate([prompt], config.sample_tokens, temperature=0.8, top_k=40, seed=config.seed)[0]
    return _text(prompt), _text(out)


def _text(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


def _text_sample(pipe, config: TrainConfig) -> tuple[str, str]:
    """held_out_sample on local text: the start of the first whole held-out document, decoded by the
    tokenizer (the cache is read again; collective)."""
    from ..data import load_tokenizer

    seq = config.model_config().seq_len if not config.hf else hf_seq_len(config, check_hf_model(config))
    held = _text_data(config, seq).held_out
    ids = held.tokens.ids[held.start:held.start + 10_000]
    ends = (ids == held.tokens.eos).nonzero()[0]
    start = int(ends[0]) + 1 if len(ends) and ends[0] + 49 < len(ids) else 0
    length = max(1, min(48, seq - config.sample_tokens))
    prompt = torch.from_numpy(ids[start:start + length].astype("int64"))
    out = pipe.generate([prompt], config.sample_tokens, temperature=0.8, top_k=40, seed=config.seed)[0]
    tokenizer = load_tokenizer(config.hf or config.tokenizer)
    return tokenizer.decode(prompt.tolist()), tokenizer.decode(out.tolist())
