"""Generation on the training pipeline's own stages, for evaluation and reinforcement learning.

`passes` computes generation's passes on one rank (prefill in pieces, then one token per round, a KV cache
per stage and group of sequences); they are the P/D actions of a circulation schedule (`schedule`), which
the runtime's executor runs and moves between ranks, and `pipeline` puts the two together. `kv_cache` is
the cache protocol a layer implements (`forward_cached(x, cache)`), and `sampling` picks each next token.
It may import `schedule` and torch, never `runtime`, `pipeline`, `train` or the command line.
"""
