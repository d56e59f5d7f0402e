"""The Schedule: per-rank action lists plus the stage -> rank placement."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .actions import VOCABULARY, Action, Op

_FORWARD = (Op.F, Op.E, Op.S)  # what an evaluation runs


class ScheduleError(ValueError):
    """A schedule that would run wrong or hang; the message names the rank, the action and the fix."""


@dataclass(frozen=True)
class Schedule:
    """What every rank does in one training step, in order.

    `actions[rank]` is that rank's action list. A compute-only schedule holds F/B/I/W; its lowered
    form (see `lower`) adds the SEND/RECV actions the runtime executes. `stage_to_rank[stage]` is the
    rank that owns a stage; stage `s` of `num_stages` holds the s-th group of layers.
    """

    name: str
    num_ranks: int
    num_microbatches: int
    stages_per_rank: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    lowered: bool = False
    _stages_of: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _shards: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "actions", tuple(tuple(a) for a in self.actions))
        object.__setattr__(self, "stage_to_rank", tuple(self.stage_to_rank))
        stages_of: list[list[int]] = [[] for _ in range(self.num_ranks)]
        for stage, rank in enumerate(self.stage_to_rank):
            if 0 <= rank < self.num_ranks:
                stages_of[rank].append(stage)
        object.__setattr__(self, "_stages_of", tuple(tuple(s) for s in stages_of))
        vocabulary = any(a.op._value_ in VOCABULARY for acts in self.actions for a in acts)
        object.__setattr__(self, "_shards", self.num_ranks if vocabulary else 0)

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages a rank owns, in stage order."""
        return self._stages_of[rank]

    @property
    def vocabulary_shards(self) -> int:
        """How many vocabulary shards its S and T passes run (one per rank; 0: no vocabulary parallelism)."""
        return self._shards

    @property
    def has_backward(self) -> bool:
        return any(a.op in (Op.B, Op.I, Op.W) for acts in self.actions for a in acts)

    def compute_only(self) -> Schedule:
        """The same schedule without SEND/RECV actions (collectives stay)."""
        actions = tuple(tuple(a for a in acts if not a.op.is_comm) for acts in self.actions)
        return _replace(self, actions=actions, lowered=False)

    def forward_only(self) -> Schedule:
        """The forward actions alone (F, and E and S with vocabulary parallelism), in the same order: an
        evaluation schedule (no gradients)."""
        actions = tuple(tuple(Action(a.stage, a.op, a.mb) for a in acts if a.op in _FORWARD)  # (unpaired)
                        for acts in self.compute_only().actions)
        return _replace(self, name=f"{self.name}/forward", actions=actions, lowered=False)

    def __str__(self) -> str:
        return format_table(self)


def _replace(schedule: Schedule, **changes) -> Schedule:
    fields = dict(
        name=schedule.name,
        num_ranks=schedule.num_ranks,
        num_microbatches=schedule.num_microbatches,
        stages_per_rank=schedule.stages_per_rank,
        stage_to_rank=schedule.stage_to_rank,
        actions=schedule.actions,
        lowered=schedule.lowered,
    )
    fields.update(changes)
    return Schedule(**fields)


def format_table(schedule: Schedule, *, mark: Iterable[tuple[int, int]] = ()) -> str:
    """One row per rank, one column per step of that rank's list; marked cells get `<-- ERROR HERE`."""
    marks = set(mark)
    cells = [[str(a) for a in acts] for acts in schedule.actions]
    for rank, step in marks:
        if rank < len(cells) and step < len(cells[rank]):
            cells[rank][step] = f"*{cells[rank][step]}*"
    width = max((len(c) for row in cells for c in row), default=3)
    lines = [f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_microbatches} microbatches, "
             f"{schedule.stages_per_rank} stage(s) per rank"]
    for rank, row in enumerate(cells):
        note = "  <-- ERROR HERE" if any(r == rank for r, _ in marks) else ""
        lines.append(f"rank {rank:>2}: " + " ".join(c.rjust(width) for c in row) + note)
    return "\n".join(lines)
