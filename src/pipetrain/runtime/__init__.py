"""The runtime: what one rank does while a step runs.

`executor.Executor` runs one rank's lowered action list over a `comm.Transport` (torch.distributed P2P on
any backend, or in-process threads for tests); `stage.Stage` holds a stage's layers and runs F, B, I and W
(with `split_backward` and `deferred_linear` for I/W); `values` packs what travels between stages;
`ties`, `data_parallel` and `window` sum and normalize gradients across ranks, replicas and accumulation
steps; `aux_loss` and `host_memory` serve the stages. It may import `pipetrain.schedule` (the actions and
their dependencies) and torch, never the pipeline, generation or training wings above it.
"""
