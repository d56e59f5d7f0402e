"""A Llama decoder as a flat list of layers: token embedding, blocks (RMSNorm, RoPE, grouped-query attention,
SwiGLU), final norm + head. Weights are laid out as Hugging Face's LlamaForCausalLM lays them out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..flops import training_flops_per_token
from ..runtime.tensor_parallel import Split, require_divisible, vocabulary_rows
from .common import assemble, document_mask, init_normal, split_inputs
from .moe import MoEFeedForward

RESIDUAL = ("wo.weight", "w_down.weight", "experts.down")  # the projections into the residual stream


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256  # byte-level by default
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention: heads sharing one key/value head (default: n_heads)
    d_ff: int | None = None  # default: 8/3 d_model rounded up to a multiple of 32 (SwiGLU)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    n_experts: int = 0  # > 0: each block's feed-forward is a mixture of this many experts (models/moe.py)
    top_k: int = 2  # experts per token
    d_expert: int | None = None  # an expert's hidden size (default: ffn / top_k, the dense FLOPs per token)
    aux_coef: float = 0.01  # the load-balancing loss's weight

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of an even size "
                             "(RoPE rotates pairs)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        return self.d_ff or 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def expert_ffn(self) -> int:
        return self.d_expert or max(1, self.ffn // self.top_k)


PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(seq_len=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2),
    "llama-small": LlamaConfig(seq_len=64, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2),
    "llama-8x256": LlamaConfig(seq_len=128, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4),
    "llama-moe-tiny": LlamaConfig(seq_len=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2),
    "llama-moe-8x256": LlamaConfig(seq_len=128, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, n_experts=8,
                                   top_k=2),
}


class Embedding(nn.Module):
    """Token embedding (no positions: RoPE adds them in attention): (b, t) int64 -> (b, t, d)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.n_layers = cfg.n_layers

    def init_weights(self) -> None:
        init_normal(self, self.n_layers, RESIDUAL)

    def forward(self, inputs: torch.Tensor | dict) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ids (b, t) -> (b, t, d); or, for packed documents, {"input_ids", "position_ids"} -> ((b, t, d),
        positions (b, t)) for the blocks' RoPE and document mask."""
        idx, positions = split_inputs(inputs)
        return self.tok(idx) if positions is None else (self.tok(idx), positions)

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        require_divisible(tp, "the Llama", vocab_size=vocabulary_rows(self.tok))
        return {"tok": Split.EMBEDDING, "": Split.SCATTER}  # (sequence parallelism: the output leaves split)

    def vocabulary_parallel_plan(self) -> str:
        """The token table vocabulary parallelism splits over the pipeline ranks."""
        return "tok"

    def forward_cached(self, idx: torch.Tensor, cache) -> torch.Tensor:
        """Generation (kv_cache.py): positions enter in attention."""
        return self.tok(idx)


class Block(nn.Module):
    """x + attention(norm(x)), then + SwiGLU(norm(x)); causal, RoPE on queries and keys."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.kv_heads, self.head_dim, self.n_layers = cfg.n_heads, cfg.kv_heads, hd, cfg.n_layers
        self.theta = cfg.rope_theta
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.wq = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        if cfg.n_experts:
            self.moe = MoEFeedForward(d, cfg.n_experts, cfg.top_k, cfg.expert_ffn, cfg.aux_coef)
        else:
            self.w_gate = nn.Linear(d, cfg.ffn, bias=False)
            self.w_up = nn.Linear(d, cfg.ffn, bias=False)
            self.w_down = nn.Linear(cfg.ffn, d, bias=False)
        self.register_buffer("inv_freq", _inv_freq(hd, self.theta), persistent=False)

    def init_weights(self) -> None:
        init_normal(self, self.n_layers, RESIDUAL)
        self.inv_freq.copy_(_inv_freq(self.head_dim, self.theta))

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        """Megatron's split: each tp rank runs n_heads / tp query heads with their kv_heads / tp key/value heads,
        and ffn / tp of the MLP."""
        if hasattr(self, "moe"):  # (the experts run whole on each tp rank; expert parallel splits them)
            require_divisible(tp, "the Llama", n_heads=self.n_heads, n_kv_heads=self.kv_heads)
            return {"wq": Split.COLUMNS, "wk": Split.COLUMNS, "wv": Split.COLUMNS, "wo": Split.ROWS}
        require_divisible(tp, "the Llama", n_heads=self.n_heads, n_kv_heads=self.kv_heads,
                          d_ff=self.w_gate.out_features)
        return {"wq": Split.COLUMNS, "wk": Split.COLUMNS, "wv": Split.COLUMNS, "wo": Split.ROWS,
                "w_gate": Split.COLUMNS, "w_up": Split.COLUMNS, "w_down": Split.ROWS,
                "attn_norm": Split.SEQUENCE, "ffn_norm": Split.SEQUENCE}

    def expert_parallel_plan(self) -> list[str]:
        """The submodules holding experts (runtime/expert_parallel.py)."""
        return ["moe.experts"] if hasattr(self, "moe") else []

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
        """(b, t, d) -> (b, t, d), causal; or (hidden, positions) -> the same pair, RoPE at each token's position
        in its document and attention within documents."""
        if isinstance(x, tuple):
            h, positions = x  # positions (b, t)
            mask = document_mask(positions)  # (b, 1, t, t)
            out = self._block(h, positions[:, None], lambda q, k, v: self._attention(q, k, v, attn_mask=mask))
            return out, positions
        return self._block(x, None, lambda q, k, v: self._attention(q, k, v, is_causal=True))

    def forward_cached(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Generation (kv_cache.py): RoPE at each token's own position; the cache keeps the kv_heads."""
        def attend(q, k, v):
            k, v = cache.update(k, v)  # (b, kv_heads, T, hd)
            return self._attention(q, k, v, attn_mask=cache.attn_mask)

        return self._block(x, cache.positions[:, None], attend)  # positions (b, 1, t): per sequence

    def _attention(self, q, k, v, **sdpa) -> torch.Tensor:
        repeat = self.n_heads // self.kv_heads  # each key/value head serves `repeat` query heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, **sdpa)  # (b, heads, t, hd)

    def _block(self, x: torch.Tensor, positions: torch.Tensor | None, attend) -> torch.Tensor:
        """`positions` None: 0 .. t - 1."""
        h = self.attn_norm(x)  # (whole: under sequence parallelism x is this rank's part of the sequence)
        b, t, _ = h.shape
        if positions is None:
            positions = torch.arange(t, device=h.device)  # (t,)
        # this rank's heads (n_heads / tp and kv_heads / tp under tensor parallel)
        q = self.wq(h).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, heads, t, hd)
        k = self.wk(h).view(b, t, -1, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, hd)
        v = self.wv(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        angles = positions.float()[..., None] * self.inv_freq.float()  # (..., t, hd/2)
        cos, sin = (f(torch.cat([angles, angles], dim=-1)).to(q.dtype) for f in (torch.cos, torch.sin))  # (..., t, hd)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = attend(q, k, v)  # (b, heads, t, hd)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        if hasattr(self, "moe"):
            return x + self.moe(h)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))  # (b, t, d)


class Head(nn.Module):
    """Final RMSNorm and the vocabulary projection: (b, t, d) -> (b, t, vocab)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.n_layers = cfg.n_layers

    def init_weights(self) -> None:
        init_normal(self, self.n_layers, RESIDUAL)

    def tensor_parallel_plan(self, tp: int) -> dict[str, Split]:
        require_divisible(tp, "the Llama", vocab_size=vocabulary_rows(self.proj))
        return {"proj": Split.HEAD, "norm": Split.SEQUENCE}

    def vocabulary_parallel_plan(self) -> str:
        """The projection vocabulary parallelism splits over the pipeline ranks (applied last in forward)."""
        return "proj"

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.proj(self.norm(x[0] if isinstance(x, tuple) else x))

    def forward_cached(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Generation: the logits of the last position only, (b, 1, vocab)."""
        return self.forward(x[:, -1:])


def build_llama(cfg: LlamaConfig) -> list[nn.Module]:
    """[Embedding, Block x n_layers, Head] (seed torch before calling; or build under torch.device("meta")
    and let a Pipeline initialize each rank's layers with `init_weights()`)."""
    return assemble(Embedding(cfg), [Block(cfg) for _ in range(cfg.n_layers)], Head(cfg), tie=cfg.tie_embeddings)


def flops_per_token(cfg: LlamaConfig) -> float:
    """Training FLOPs per token, by pipetrain.flops's convention (the planner's): q, o, grouped k, v and the
    gated MLP's three matmuls per block, attention in full, the head."""
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    ffn = 3 * d * cfg.ffn if not cfg.n_experts else 3 * d * cfg.expert_ffn * cfg.top_k + d * cfg.n_experts  # active
    return training_flops_per_token(layers=cfg.n_layers, matmul_params=2 * d * d + 2 * d * kv + ffn,
                                    seq=cfg.seq_len, hidden=d, vocab=cfg.vocab_size)


def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
