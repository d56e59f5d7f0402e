"""Schedules as data (pure Python, no torch): generators, checker, lowering, simulator, text forms."""

from . import dualpipe, gpipe, interleaved, onefoneb, zb_auto, zero_bubble  # noqa: F401  (registers the generators)
from .actions import Action, Op
from .base import Schedule, ScheduleError, format_table
from .check import check
from .io import (
    chrome_trace,
    dumps_csv,
    format_timeline,
    load_csv,
    load_timeline,
    loads_csv,
    save_chrome_trace,
    save_csv,
    save_timeline,
)
from .lowering import lower
from .registry import build, names, register
from .simulate import Costs, SimResult, simulate
from .timeline import Event, RankStats, Timeline

__all__ = [
    "Action", "Costs", "Event", "Op", "RankStats", "Schedule", "ScheduleError", "SimResult", "Timeline",
    "build", "check", "chrome_trace", "dumps_csv", "format_table", "format_timeline", "load_csv", "load_timeline",
    "loads_csv", "lower", "names", "register", "save_chrome_trace", "save_csv", "save_timeline", "simulate",
]
