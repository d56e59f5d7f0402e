"""What the planner plans for: a model's shape and a cluster's hardware, as presets or TOML files.

Units are SI throughout: FLOP/s, bytes, bytes/s (per direction, per device), seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..flops import block_forward_flops, head_forward_flops, training_flops_per_token


class SpecError(ValueError):
    """A model or cluster description that cannot be used; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer: `layers` blocks of attention (grouped-query when kv_heads < heads)
    and an MLP (gated, as in Llama, or plain GELU), token embedding in front, norm + head at the end."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    kv_heads: int | None = None  # default: heads (multi-head attention)
    gated_mlp: bool = True  # three ffn matrices (SwiGLU) instead of two
    global_batch: int = 1024  # sequences per optimizer step
    tied_embeddings: bool = False

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """Parameters of one transformer block (weights; biases and norms are negligible and counted)."""
        h, kv_dim = self.hidden, self.kv * self.head_dim
        attention = h * (h + 2 * kv_dim) + h * h
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn
        return attention + mlp + 4 * h

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * self.layer_params() + self.embedding_params() + head + self.hidden

    def layer_forward_flops(self, tokens: int) -> float:
        """Forward FLOPs of one block for `tokens` tokens of sequences of length `seq` (pipetrain.flops)."""
        return tokens * block_forward_flops(matmul_params=self.layer_matmul_params(), seq=self.seq, hidden=self.hidden)

    def head_forward_flops(self, tokens: int) -> float:
        return tokens * head_forward_flops(vocab=self.vocab, hidden=self.hidden)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), the numerator of MFU (pipetrain.flops)."""
        return training_flops_per_token(layers=self.layers, matmul_params=self.layer_matmul_params(), seq=self.seq,
                                        hidden=self.hidden, vocab=self.vocab)

    def layer_matmul_params(self) -> int:
        """The matmul weights of one block (its parameters without the norms' 4 x hidden)."""
        return self.layer_params() - 4 * self.hidden

    def layer_activation_bytes(self, tokens: int, tp: int, recompute: bool, sequence_parallel: bool = True) -> float:
        """Activations one block keeps per microbatch from F until its backward, in bf16:
        34 bytes per token and hidden unit with flash attention and sequence parallelism over `tp`
        (Korthikanti et al. 2022, without the s^2 score term), 10 + 24 / tp without it (norms, residuals and
        dropout whole on every tp rank); with full recomputation only the block input (2 bytes per token and
        hidden unit, split by sequence or not) stays."""
        split = tp if sequence_parallel else 1
        if recompute:
            return 2.0 * tokens * self.hidden / split
        return (34.0 / tp if sequence_parallel else 10.0 + 24.0 / tp) * tokens * self.hidden


@dataclass(frozen=True)
class ClusterSpec:
    """Identical devices; `domain` of them share a fast interconnect (NVLink / NVL72), the rest talk over
    one NIC per device. `achievable` is the fraction of `peak_flops` dense matmuls reach in practice."""

    name: str
    devices: int
    peak_flops: dict[str, float]  # by dtype: "bf16", "fp32", ...
    memory: float  # bytes per device
    domain: int  # devices per fast domain
    domain_bandwidth: float  # bytes/s per device, one direction
    nic_bandwidth: float  # bytes/s per device, one direction
    nic_latency: float = 5e-6
    domain_latency: float = 2e-6
    achievable: float = 0.7
    memory_reserved: float = 0.1  # fraction of memory kept free (allocator, buffers, fragmentation)
    dtype: str = "bf16"
    notes: str = ""
    backend: str = "nccl"  # torch.distributed's: gloo's reduce-scatter / all-gather copy the buffer (memory)

    @property
    def peak(self) -> float:
        return self.peak_flops[self.dtype]


_G, _T = 1e9, 1e12

MODELS: dict[str, ModelSpec] = {
    # the reference GPT (pipetrain.models.gpt): byte vocabulary, 4x GELU MLP, tiny batches
    "gpt-8x256": ModelSpec("gpt-8x256", 8, 256, 8, 1024, 256, 128, gated_mlp=False, global_batch=32),
    "gpt-16x512": ModelSpec("gpt-16x512", 16, 512, 8, 2048, 256, 128, gated_mlp=False, global_batch=32),
    # Llama 3 (Dubey et al. 2024): grouped-query attention with 8 KV heads, SwiGLU, 128k vocabulary
    "llama3-8b": ModelSpec("llama3-8b", 32, 4096, 32, 14336, 128256, 8192, kv_heads=8, global_batch=512),
    "llama3-70b": ModelSpec("llama3-70b", 80, 8192, 64, 28672, 128256, 8192, kv_heads=8, global_batch=1024),
    "llama3-405b": ModelSpec("llama3-405b", 126, 16384, 128, 53248, 128256, 8192, kv_heads=8, global_batch=2048),
    # Megatron-LM's 1T GPT (Narayanan et al. 2021, table 1): 128 layers, h = 25600, 160 heads, seq 2048
    "dense-1t": ModelSpec("dense-1t", 128, 25600, 160, 4 * 25600, 51200, 2048, gated_mlp=False, global_batch=3072),
    # a 10T dense configuration (ours): 12 L h^2 ~ 10T with h = 65536, L = 192
    "dense-10t": ModelSpec("dense-10t", 192, 65536, 512, 4 * 65536, 131072, 8192, gated_mlp=False,
                           global_batch=8192),
}

CLUSTERS: dict[str, ClusterSpec] = {
    # H100 SXM: 989 TFLOP/s dense bf16, 80 GB; 8 per NVLink node at 450 GB/s per direction; 400 Gb/s NIC each
    # achievable 0.75: large bf16 cuBLAS GEMMs on H100 SXM run at ~740 TFLOP/s
    "h100-16k": ClusterSpec("h100-16k", 16384, {"bf16": 989 * _T, "fp32": 67 * _T}, 80 * _G, 8, 450 * _G,
                            50 * _G, achievable=0.75, notes="H100 SXM, 8 per NVLink node, one 400 Gb/s NIC per GPU"),
    # A100 SXM: 312 TFLOP/s dense bf16, 80 GB; 8 per node at 300 GB/s; 8 x 200 Gb/s HDR per node (Selene);
    # achievable 0.8: large bf16 GEMMs run at ~250 TFLOP/s
    "a100-3k": ClusterSpec("a100-3k", 3072, {"bf16": 312 * _T, "fp32": 19.5 * _T}, 80 * _G, 8, 300 * _G, 25 * _G,
                           achievable=0.8, notes="A100 SXM 80 GB, 8 per node, 200 Gb/s HDR per GPU (Selene)"),
    # GB300 NVL72: ~2.5 PFLOP/s dense bf16 and 288 GB per GPU, 72 per NVLink domain at 900 GB/s per
    # direction, one 800 Gb/s NIC per GPU; achievable 0.7 (assumed, as for H100 at launch)
    "gb300-220k": ClusterSpec("gb300-220k", 220_000, {"bf16": 2500 * _T, "fp32": 80 * _T}, 288 * _G, 72,
                              900 * _G, 100 * _G, notes="GB300 NVL72 racks, one 800 Gb/s NIC per GPU"),
}
