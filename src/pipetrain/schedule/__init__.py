"""Schedules as data, in pure Python: the ground floor every wing stands on.

`actions` defines an action (`1F0`, generation's `1D3@7`) and, once, the dependencies between actions; `base`
the per-rank action lists (`Schedule`); the generators (gpipe, onefoneb, interleaved, zero_bubble, dualpipe,
zb_auto) register by name in `registry`, with the sizes each takes, and `circulation` builds generation's
schedule; `collectives` places a stage's data-parallel REDUCE / GATHER; `vocabulary` vocabulary parallelism's
S / T passes; `lowering` adds the transfers, `overlap` pairs forwards with backwards to run together, `check`
proves a schedule runnable, `simulate` times it, `choose` ranks schedules for measured costs, `partition` splits
layers by cost, `io`/`timeline`/`compare` write, read and compare timelines. It imports nothing outside itself:
no torch, no other wing (import-linter checks it).
"""

from . import dualpipe, gpipe, interleaved, onefoneb, zb_auto, zero_bubble  # noqa: F401  (registers the generators)
from .actions import Action, Op
from .base import Schedule, ScheduleError, format_table
from .check import check
from .circulation import circulation
from .collectives import with_collectives
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
from .overlap import overlap
from .registry import build, names, register
from .simulate import Costs, SimResult, simulate
from .timeline import Event, RankStats, Timeline
from .vocabulary import with_vocabulary

__all__ = [
    "Action", "Costs", "Event", "Op", "RankStats", "Schedule", "ScheduleError", "SimResult", "Timeline",
    "build", "check", "chrome_trace", "circulation", "dumps_csv", "format_table", "format_timeline", "load_csv",
    "load_timeline", "loads_csv", "lower", "names", "overlap", "register", "save_chrome_trace", "save_csv",
    "save_timeline", "simulate", "with_collectives", "with_vocabulary",
]
