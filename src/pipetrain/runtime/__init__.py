"""The runtime: what one rank does while a step runs.

`executor.Executor` runs one rank's lowered action list over a `comm.Transport` (torch.distributed P2P on
any backend, or in-process threads for tests); `stage.Stage` holds a stage's layers and runs F, B, I and W
(with `split_backward` and `deferred_linear` for I/W); `values` packs what travels between stages;
`ties`, `data_parallel` (with `zero` for sharded replicas and `gradient_buffer` for the buffers they reduce)
and `window` sum and normalize gradients across ranks, replicas and accumulation steps; `tensor_parallel`
splits a stage's layers over tp ranks (and `cross_entropy` computes a loss from their vocabulary parts);
`aux_loss` and `host_memory` serve the stages. It may import `pipetrain.schedule` (the actions and
their dependencies) and torch, never the pipeline, generation or training wings above it.
"""
