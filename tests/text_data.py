"""Local text and a tiny model folder for the data tests, made offline: generated sentences written as
.txt/.jsonl/.parquet, a BPE tokenizer trained on them with `tokenizers` and saved next to a tiny Llama's
config.json (no weights: the model starts from its initialization)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the pipeline sends every microbatch forward and the last stage returns its loss while each rank "
         "keeps only its own layers so a model too large for one device trains on many").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` documents of 3-40 words from a small vocabulary (so a tiny model learns something)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))).capitalize() + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "n": list(range(len(docs)))}), path)
    return path


def model_folder(path: Path, docs: list[str], *, layers: int = 4, vocab: int = 300) -> Path:
    """A folder with a tiny LlamaConfig (vocab = the tokenizer's) and a BPE tokenizer trained on `docs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128).save_pretrained(path)
    return path
