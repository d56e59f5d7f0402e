"""Schedules and timelines as text: an ASCII timeline, CSV dump/load, Chrome traces, timeline JSON (the rank x
step table, `format_table`, lives beside Schedule in base.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .actions import Action
from .base import Schedule
from .placement import looped
from .timeline import Event, Timeline


def format_timeline(timeline, *, unit: float = 1.0, num_ranks: int | None = None) -> str:
    """Draw a timeline on a grid of `unit`-long cells: the action in its first cell, `=` after, `.` idle."""
    n = num_ranks if num_ranks is not None else timeline.num_ranks
    rows: list[dict[int, str]] = [{} for _ in range(n)]
    width = 3
    for e in timeline.events:
        if not e.action.op.is_compute:  # (postings and collectives run beside the compute: not drawn)
            continue
        first, last = round(e.start / unit), round(e.end / unit)
        label = str(e.action)
        if e.action.paired and first in rows[e.rank]:  # an overlapped pair: one block, `0B0+0F2`
            label = rows[e.rank][first] + label
        width = max(width, len(label))
        for cell in range(first, max(last, first + 1)):
            rows[e.rank][cell] = label if cell == first else "="
    length = max((max(r) + 1 for r in rows if r), default=0)
    return "\n".join(
        f"rank {rank:>2}: " + " ".join(row.get(c, ".").center(width) for c in range(length)).rstrip()
        for rank, row in enumerate(rows))


def dumps_csv(schedule: Schedule) -> str:
    """A header comment with the schedule's shape, then one row per rank: `rank,action,action,...`."""
    header = (f"# name={schedule.name} ranks={schedule.num_ranks} microbatches={schedule.num_microbatches} "
              f"stages_per_rank={schedule.stages_per_rank} lowered={int(schedule.lowered)} "
              f"stage_to_rank={'/'.join(map(str, schedule.stage_to_rank))}")
    rows = [",".join([str(rank)] + [str(a) for a in acts]) for rank, acts in enumerate(schedule.actions)]
    return "\n".join([header, *rows]) + "\n"


def loads_csv(text: str) -> Schedule:
    """Parse `dumps_csv` output. Without a header, infer looped placement from the actions."""
    meta: dict[str, str] = {}
    actions: dict[int, list[Action]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            meta.update(item.split("=", 1) for item in line[1:].split() if "=" in item)
            continue
        rank_text, *cells = line.split(",")
        try:
            actions[int(rank_text)] = [Action.parse(c) for c in cells if c.strip()]
        except ValueError as err:
            raise ValueError(f"line {lineno}: {err}") from None
    num_ranks = int(meta.get("ranks", len(actions)))
    if sorted(actions) != list(range(num_ranks)):
        raise ValueError(f"expected one row for each rank 0..{num_ranks - 1}, got rows {sorted(actions)}")
    all_actions = [a for acts in actions.values() for a in acts]
    per_rank = int(meta.get("stages_per_rank", 1))
    placement = (tuple(int(x) for x in meta["stage_to_rank"].split("/")) if "stage_to_rank" in meta
                 else looped(num_ranks, per_rank))
    return Schedule(
        name=meta.get("name", "custom"),
        num_ranks=num_ranks,
        num_microbatches=int(meta.get("microbatches", 1 + max((a.mb for a in all_actions), default=0))),
        stages_per_rank=per_rank,
        stage_to_rank=placement,
        actions=[actions[r] for r in range(num_ranks)],
        lowered=meta.get("lowered", "0") == "1" or any(a.op.is_comm for a in all_actions),
    )


def save_csv(schedule: Schedule, path: str | Path) -> None:
    Path(path).write_text(dumps_csv(schedule))


def load_csv(path: str | Path) -> Schedule:
    return loads_csv(Path(path).read_text())


def timeline_to_json(timeline: Timeline, schedule: Schedule | None = None) -> dict:
    """A JSON-ready dict: events, waits and exposed all-to-all waits as [rank, action, start, end], plus the
    schedule as CSV."""
    out = {
        "num_ranks": timeline.num_ranks,
        "events": [[e.rank, str(e.action), e.start, e.end] for e in timeline.events],
        "waits": [[e.rank, str(e.action), e.start, e.end] for e in timeline.waits],
        "all_to_all": [[e.rank, str(e.action), e.start, e.end] for e in timeline.all_to_all],
        "step_times": list(timeline.step_times) if timeline.step_times is not None else None,
    }
    if schedule is not None:
        out["schedule"] = dumps_csv(schedule.compute_only())
    return out


def timeline_from_json(data: dict) -> tuple[Timeline, Schedule | None]:
    def events(rows):
        return tuple(Event(int(r), Action.parse(a), float(s), float(e)) for r, a, s, e in rows)

    timeline = Timeline(int(data["num_ranks"]), events(data["events"]), events(data.get("waits", [])),
                        tuple(data["step_times"]) if data.get("step_times") is not None else None,
                        events(data.get("all_to_all", [])))
    return timeline, (loads_csv(data["schedule"]) if data.get("schedule") else None)


def save_timeline(timeline: Timeline | list[Timeline], path: str | Path, schedule: Schedule | None = None) -> None:
    """Write one timeline, or several steps' (as {"steps": [...], "schedule": ...}), as JSON."""
    if isinstance(timeline, Timeline):
        data = timeline_to_json(timeline, schedule)
    else:
        data = {"steps": [timeline_to_json(t) for t in timeline]}
        if schedule is not None:
            data["schedule"] = dumps_csv(schedule.compute_only())
    Path(path).write_text(json.dumps(data))


def load_timeline(path: str | Path) -> tuple[Timeline | list[Timeline], Schedule | None]:
    """Read `save_timeline` output: (timeline or list of step timelines, schedule or None). Raises
    FileNotFoundError or ValueError with one line saying what the file is and what to give instead."""
    wanted = "give a timeline JSON written by save_timeline (e.g. timeline.json of the example's --trace-dir)"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file; {wanted}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err}); {wanted}") from None
    if isinstance(data, dict) and "traceEvents" in data:
        raise ValueError(f"{path} is a Chrome/Perfetto trace, written for viewing, which holds no schedule; {wanted}")
    if not isinstance(data, dict) or not ("steps" in data or "num_ranks" in data):
        raise ValueError(f"{path} is JSON but not a timeline (no 'num_ranks' or 'steps'); {wanted}")
    schedule = loads_csv(data["schedule"]) if data.get("schedule") else None
    if "steps" in data:
        return [timeline_from_json(step)[0] for step in data["steps"]], schedule
    return timeline_from_json(data)[0], schedule


def chrome_trace(timeline: Timeline, *, time_unit: float = 1.0) -> dict:
    """Chrome / Perfetto trace events (open in chrome://tracing or ui.perfetto.dev): one row per rank.

    `time_unit` is the length of one timeline unit in seconds (1.0 for measured timelines).
    """
    scale = time_unit * 1e6  # trace timestamps are microseconds
    trace = [{"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}}
             for r in range(timeline.num_ranks)]
    for e in timeline.events:
        trace.append({"name": str(e.action), "cat": e.action.op.name, "ph": "X", "pid": e.rank,
                      "tid": 0 if e.action.op.is_compute else 3 if e.action.op.is_collective else 2,
                      "ts": e.start * scale, "dur": (e.end - e.start) * scale,
                      "args": {"stage": e.action.stage, "microbatch": e.action.mb}})
    for e in timeline.waits:
        trace.append({"name": f"wait ({e.action})", "cat": "wait", "ph": "X", "pid": e.rank, "tid": 1,
                      "ts": e.start * scale, "dur": (e.end - e.start) * scale})
    for e in timeline.all_to_all:
        trace.append({"name": f"all-to-all wait ({e.action})", "cat": "all-to-all", "ph": "X", "pid": e.rank,
                      "tid": 4, "ts": e.start * scale, "dur": (e.end - e.start) * scale})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def save_chrome_trace(timeline: Timeline, path: str | Path, *, time_unit: float = 1.0) -> None:
    Path(path).write_text(json.dumps(chrome_trace(timeline, time_unit=time_unit)))
