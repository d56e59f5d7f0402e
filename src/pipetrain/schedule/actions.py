"""Actions (`1F0`, `3I7`, `2SEND_F0`) and the data dependencies between them, defined once."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple


class Op(enum.Enum):
    """What an action does. F/B/I/W compute; SEND_*/RECV_* move one tensor between ranks."""

    F = "F"  # forward of one stage on one microbatch
    B = "B"  # full backward (input and weight gradients)
    I = "I"  # noqa: E741  backward for the stage input only
    W = "W"  # backward for the weights only (after I)
    SEND_F = "SEND_F"  # send this stage's output activation to stage + 1
    RECV_F = "RECV_F"  # receive this stage's input activation from stage - 1
    SEND_B = "SEND_B"  # send the gradient of this stage's input to stage - 1
    RECV_B = "RECV_B"  # receive the gradient of this stage's output from stage + 1

    # (the simulator asks these millions of times: string lookups, not enum hashing)
    @property
    def is_compute(self) -> bool:
        return self._value_ in _COMPUTE

    @property
    def is_comm(self) -> bool:
        return self._value_ not in _COMPUTE


_COMPUTE = frozenset({"F", "B", "I", "W"})


_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: `stage`, `op`, microbatch `mb`. Prints as `1F0` and parses back."""

    stage: int
    op: Op
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.mb}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @staticmethod
    def parse(text: str) -> Action:
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected {{stage}}{{op}}{{microbatch}} such as '1F0', "
                f"'3I7' or '2SEND_F0' (ops: {', '.join(op.value for op in Op)})"
            )
        return Action(int(match.group(1)), Op(match.group(2)), int(match.group(3)))


def F(stage: int, mb: int) -> Action:  # noqa: N802 - reads like the printed form
    return Action(stage, Op.F, mb)


def B(stage: int, mb: int) -> Action:  # noqa: N802
    return Action(stage, Op.B, mb)


def I(stage: int, mb: int) -> Action:  # noqa: N802, E741, E743
    return Action(stage, Op.I, mb)


def W(stage: int, mb: int) -> Action:  # noqa: N802
    return Action(stage, Op.W, mb)


# --- data dependencies ------------------------------------------------------------------------------
# Every compute action produces one value and consumes a few. The functions below are the single
# definition of the dependencies, used by the checker, the lowering pass, the simulator, zb-auto, `compare`,
# the runtime's executor and data parallelism:
#   F(s, m) produces ACT(s, m), the output of stage s, and consumes ACT(s-1, m) when s > 0.
#   B(s, m) and I(s, m) produce GRAD(s, m), the gradient of stage s's input, and consume the stage's own
#     forward ACT(s, m) and, when s is not the last stage, GRAD(s+1, m).
#   W(s, m) produces WGRAD(s, m) and consumes GRAD(s, m) from I(s, m) on the same stage.
# Between stages ACT goes down (to s+1) and GRAD goes up (to s-1); a GRAD(s, m) has the shapes of ACT(s-1, m).


class Kind(str, enum.Enum):
    """What a value is. (A str enum: hashing it is a string hash, which the simulator does millions of times.)"""

    ACT = "act"  # a stage's output activation
    GRAD = "grad"  # the gradient of a stage's input
    WGRAD = "wgrad"  # a stage's weight gradients for one microbatch


class Value(NamedTuple):
    """One value of the dataflow: `kind` of stage `stage` for microbatch `mb`."""

    kind: Kind
    stage: int
    mb: int

    def __str__(self) -> str:
        return describe(self)


ACT, GRAD, WGRAD = Kind.ACT, Kind.GRAD, Kind.WGRAD
_PRODUCES = {"F": ACT, "B": GRAD, "I": GRAD, "W": WGRAD}


_new = tuple.__new__  # _new(Value, (kind, stage, mb)) is Value(kind, stage, mb) without its Python-level
#                       __new__: these functions are the simulator's hot path


def produces(action: Action) -> Value:
    return _new(Value, (_PRODUCES[action.op._value_], action.stage, action.mb))


def consumes(action: Action, num_stages: int) -> list[Value]:
    s, m = action.stage, action.mb
    if action.op is Op.F:
        return [_new(Value, (ACT, s - 1, m))] if s > 0 else []
    if action.op in (Op.B, Op.I):
        needs = [_new(Value, (ACT, s, m))]
        if s < num_stages - 1:
            needs.append(_new(Value, (GRAD, s + 1, m)))
        return needs
    if action.op is Op.W:
        return [_new(Value, (GRAD, s, m))]
    raise ValueError(f"{action} is not a compute action")


def received_input(action: Action, num_stages: int) -> Value | None:
    """The value a compute action takes from another stage (F: the previous stage's output; B and I: the
    next stage's input gradient), or None (the first stage's F, the last stage's B, every W)."""
    for value in consumes(action, num_stages):
        if value.stage != action.stage:
            return value
    return None


def finishes_weights(action: Action) -> bool:
    """Whether `action` completes one microbatch's weight gradients on its stage: a B, or the W after an I."""
    return action.op is Op.B or action.op is Op.W


def shaped_like(value: Value) -> Value:
    """The activation whose shapes `value` has: an ACT itself; the GRAD of stage s's input, ACT(s-1)."""
    return value if value.kind is ACT else Value(ACT, value.stage - 1, value.mb)


def describe(value: Value) -> str:
    """A value in words, for error messages: `the output of stage 1 for microbatch 3 (1F3)`."""
    kind, stage, mb = value
    if kind is ACT:
        return f"the output of stage {stage} for microbatch {mb} ({stage}F{mb})"
    if kind is GRAD:
        return f"the input gradient of stage {stage} for microbatch {mb} ({stage}B{mb} or {stage}I{mb})"
    return f"the weight gradient of stage {stage} for microbatch {mb} ({stage}W{mb})"


_MESSAGE = {"SEND_F": (ACT, 0), "RECV_F": (ACT, -1), "SEND_B": (GRAD, 0), "RECV_B": (GRAD, 1)}


def message_of(action: Action) -> Value:
    """The value a SEND/RECV action carries (the value is produced by the sending stage)."""
    kind, offset = _MESSAGE[action.op._value_]
    return _new(Value, (kind, action.stage + offset, action.mb))


def recv_action_for(value: Value) -> Action:
    """The RECV action, on the consuming stage, that brings `value` in."""
    kind, s, m = value
    return Action(s + 1, Op.RECV_F, m) if kind is ACT else Action(s - 1, Op.RECV_B, m)


def send_action_for(value: Value) -> Action:
    """The SEND action, on the producing stage, that ships `value` out."""
    kind, s, m = value
    return Action(s, Op.SEND_F, m) if kind is ACT else Action(s, Op.SEND_B, m)


def consumer_stage(value: Value) -> int | None:
    """The other stage that consumes a value (ACT goes down, GRAD goes up; WGRAD stays: None). It may be
    out of range: the last stage's ACT and the first stage's GRAD go nowhere."""
    kind = value.kind
    return value.stage + 1 if kind is ACT else value.stage - 1 if kind is GRAD else None
