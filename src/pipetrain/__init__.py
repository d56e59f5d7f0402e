"""pipetrain: pipeline-parallel training for PyTorch with schedules as data and exact gradients."""

from . import schedule as schedules
from .comm import CommError, DistTransport, InProcessHub, InProcessTransport
from .partition import BalanceError, partition
from .pipeline import Pipeline
from .schedule import Action, Costs, Op, Schedule, ScheduleError, SimResult, Timeline, simulate

__version__ = "0.1.0"

__all__ = [
    "Action", "BalanceError", "CommError", "Costs", "DistTransport", "InProcessHub", "InProcessTransport", "Op",
    "Pipeline", "Schedule", "ScheduleError", "SimResult", "Timeline", "partition", "schedules", "simulate",
]
