"""The reference GPT and the offline corpus."""

import pytest
import torch
from torch import nn

from pipetrain.models.gpt import GPTConfig, build_gpt, flops_per_token, gpt_loss
from pipetrain.train.data import Batches, load_corpus, stdlib_files


def test_gpt_is_a_flat_list_with_documented_shapes():
    cfg = GPTConfig(vocab_size=50, seq_len=12, d_model=16, n_layers=3, n_heads=4)
    layers = build_gpt(cfg)
    assert len(layers) == cfg.n_layers + 2
    x = torch.randint(0, 50, (2, 12))
    h = layers[0](x)
    assert h.shape == (2, 12, 16)
    for block in layers[1:-1]:
        h = block(h)
        assert h.shape == (2, 12, 16)
    logits = layers[-1](h)
    assert logits.shape == (2, 12, 50)
    assert gpt_loss(logits, x).item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=0.1)
    assert cfg.num_params() == sum(p.numel() for layer in layers for p in layer.parameters())
    assert flops_per_token(cfg) > 6 * (cfg.num_params() - 50 * 16 - 12 * 16) * 0.9


def test_gpt_attention_is_causal():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, seq_len=6, d_model=8, n_layers=1, n_heads=2)
    model = nn.Sequential(*build_gpt(cfg))
    x = torch.randint(0, 20, (1, 6))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 20
    assert torch.allclose(model(x)[0, :-1], model(y)[0, :-1])  # changing the last token changes no earlier output


def test_bad_gpt_config_names_the_field():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=10, n_heads=4)


def test_corpus_is_real_offline_text_with_a_held_out_split():
    assert len(stdlib_files()) > 100
    corpus = load_corpus(max_bytes=500_000, holdout_every=5)
    assert corpus.train.numel() > 4 * corpus.val.numel() / 2 > 0
    assert b"def " in bytes(corpus.train[:200_000].tolist())
    batches = Batches(corpus.train, batch_size=3, seq_len=16, seed=1)
    x, y = batches.next()
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = Batches(corpus.train, batch_size=3, seq_len=16, seed=1).next()
    assert torch.equal(again[0], x), "batches are deterministic per seed"
