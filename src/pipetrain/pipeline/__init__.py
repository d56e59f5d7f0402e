"""The Pipeline: the user-facing object that turns layers, a schedule and a loss into `step()`.

`pipeline.Pipeline` validates its arguments (`checks`), splits the layers (`balance`, with costs from
`profile`, measured once on rank 0 and shared by `rank0_measure`), chooses a schedule and split when asked
(`auto_plan`), gives meta-device layers storage for this rank's stages only (`materialize`), places the
stages and hands them to one `runtime.Executor`. It may import `runtime`, `generation`, `schedule` and
torch, never `train` or the command line.
"""
