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
    and an MLP (gated, as in Llama, or plain GELU), token embedding in front, norm + head at the end.

    A mixture of experts (`experts` > 0): each block's MLP is `experts` routed experts of hidden size
    `expert_ffn`, `top_k` per token, plus `shared_experts` every token runs and a router; the first
    `dense_layers` blocks keep a dense MLP of `ffn` (DeepSeek-V3: 3). `attention_params` overrides the
    attention's matmul weights per block (multi-head latent attention has its own shapes)."""

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
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_experts: int = 0
    dense_layers: int = 0
    attention_params: int | None = None

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def _attention(self) -> int:
        h, kv_dim = self.hidden, self.kv * self.head_dim
        return self.attention_params or h * (h + 2 * kv_dim) + h * h

    def _mlp(self, width: int) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * width

    def _moe_blocks(self) -> int:
        return self.layers - self.dense_layers if self.moe else 0

    def layer_expert_params(self) -> float:
        """The routed experts' weights per block, averaged over the blocks (split by expert parallel)."""
        return self._moe_blocks() * self.experts * self._mlp(self.expert_ffn) / self.layers

    def layer_params(self) -> float:
        """Parameters of one block, averaged over the blocks (weights; biases and norms are negligible and
        counted): with experts, all of them (`layer_expert_params` of which are routed experts)."""
        dense = (self.layers - self._moe_blocks()) * self._mlp(self.ffn)
        shared = self._moe_blocks() * (self.shared_experts * self._mlp(self.expert_ffn) + self.hidden * self.experts)
        return self._attention() + (dense + shared) / self.layers + self.layer_expert_params() + 4 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def table_params(self) -> int:
        """The embedding's and the head's weights (one table if they are tied)."""
        return self.embedding_params() * (1 if self.tied_embeddings else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.table_params() + self.hidden

    def layer_forward_flops(self, tokens: int) -> float:
        """Forward FLOPs of one block for `tokens` tokens of sequences of length `seq` (pipetrain.flops)."""
        return tokens * block_forward_flops(matmul_params=self.layer_matmul_params(), seq=self.seq, hidden=self.hidden)

    def head_forward_flops(self, tokens: int) -> float:
        return tokens * head_forward_flops(vocab=self.vocab, hidden=self.hidden)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), the numerator of MFU (pipetrain.flops)."""
        return training_flops_per_token(layers=self.layers, matmul_params=self.layer_matmul_params(), seq=self.seq,
                                        hidden=self.hidden, vocab=self.vocab)

    def layer_matmul_params(self) -> float:
        """The matmul weights one token goes through in a block (averaged over the blocks): all of them in a
        dense model; the attention, router, shared and top_k routed experts of an MoE (its active weights)."""
        if not self.moe:
            return self.layer_params() - 4 * self.hidden
        routed = self.layer_expert_params() * self.top_k / self.experts
        return self.layer_params() - 4 * self.hidden - self.layer_expert_params() + routed

    def active_params(self) -> float:
        """Parameters one token goes through (an MoE's "activated" count; all of a dense model's)."""
        return self.params() - self.layers * (self.layer_params() - 4 * self.hidden - self.layer_matmul_params())

    def layer_activation_bytes(self, tokens: int, tp: int, recompute: bool, sequence_parallel: bool = True) -> float:
        """Activations one block keeps per microbatch from F until its backward, in bf16 (averaged over the
        blocks): 34 bytes per token and hidden unit with flash attention and sequence parallelism over `tp`
        (Korthikanti et al. 2022, without the s^2 score term), 10 + 24 / tp without it (norms, residuals and
        dropout whole on every tp rank); with full recomputation only the block input (2 bytes per token and
        hidden unit, split by sequence or not) stays. An MoE block keeps `moe_mlp_activation_bytes` in place
        of its MLP's 19 (split by tp or not: 3 + 16 / tp)."""
        split = tp if sequence_parallel else 1
        if recompute:
            return 2.0 * tokens * self.hidden / split
        dense = (34.0 / tp if sequence_parallel else 10.0 + 24.0 / tp) * tokens * self.hidden
        if not self.moe:
            return dense
        mlp = (19.0 / tp if sequence_parallel else 3.0 + 16.0 / tp) * tokens * self.hidden
        moe = dense - mlp + self.moe_mlp_activation_bytes(tokens)
        return (self.dense_layers * dense + self._moe_blocks() * moe) / self.layers

    def moe_mlp_activation_bytes(self, tokens: int) -> float:
        """What an MoE block's MLP keeps for its backward, bf16, whole on every tp rank (the runtime runs the
        experts whole there): its input (2 bytes per hidden unit); per routed pair the token sent, received,
        its expert's output and the combined copy (4 x 2); per expert run (top_k routed and the shared ones)
        the gated MLP's gate and up, the activation and the product (4 x 2 per expert hidden unit); the
        router's logits and probabilities (fp32)."""
        h = self.hidden
        per_token = 2 * h + 8 * h * self.top_k + 8 * self.expert_ffn * (self.top_k + self.shared_experts)
        return tokens * (per_token + 8 * self.experts)

    def layer_moe_forward_flops(self, tokens: int) -> float:
        """Forward FLOPs of one block's MoE MLP (router, shared and top_k routed experts), averaged over the
        blocks: what tensor parallelism does not split (the runtime runs the experts whole on each tp rank)."""
        if not self.moe:
            return 0.0
        active = self.top_k + self.shared_experts
        per_block = 2 * (active * self._mlp(self.expert_ffn) + self.hidden * self.experts)
        return tokens * per_block * self._moe_blocks() / self.layers


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
    # DeepSeek-V3 (DeepSeek-AI 2024, config_671B.json): 61 blocks, the first 3 dense (ffn 18432), then 256 routed
    # experts (top 8) of 2048 and one shared; multi-head latent attention (q rank 1536, kv rank 512, 128 heads of
    # 128 + 64 rope dims): 187.1M weights per block; batch 15360 x 4096 tokens; 671B parameters, 37B active
    # (the multi-token-prediction module is left out)
    "deepseek-v3": ModelSpec("deepseek-v3", 61, 7168, 128, 18432, 129280, 4096, global_batch=15360, experts=256,
                             top_k=8, expert_ffn=2048, shared_experts=1, dense_layers=3,
                             attention_params=7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
                             + 128 * 128 * 7168),
    # a Grok-like MoE (Grok-1's open weights: 64 blocks, h 6144, 48 heads with 8 KV heads, 8 experts of 32768,
    # top 2; 314B parameters); the batch is ours
    "grok-moe": ModelSpec("grok-moe", 64, 6144, 48, 32768, 131072, 8192, kv_heads=8, global_batch=1024, experts=8,
                          top_k=2, expert_ffn=32768),
    # Qwen3-235B-A22B: 94 blocks, h 4096, 64 heads of 128 (4 KV heads), 128 experts of 1536, top 8; batch 2048
    # (Megatron-Core's MoE model zoo runs it so on 256 H100)
    "qwen3-235b-a22b": ModelSpec("qwen3-235b-a22b", 94, 4096, 64, 12288, 151936, 4096, kv_heads=4, global_batch=2048,
                                 experts=128, top_k=8, expert_ffn=1536,
                                 attention_params=4096 * 64 * 128 * 2 + 2 * 4096 * 4 * 128),
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
    # H800 (DeepSeek-V3's 2048): H100's compute and memory, NVLink cut to 160 GB/s per direction as DeepSeek
    # reports it, one 400 Gb/s InfiniBand NIC per GPU (50 GB/s)
    "h800-2k": ClusterSpec("h800-2k", 2048, {"bf16": 989 * _T, "fp32": 67 * _T}, 80 * _G, 8, 160 * _G, 50 * _G,
                           achievable=0.75, notes="H800 SXM, 8 per node (NVLink 160 GB/s), 400 Gb/s IB per GPU"),
    # GB300 NVL72: ~2.5 PFLOP/s dense bf16 and 288 GB per GPU, 72 per NVLink domain at 900 GB/s per
    # direction, one 800 Gb/s NIC per GPU; achievable 0.7 (assumed, as for H100 at launch)
    "gb300-220k": ClusterSpec("gb300-220k", 220_000, {"bf16": 2500 * _T, "fp32": 80 * _T}, 288 * _G, 72,
                              900 * _G, 100 * _G, notes="GB300 NVL72 racks, one 800 Gb/s NIC per GPU"),
}
