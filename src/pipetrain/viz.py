"""Timeline pictures (PNG/SVG, needs matplotlib: `pip install pipetrain[viz]`): one row per rank."""

from __future__ import annotations

from pathlib import Path

from .schedule.actions import VOCABULARY, Op
from .schedule.timeline import Timeline

COLORS = {Op.F: "#4C78A8", Op.B: "#E45756", Op.I: "#F58518", Op.W: "#54A24B", Op.P: "#72B7B2", Op.D: "#B279A2",
          Op.REDUCE: "#9D755D", Op.GATHER: "#BAB0AC", Op.S: "#EECA3B", Op.T: "#9467BD", Op.E: "#FF9DA6",
          Op.G: "#8C564B"}
LABELS = {Op.F: "F forward", Op.B: "B backward", Op.I: "I input grad", Op.W: "W weight grad",
          Op.P: "P prefill pass", Op.D: "D decode pass", Op.REDUCE: "REDUCE gradients (dp)",
          Op.GATHER: "GATHER parameters (dp)", Op.S: "S vocabulary logits", Op.T: "T vocabulary backward",
          Op.E: "E vocabulary embedding", Op.G: "G vocabulary embedding grad"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("drawing timelines needs matplotlib: pip install 'pipetrain[viz]'") from err
    return plt


def draw(timeline: Timeline, ax, *, title: str = "", unit: str = "", label_blocks: bool = True) -> None:
    """Draw a timeline on a matplotlib axis: blocks coloured by op (a rank's later stages lighter),
    microbatch numbers, idle left blank, waits (measured timelines) as hatched slivers, an overlapped pair's two
    actions as half-height blocks one above the other, all-to-all waits nothing hid as dark slivers."""
    step = timeline.step_time() or 1.0
    local = {}  # (rank, stage) -> 0 for a rank's first stage, 1 for its second, ...: later stages lighter
    for r in range(timeline.num_ranks):
        for i, s in enumerate(sorted({e.action.stage for e in timeline.events
                                      if e.rank == r and e.action.op.is_compute
                                      and e.action.op._value_ not in VOCABULARY})):
            local[(r, s)] = i
    paired = {(e.rank, e.start) for e in timeline.events if e.action.paired}
    for e in timeline.events:
        y = timeline.num_ranks - 1 - e.rank
        if e.action.op.is_comm:  # posting a send or receive: a thin grey sliver on the rank's row
            ax.barh(y - 0.3, e.duration, left=e.start, height=0.2, color="#777777", linewidth=0)
            continue
        if e.action.op.is_collective:  # beside the compute: a thin band along the top of the rank's row
            ax.barh(y + 0.45, e.duration, left=e.start, height=0.1, color=COLORS[e.action.op], linewidth=0)
            continue
        alpha = 1.0 if local.get((e.rank, e.action.stage), 0) == 0 else 0.55  # (a vocabulary shard's: full)
        half = (e.rank, e.start) in paired  # an overlapped pair: its two actions share the row, one above the other
        offset = (-0.2 if e.action.paired else 0.2) if half else 0.0
        ax.barh(y + offset, e.duration, left=e.start, height=0.4 if half else 0.8, color=COLORS[e.action.op],
                alpha=alpha, edgecolor="white", linewidth=0.5)
        if label_blocks and e.duration > step / 60 and e.action.op.is_compute:
            ax.text(e.start + e.duration / 2, y + offset, str(e.action.mb), ha="center", va="center", fontsize=7,
                    color="white")
    for e in timeline.all_to_all:  # all-to-all waits nothing hid: a dark sliver along the bottom of the row
        ax.barh(timeline.num_ranks - 1 - e.rank - 0.35, e.duration, left=e.start, height=0.1, color="black",
                linewidth=0)
    _frame(ax, timeline, step, unit)
    stats = timeline.per_rank()
    bubble = sum(s.bubble_fraction for s in stats) / len(stats)
    ax.set_title(f"{title}  (step {step:.4g}{unit}, idle {bubble:.1%})".strip(), fontsize=10)


def _frame(ax, timeline: Timeline, end: float, unit: str) -> None:
    """What every timeline picture shares: waits as hatched slivers, a row per rank, the time axis."""
    for w in timeline.waits:
        y = timeline.num_ranks - 1 - w.rank
        ax.barh(y, w.duration, left=w.start, height=0.3, color="none", edgecolor="#999999", hatch="////",
                linewidth=0)
    ax.set_yticks(range(timeline.num_ranks), [f"rank {r}" for r in reversed(range(timeline.num_ranks))])
    ax.set_xlim(0, end)
    ax.set_xlabel(f"time{f' ({unit})' if unit else ''}")
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def save(timeline: Timeline, path: str | Path, *, title: str = "", unit: str = "") -> None:
    """Write one timeline picture; the format follows the suffix (.png, .svg, .pdf)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 0.55 * timeline.num_ranks + 1.4))
    draw(timeline, ax, title=title, unit=unit)
    _legend(fig, timeline)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def save_comparison(predicted: Timeline, measured: Timeline, path: str | Path, *, title: str = "") -> None:
    """Predicted (simulated with measured costs) above measured, on one time axis, in milliseconds."""
    plt = _pyplot()
    rows = predicted.num_ranks
    fig, axes = plt.subplots(2, 1, figsize=(12, 1.1 * rows + 2.4), sharex=True)
    draw(_scaled(predicted, 1e3), axes[0], title=f"{title} simulated".strip(), unit="ms")
    draw(_scaled(measured, 1e3), axes[1], title=f"{title} measured".strip(), unit="ms")
    end = max(predicted.step_time(), measured.step_time()) * 1e3
    axes[0].set_xlim(0, end)
    _legend(fig, measured)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _scaled(timeline: Timeline, factor: float) -> Timeline:
    from .schedule.timeline import Event

    def scale(events):
        return tuple(Event(e.rank, e.action, e.start * factor, e.end * factor) for e in events)

    steps = tuple(t * factor for t in timeline.step_times) if timeline.step_times is not None else None
    return Timeline(timeline.num_ranks, scale(timeline.events), scale(timeline.waits), steps,
                    scale(timeline.all_to_all))


def _legend(fig, timeline: Timeline) -> None:
    import matplotlib.patches as mpatches

    ops = sorted({e.action.op for e in timeline.events if not e.action.op.is_comm}, key=list(Op).index)
    handles = [mpatches.Patch(color=COLORS[op], label=LABELS[op]) for op in ops]
    if any(e.action.op.is_comm for e in timeline.events):
        handles.append(mpatches.Patch(color="#777777", label="posting send/recv"))
    if timeline.all_to_all:
        handles.append(mpatches.Patch(color="black", label="all-to-all wait (exposed)"))
    _legend_below(fig, handles, waits=bool(timeline.waits), bottom=0.06)


def _legend_below(fig, handles: list, *, waits: bool, bottom: float) -> None:
    import matplotlib.patches as mpatches

    if waits:
        handles = [*handles, mpatches.Patch(facecolor="none", edgecolor="#999999", hatch="////", label="waiting")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))


def save_generation(timeline: Timeline, path: str | Path, *, num_groups: int | None = None, title: str = "") -> None:
    """A generate call's measured timeline (`gather_timeline(of="generate")`), in milliseconds: one colour
    per group of sequences, each block labelled with its pass (0 is the group's prefill), waits hatched."""
    plt = _pyplot()
    import matplotlib.patches as mpatches

    timeline = _scaled(timeline, 1e3)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 0.55 * timeline.num_ranks + 1.6))
    end = timeline.step_time() or 1.0
    for e in timeline.events:
        if not e.action.op.is_compute:
            continue
        step, group = e.action.round, e.action.mb  # each pass: group mb's round through one stage
        y = timeline.num_ranks - 1 - e.rank
        ax.barh(y, e.duration, left=e.start, height=0.8, color=colors(group % 10), edgecolor="white", linewidth=0.5)
        if e.duration > end / 80:
            ax.text(e.start + e.duration / 2, y, str(step), ha="center", va="center", fontsize=6, color="white")
    _frame(ax, timeline, end, "ms")
    idle = " ".join(f"{s.bubble_fraction:.1%}" for s in timeline.per_rank())
    ax.set_title(f"{title}  ({end:.0f} ms, idle per rank {idle})".strip(), fontsize=10)
    if num_groups is None:
        num_groups = 1 + max((e.action.mb for e in timeline.events if e.action.op.is_compute), default=0)
    handles = [mpatches.Patch(color=colors(g % 10), label=f"group {g}") for g in range(min(num_groups, 10))]
    _legend_below(fig, handles, waits=True, bottom=0.07)
    fig.savefig(path, dpi=130)
    plt.close(fig)
