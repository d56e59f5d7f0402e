"""pipetrain: pipeline-parallel training for PyTorch with schedules as data and exact gradients."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import schedule as schedules
from .schedule import Action, Costs, Op, Schedule, ScheduleError, SimResult, Timeline, simulate
from .schedule.partition import BalanceError, partition, rank_partition

__version__ = "0.1.0"

# torch-dependent names load on first use, so `pipetrain.schedule` and `pipetrain simulate` stay torch-free
_LAZY = {
    "Pipeline": "pipetrain.pipeline.pipeline",
    "PipelinePlan": "pipetrain.pipeline.auto_plan",
    "plan_pipeline": "pipetrain.pipeline.auto_plan",
    "Trainer": "pipetrain.train.trainer",
    "TrainConfig": "pipetrain.train.config",
    "ConfigError": "pipetrain.train.config",
    "trainer_from_config": "pipetrain.train.runs",
    "add_aux_loss": "pipetrain.runtime.aux_loss",
    "collect_aux_losses": "pipetrain.runtime.aux_loss",
    "BadValueError": "pipetrain.runtime.values",
    "CommError": "pipetrain.runtime.comm",
    "CrossEntropy": "pipetrain.runtime.cross_entropy",
    "DistTransport": "pipetrain.runtime.dist_transport",
    "InProcessHub": "pipetrain.runtime.in_process",
    "InProcessTransport": "pipetrain.runtime.in_process",
    "Split": "pipetrain.runtime.tensor_parallel",
}

if TYPE_CHECKING:
    from . import data
    from .pipeline.auto_plan import PipelinePlan, plan_pipeline
    from .pipeline.pipeline import Pipeline
    from .runtime.aux_loss import add_aux_loss, collect_aux_losses
    from .runtime.comm import CommError
    from .runtime.cross_entropy import CrossEntropy
    from .runtime.dist_transport import DistTransport
    from .runtime.in_process import InProcessHub, InProcessTransport
    from .runtime.tensor_parallel import Split
    from .runtime.values import BadValueError
    from .train.config import ConfigError, TrainConfig
    from .train.runs import trainer_from_config
    from .train.trainer import Trainer


def __getattr__(name: str):
    if name == "data":  # pt.data: local text as training data (torch, numpy; datasets etc. when used)
        return importlib.import_module("pipetrain.data")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipetrain' has no attribute {name!r}")


__all__ = [
    "Action", "BadValueError", "BalanceError", "CommError", "ConfigError", "Costs", "CrossEntropy", "DistTransport",
    "InProcessHub", "InProcessTransport", "Op", "Pipeline", "PipelinePlan", "Schedule", "ScheduleError", "SimResult",
    "Split", "Timeline",
    "TrainConfig", "Trainer", "add_aux_loss", "collect_aux_losses", "partition", "plan_pipeline", "rank_partition",
    "schedules", "simulate", "trainer_from_config", "data",
]
