"""One FLOP convention, shared by the reference models (a Trainer's MFU) and the planner.

Per token, a transformer block's forward costs 2 FLOPs per multiply-add of each matmul weight, plus its
attention's scores and weighted values, 2 x 2 x seq x hidden, counted in full (not halved for causal
masking: the accounting of Megatron-LM's and Llama 3's MFU, and PaLM's appendix B). The head adds
2 x vocab x hidden; embeddings, norms and the loss count nothing. Training is 3 x the forward (the backward
is two matmuls per forward matmul); recomputation is hardware FLOPs (HFU), not model FLOPs.
"""

from __future__ import annotations


def block_forward_flops(*, matmul_params: int, seq: int, hidden: int) -> float:
    """Forward FLOPs of one block for one token of a sequence of `seq` tokens."""
    return 2.0 * matmul_params + 2.0 * 2.0 * seq * hidden


def head_forward_flops(*, vocab: int, hidden: int) -> float:
    """Forward FLOPs of the output projection for one token."""
    return 2.0 * vocab * hidden


def training_flops_per_token(*, layers: int, matmul_params: int, seq: int, hidden: int, vocab: int) -> float:
    """Model FLOPs of one token's forward and backward through `layers` blocks and the head: MFU's numerator."""
    forward = layers * block_forward_flops(matmul_params=matmul_params, seq=seq, hidden=hidden)
    return 3.0 * (forward + head_forward_flops(vocab=vocab, hidden=hidden))
