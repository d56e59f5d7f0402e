"""A GPT decoder as a flat list of layers: embedding, blocks, final norm + head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..flops import training_flops_per_token
from ..runtime.cross_entropy import CrossEntropy
from ..runtime.tensor_parallel import Split, require_divisible, vocabulary_rows
from .common import assemble, document_mask, init_normal, split_inputs

RESIDUAL = ("proj.weight", "out.weight")  # scaled at initialization (the head's proj too, as before)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # byte-level by default
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model
    dropout: float = 0.0
    tie_embeddings: bool = False  # the head reuses the token embedding matrix (one Parameter in two layers)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def ffn(self) -> int:
        return self.d_ff or 4 * self.d_model

    def num_params(self) -> int:
        unique = {id(p): p for layer in build_gpt(self) for p in layer.parameters()}
        return sum(p.numel() for p in unique.values())


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(seq_len=64, d_model=64, n_layers=4, n_heads=4),  # ~0.2M params: well under 1 s/step on CPU
    "small": GPTConfig(seq_len=64, d_model=128, n_layers=4, n_heads=4),  # the example's default (0.9M)
    "gpt-8x256": GPTConfig(seq_len=128, d_model=256, n_layers=8, n_heads=8),  # benchmark sizes
    "gpt-16x512": GPTConfig(seq_len=128, d_model=512, n_layers=16, n_heads=8),
}


class Embedding(nn.Module):
    """Token + learned position embedding: (b, t) int64 -> (b, t, d)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.n_layers = cfg.n_layers

    def init_weights(self) -> None:
        init_normal(self, self.n_layers, RESIDUAL)

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        require_divisible(tp, "the GPT", vocab_size=vocabulary_rows(self.tok))
        # (the positions' table stays whole; with sequence parallelism the output leaves split by sequence)
        return {"tok": Split.EMBEDDING, "": Split.SCATTER}

    def vocabulary_parallel_plan(self) -> str:
        """The token table vocabulary parallelism splits over the pipeline ranks."""
        return "tok"

    def forward(self, inputs: torch.Tensor | dict) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (b, t) -> (b, t, d); or, for packed documents, {"input_ids", "position_ids"} -> ((b, t, d),
        positions (b, t)), the positions going on to the blocks' document mask."""
        idx, positions = split_inputs(inputs)
        pos = torch.arange(idx.shape[1], device=idx.device) if positions is None else positions
        h = self.drop(self.tok(idx) + self.pos(pos))  # (b, t, d)
        return h if positions is None else (h, positions)

    def forward_cached(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """Generation (kv_cache.py): the new tokens (b, t) at their own positions."""
        if int(cache.positions.max()) >= self.pos.num_embeddings:
            raise ValueError(f"generation reached position {int(cache.positions.max())}, but this GPT has "
                             f"{self.pos.num_embeddings} positions (seq_len): shorten the prompts or max_new_tokens")
        return self.drop(self.tok(idx) + self.pos(cache.positions))  # (b, t, d)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.ffn)
        self.out = nn.Linear(cfg.ffn, cfg.d_model)
        self.dropout = cfg.dropout
        self.drop = nn.Dropout(cfg.dropout)
        self.n_layers = cfg.n_layers

    def init_weights(self) -> None:
        init_normal(self, self.n_layers, RESIDUAL)

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        """Megatron's split: each tp rank runs n_heads / tp heads and ffn / tp of the MLP."""
        require_divisible(tp, "the GPT", n_heads=self.n_heads, d_ff=self.fc.out_features)
        return {"q": Split.COLUMNS, "k": Split.COLUMNS, "v": Split.COLUMNS, "proj": Split.ROWS,
                "fc": Split.COLUMNS, "out": Split.ROWS, "ln1": Split.SEQUENCE, "ln2": Split.SEQUENCE}

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
        """(b, t, d) -> (b, t, d), causal; or (hidden, positions) -> the same pair, attending within documents."""
        p = self.dropout if self.training else 0.0
        if isinstance(x, tuple):
            h, positions = x
            mask = document_mask(positions)  # (b, 1, t, t)
            return self._block(h, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                 dropout_p=p)), positions
        return self._block(x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p))

    def forward_cached(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Generation (kv_cache.py): the new tokens attend the cached keys and values and their own."""
        def attend(q, k, v):
            k, v = cache.update(k, v)  # (b, h, T, hd)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.attn_mask)

        return self._block(x, attend)

    def _block(self, x: torch.Tensor, attend) -> torch.Tensor:
        h = self.ln1(x)  # (whole: under sequence parallelism x is this rank's part of the sequence)
        b, t, _ = h.shape
        # (b, h, t, hd) each; h = this rank's heads (n_heads / tp under tensor parallel)
        q, k, v = (proj(h).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = attend(q, k, v)  # (b, h, t, hd)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, -1)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))  # (b, t, d)


class Head(nn.Module):
    """Final LayerNorm and the vocabulary projection: (b, t, d) -> (b, t, vocab)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.n_layers = cfg.n_layers

    def init_weights(self) -> None:
        init_normal(self, self.n_layers, RESIDUAL)

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        require_divisible(tp, "the GPT", vocab_size=vocabulary_rows(self.proj))
        return {"proj": Split.HEAD, "ln": Split.SEQUENCE}

    def vocabulary_parallel_plan(self) -> str:
        """The projection vocabulary parallelism splits over the pipeline ranks (applied last in forward)."""
        return "proj"

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.proj(self.ln(x[0] if isinstance(x, tuple) else x))

    def forward_cached(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Generation: the logits of the last position only, (b, 1, vocab)."""
        return self.forward(x[:, -1:])


def build_gpt(cfg: GPTConfig) -> list[nn.Module]:
    """[Embedding, Block x n_layers, Head], initialized GPT-2 style (seed torch before calling). Built under
    `torch.device("meta")`, a Pipeline initializes each layer on its own rank with `init_weights()`."""
    return assemble(Embedding(cfg), [Block(cfg) for _ in range(cfg.n_layers)], Head(cfg), tie=cfg.tie_embeddings)


gpt_loss = CrossEntropy(token_mean=False)
"""Mean next-token cross-entropy: logits (b, t, vocab), targets (b, t)."""

gpt_loss_sum = CrossEntropy()
"""(loss sum, count) of next-token cross-entropy, -100 targets ignored: a token mean over the whole batch
(packed rows with a document mask have a different count in each row). logits (b, t, vocab), targets (b, t)."""


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token, by pipetrain.flops's convention (the planner's): q, k, v, proj and the MLP's two
    matmuls per block, attention in full, the head."""
    d, f = cfg.d_model, cfg.ffn
    return training_flops_per_token(layers=cfg.n_layers, matmul_params=3 * d * d + d * d + 2 * d * f,
                                    seq=cfg.seq_len, hidden=d, vocab=cfg.vocab_size)
