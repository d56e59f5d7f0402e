"""pipetrain: pipeline-parallel training for PyTorch with schedules as data and exact gradients."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import schedule as schedules
from .partition import BalanceError, partition, rank_partition
from .schedule import Action, Costs, Op, Schedule, ScheduleError, SimResult, Timeline, simulate

__version__ = "0.1.0"

# torch-dependent names load on first use, so `pipetrain.schedule` and `pipetrain simulate` stay torch-free
_LAZY = {
    "Pipeline": "pipetrain.pipeline",
    "Trainer": "pipetrain.trainer",
    "TrainConfig": "pipetrain.config",
    "ConfigError": "pipetrain.config",
    "trainer_from_config": "pipetrain.runs",
    "add_aux_loss": "pipetrain.aux_loss",
    "collect_aux_losses": "pipetrain.aux_loss",
    "BadValueError": "pipetrain.values",
    "CommError": "pipetrain.comm",
    "DistTransport": "pipetrain.comm",
    "InProcessHub": "pipetrain.comm",
    "InProcessTransport": "pipetrain.comm",
}

if TYPE_CHECKING:
    from .aux_loss import add_aux_loss, collect_aux_losses
    from .comm import CommError, DistTransport, InProcessHub, InProcessTransport
    from .config import ConfigError, TrainConfig
    from .pipeline import Pipeline
    from .runs import trainer_from_config
    from .trainer import Trainer
    from .values import BadValueError


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipetrain' has no attribute {name!r}")


__all__ = [
    "Action", "BadValueError", "BalanceError", "CommError", "ConfigError", "Costs", "DistTransport", "InProcessHub",
    "InProcessTransport", "Op", "Pipeline", "Schedule", "ScheduleError", "SimResult", "Timeline", "TrainConfig",
    "Trainer", "add_aux_loss", "collect_aux_losses", "partition", "rank_partition", "schedules", "simulate",
    "trainer_from_config",
]
