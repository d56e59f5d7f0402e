"""Generation on the training pipeline's own stages, for evaluation and reinforcement learning.

`generate` circulates groups of sequences through the stages (prefill in pieces, then one token per
pass), `wire` packs its messages between ranks, `kv_cache` is the cache protocol a layer implements
(`forward_cached(x, cache)`), and `sampling` picks each next token. It may import `runtime`, `schedule`
and torch, never `pipeline`, `train` or the command line.
"""
