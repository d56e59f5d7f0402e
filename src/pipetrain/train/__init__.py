"""Training as an application: the Trainer and what a real run needs around a Pipeline.

`trainer.Trainer` runs the optimizer, learning-rate schedule, gradient clipping, evaluation, logging
(`report`, `metrics`) and checkpoints (`checkpoint`) over a Pipeline; `config.TrainConfig` is the run's
settings, checked; `runs` builds a Trainer from a config (a preset or a Hugging Face model); `data`
and `loader` read the corpus and share batches. It may import every wing below it (`pipeline`,
`generation`, `runtime`, `schedule`, `models`, `planner`); only the command line imports it.
"""
