"""Actions (`1F0`, `3I7`, `2SEND_F0`, `1D3@7`, `0S5`) and the data dependencies between them, defined once."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import NamedTuple


class Op(enum.Enum):
    """What an action does. F/B/I/W train and P/D generate (compute); S/T are a vocabulary shard's passes
    (compute, `vocabulary`); SEND_*/RECV_* move one value between ranks (transfers); REDUCE and GATHER are a
    stage's data-parallel collectives over its replicas (`collectives`)."""

    F = "F"  # forward of one stage on one microbatch
    B = "B"  # full backward (input and weight gradients)
    I = "I"  # noqa: E741  backward for the stage input only
    W = "W"  # backward for the weights only (after I)
    SEND_F = "SEND_F"  # send this stage's output activation to stage + 1
    RECV_F = "RECV_F"  # receive this stage's input activation from stage - 1
    SEND_B = "SEND_B"  # send the gradient of this stage's input to stage - 1
    RECV_B = "RECV_B"  # receive the gradient of this stage's output from stage + 1
    P = "P"  # generation: a prefill pass of one group of sequences (a piece of their prompts) through one stage
    D = "D"  # generation: a decode pass (the tokens the last stage picked in the round before)
    SEND_P = "SEND_P"  # send a generation pass's output to the stage that runs the group's next pass
    RECV_P = "RECV_P"  # receive this stage's generation input (from stage - 1, or from the last stage)
    REDUCE = "REDUCE"  # launch the reduction of the stage's weight gradients over its data-parallel replicas
    GATHER = "GATHER"  # launch the all-gather of the stage's parameters from their shards (shard="params")
    S = "S"  # vocabulary parallel: one shard's logits of one microbatch and their softmax statistics
    T = "T"  # vocabulary parallel: one shard's backward (its weight gradient, its part of the output gradient)
    E = "E"  # vocabulary parallel: one shard's part of the input embedding of one microbatch (its tokens' rows)
    G = "G"  # vocabulary parallel: one shard's embedding gradient, from the gradient of the first stage's input

    # (the simulator asks these millions of times: string lookups, not enum hashing)
    @property
    def is_compute(self) -> bool:
        return self._value_ in _COMPUTE

    @property
    def is_comm(self) -> bool:
        """A point-to-point transfer (SEND_* / RECV_*)."""
        return self._value_ in _TRANSFERS

    @property
    def is_collective(self) -> bool:
        return self._value_ in _COLLECTIVES


_COMPUTE = frozenset({"F", "B", "I", "W", "P", "D", "S", "T", "E", "G"})
_COLLECTIVES = frozenset({"REDUCE", "GATHER"})
_TRANSFERS = frozenset({"SEND_F", "RECV_F", "SEND_B", "RECV_B", "SEND_P", "RECV_P"})
_PAIRABLE = frozenset({"F", "B", "I"})  # what an overlapped pair holds: a forward and a backward
SENDS = frozenset({"SEND_F", "SEND_B", "SEND_P"})  # Op values: `action.op._value_ in SENDS`
RECVS = frozenset({"RECV_F", "RECV_B", "RECV_P"})
_ROUNDS = frozenset({"P", "D", "SEND_P", "RECV_P"})  # the generation ops, whose actions have a round
VOCABULARY = frozenset({"S", "T", "E", "G"})  # a vocabulary shard's ops: `action.stage` is the shard (its rank)


_ACTION_RE = re.compile(r"^(\+?)(\d+)(?:(SEND_F|RECV_F|SEND_B|RECV_B|SEND_P|RECV_P|F|B|I|W|P|D|S|T|E|G)(\d+)"
                        r"(?:@(\d+))?|(REDUCE|GATHER))$")


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: `stage`, `op`, microbatch `mb`. Prints as `1F0` and parses back.

    Generation's actions run group `mb` of sequences through `stage` in `round` (its prefill pieces, then
    one round per new token) and print with it: `1D3@7` is stage 1 decoding group 3 in round 7. A stage's
    collectives concern all its microbatches (`mb` 0) and print without one: `1REDUCE`, `1GATHER`.

    Vocabulary parallelism's passes (`vocabulary`) print with their shard, which is also their rank: `0S5` is
    shard 0's logits of microbatch 5, `1T5` shard 1's backward of it, `0E5` its part of the input embedding,
    `0G5` that part's gradient.

    `paired` (printed `+1B0`): the action runs together with the compute action right before it, a forward
    with a backward (B or I) of another microbatch, taking turns at their all-to-alls (`overlap`). It says how
    the action runs, not what it computes: a paired action equals (and hashes as) the same action unpaired."""

    stage: int
    op: Op
    mb: int
    round: int = 0
    paired: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        if self.paired:
            return f"+{self.stage}{self.op.value}{self.mb}"
        if self.op._value_ in _COLLECTIVES:
            return f"{self.stage}{self.op.value}"
        if self.op._value_ in _ROUNDS:
            return f"{self.stage}{self.op.value}{self.mb}@{self.round}"
        return f"{self.stage}{self.op.value}{self.mb}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @staticmethod
    def parse(text: str) -> Action:
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected {{stage}}{{op}}{{microbatch}} such as '1F0', "
                f"'3I7' or '2SEND_F0', {{stage}}{{op}}{{group}}@{{round}} such as '1D3@7', or "
                f"{{stage}}{{collective}} such as '1REDUCE', each paired with the action before it by a leading '+' "
                f"('+1B0') (ops: {', '.join(op.value for op in Op)})"
            )
        paired = match.group(1) == "+"
        if match.group(6) is not None:
            if paired:
                raise ValueError(f"cannot parse action {text!r}: a collective does not pair with another action")
            return Action(int(match.group(2)), Op(match.group(6)), 0)
        op, rounds = Op(match.group(3)), match.group(5)
        if (rounds is not None) != (op._value_ in _ROUNDS):
            raise ValueError(f"cannot parse action {text!r}: generation ops ({', '.join(sorted(_ROUNDS))}) and only "
                             "they take a round, written @round (e.g. '1D3@7')")
        if paired and op._value_ not in _PAIRABLE:
            raise ValueError(f"cannot parse action {text!r}: only F, B and I pair with the action before them ('+')")
        return Action(int(match.group(2)), op, int(match.group(4)), int(rounds or 0), paired)


def F(stage: int, mb: int) -> Action:  # noqa: N802 - reads like the printed form
    return Action(stage, Op.F, mb)


def B(stage: int, mb: int) -> Action:  # noqa: N802
    return Action(stage, Op.B, mb)


def I(stage: int, mb: int) -> Action:  # noqa: N802, E741, E743
    return Action(stage, Op.I, mb)


def W(stage: int, mb: int) -> Action:  # noqa: N802
    return Action(stage, Op.W, mb)


def REDUCE(stage: int) -> Action:  # noqa: N802
    return Action(stage, Op.REDUCE, 0)


def GATHER(stage: int) -> Action:  # noqa: N802
    return Action(stage, Op.GATHER, 0)


def P(stage: int, group: int, round: int) -> Action:  # noqa: N802, A002
    return Action(stage, Op.P, group, round)


def D(stage: int, group: int, round: int) -> Action:  # noqa: N802, A002
    return Action(stage, Op.D, group, round)


# --- data dependencies ------------------------------------------------------------------------------
# Every compute action produces one value and consumes a few. The functions below are the single
# definition of the dependencies, used by the checker, the lowering pass, the simulator, zb-auto, `compare`,
# the runtime's executor and data parallelism:
#   F(s, m) produces ACT(s, m), the output of stage s, and consumes ACT(s-1, m) when s > 0.
#   B(s, m) and I(s, m) produce GRAD(s, m), the gradient of stage s's input, and consume the stage's own
#     forward ACT(s, m) and, when s is not the last stage, GRAD(s+1, m).
#   W(s, m) produces WGRAD(s, m) and consumes GRAD(s, m) from I(s, m) on the same stage.
# Between stages ACT goes down (to s+1) and GRAD goes up (to s-1); a GRAD(s, m) has the shapes of ACT(s-1, m).
# Generation: group g's pass through stage s in round t, P(s, g, t) (prefill) or D(s, g, t) (decode), produces
#   PASS(s, g, t): hidden states for stage s+1, or from the last stage the picked tokens for stage 0's next
#   round. It consumes PASS(s-1, g, t) when s > 0; at stage 0 a D consumes the last stage's PASS of round
#   t-1 (a P takes a piece of the prompts instead); and every pass after round 0 consumes its own stage's
#   PASS(s, g, t-1), which stands for the KV cache that pass extended.
# Vocabulary parallelism (`vocabulary`): the last stage's output goes to every rank, where shard r's S(r, m)
#   computes its logits and produces STATS(r, m), their softmax statistics; T(r, m) consumes every shard's
#   STATS(., m) and produces VGRAD(r, m), its part of the gradient of the last stage's output; the last stage's B
#   or I consumes every VGRAD(., m). At the other end E(r, m) produces EMB(r, m), the shard's rows of the input
#   embedding, the first stage's F consumes every EMB(., m), and G(r, m) consumes GRAD(0, m) (the gradient of
#   the first stage's input, the embedding) and produces EGRAD(r, m), the shard's table gradient (it stays).
#   These values cross ranks in collectives (`by_collective`), not transfers.


class Kind(str, enum.Enum):
    """What a value is. (A str enum: hashing it is a string hash, which the simulator does millions of times.)"""

    ACT = "act"  # a stage's output activation
    GRAD = "grad"  # the gradient of a stage's input
    WGRAD = "wgrad"  # a stage's weight gradients for one microbatch
    PASS = "pass"  # a generation pass's output (hidden states, or the last stage's picked tokens)
    STATS = "stats"  # a vocabulary shard's softmax statistics for one microbatch (its max, sum and target logit)
    VGRAD = "vgrad"  # a vocabulary shard's part of the gradient of the last stage's output
    EMB = "emb"  # a vocabulary shard's part of one microbatch's input embedding
    EGRAD = "egrad"  # a vocabulary shard's embedding-table gradient for one microbatch


class Value(NamedTuple):
    """One value of the dataflow: `kind` of stage `stage` for microbatch `mb` (generation: group `mb`, `round`)."""

    kind: Kind
    stage: int
    mb: int
    round: int = 0

    def __str__(self) -> str:
        return describe(self)


ACT, GRAD, WGRAD, PASS, STATS, VGRAD = Kind.ACT, Kind.GRAD, Kind.WGRAD, Kind.PASS, Kind.STATS, Kind.VGRAD
EMB, EGRAD = Kind.EMB, Kind.EGRAD
_PRODUCES = {"F": ACT, "B": GRAD, "I": GRAD, "W": WGRAD, "P": PASS, "D": PASS, "S": STATS, "T": VGRAD, "E": EMB,
             "G": EGRAD}
_SHARD_KINDS = frozenset({STATS, VGRAD, EMB, EGRAD})  # values whose `stage` is a vocabulary shard (= its rank)


_new = tuple.__new__  # _new(Value, (kind, stage, mb, round)) is Value(kind, stage, mb, round) without its
#                       Python-level __new__: these functions are the simulator's hot path


def produces(action: Action) -> Value:
    return _new(Value, (_PRODUCES[action.op._value_], action.stage, action.mb, action.round))


def consumes(action: Action, num_stages: int, shards: int = 0) -> list[Value]:
    """Every value `action` needs: its data input (`received_input`) and what it needs from its own stage.
    `shards`: the schedule's vocabulary shards (`Schedule.vocabulary_shards`; 0 without vocabulary passes)."""
    s, m, op = action.stage, action.mb, action.op
    if op is Op.F:
        return [_new(Value, (ACT, s - 1, m, 0))] if s > 0 else [_new(Value, (EMB, r, m, 0)) for r in range(shards)]
    if op is Op.B or op is Op.I:
        if s < num_stages - 1:
            return [_new(Value, (ACT, s, m, 0)), _new(Value, (GRAD, s + 1, m, 0))]
        return [_new(Value, (ACT, s, m, 0))] + [_new(Value, (VGRAD, r, m, 0)) for r in range(shards)]
    if op is Op.S:
        return [_new(Value, (ACT, num_stages - 1, m, 0))]
    if op is Op.T:
        if not shards:
            raise ValueError(f"{action} is a vocabulary pass: pass consumes() the schedule's vocabulary_shards")
        return [_new(Value, (STATS, r, m, 0)) for r in range(shards)]
    if op is Op.E:
        return []
    if op is Op.G:
        return [_new(Value, (GRAD, 0, m, 0))]
    if op is Op.W:
        return [_new(Value, (GRAD, s, m, 0))]
    if op is Op.P or op is Op.D:
        data = received_input(action, num_stages)
        needs = [data] if data is not None else []
        t = action.round
        if t > 0 and data != (PASS, s, m, t - 1):  # (one stage: a D's tokens come from its own last round)
            needs.append(_new(Value, (PASS, s, m, t - 1)))
        return needs
    raise ValueError(f"{action} is not a compute action")


def rank_of_value(value: Value, stage_to_rank: tuple[int, ...]) -> int:
    """The rank that produces `value`: its stage's, or for a vocabulary shard's value the shard's own."""
    return value.stage if value.kind in _SHARD_KINDS else stage_to_rank[value.stage]


def rank_of_action(action: Action, stage_to_rank: tuple[int, ...]) -> int:
    """The rank that runs `action`: its stage's, or for a vocabulary pass its shard's own."""
    return action.stage if action.op._value_ in VOCABULARY else stage_to_rank[action.stage]


def by_collective(value: Value, action: Action) -> bool:
    """Whether `value` reaches `action` on another rank through vocabulary parallelism's collectives (the last
    stage's output broadcast to every S, the statistics gathered for every T, the shards' output gradients
    summed for the last stage's backward) rather than a SEND/RECV transfer."""
    return value.kind in _SHARD_KINDS or action.op is Op.S or action.op is Op.G


def received_input(action: Action, num_stages: int) -> Value | None:
    """The value a compute action computes on, from another stage or (generation) another round: F: the
    previous stage's output; B and I: the next stage's input gradient; S: the last stage's output; G: the
    first stage's input gradient; P and D: the previous stage's pass,
    and at stage 0 a D's the last stage's tokens of the round before. None: the first stage's F (the
    microbatch) and P (the prompts), the last stage's B, every W."""
    s, op = action.stage, action.op
    if op is Op.F:
        return _new(Value, (ACT, s - 1, action.mb, 0)) if s > 0 else None
    if op is Op.B or op is Op.I:
        return _new(Value, (GRAD, s + 1, action.mb, 0)) if s < num_stages - 1 else None
    if op is Op.S:
        return _new(Value, (ACT, num_stages - 1, action.mb, 0))
    if op is Op.G:
        return _new(Value, (GRAD, 0, action.mb, 0))
    if op is Op.P or op is Op.D:
        if s > 0:
            return _new(Value, (PASS, s - 1, action.mb, action.round))
        return _new(Value, (PASS, num_stages - 1, action.mb, action.round - 1)) if op is Op.D else None
    return None


def finishes_weights(action: Action) -> bool:
    """Whether `action` completes one microbatch's weight gradients on its stage: a B, or the W after an I."""
    return action.op is Op.B or action.op is Op.W


def shaped_like(value: Value) -> Value:
    """The activation whose shapes `value` has: an ACT itself; the GRAD of stage s's input, ACT(s-1)."""
    return value if value.kind is ACT else Value(ACT, value.stage - 1, value.mb)


def describe(value: Value) -> str:
    """A value in words, for error messages: `the output of stage 1 for microbatch 3 (1F3)`."""
    kind, stage, mb, t = value
    if kind is ACT:
        return f"the output of stage {stage} for microbatch {mb} ({stage}F{mb})"
    if kind is GRAD:
        return f"the input gradient of stage {stage} for microbatch {mb} ({stage}B{mb} or {stage}I{mb})"
    if kind is PASS:
        return f"the output of stage {stage} for group {mb} in round {t} ({stage}P{mb}@{t} or {stage}D{mb}@{t})"
    if kind is STATS:
        return f"the softmax statistics of vocabulary shard {stage} for microbatch {mb} ({stage}S{mb})"
    if kind is VGRAD:
        return f"vocabulary shard {stage}'s part of the last stage's output gradient for microbatch {mb} ({stage}T{mb})"
    if kind is EMB:
        return f"vocabulary shard {stage}'s part of the input embedding of microbatch {mb} ({stage}E{mb})"
    if kind is EGRAD:
        return f"vocabulary shard {stage}'s embedding gradient for microbatch {mb} ({stage}G{mb})"
    return f"the weight gradient of stage {stage} for microbatch {mb} ({stage}W{mb})"


def message_of(action: Action, num_stages: int) -> Value:
    """The value a SEND/RECV action carries (the value is produced by the sending stage)."""
    op, s, m = action.op._value_, action.stage, action.mb
    if op == "SEND_F" or op == "SEND_B" or op == "SEND_P":
        return _new(Value, (_SENT[op], s, m, action.round))
    if op == "RECV_F":
        return _new(Value, (ACT, s - 1, m, 0))
    if op == "RECV_B":
        return _new(Value, (GRAD, s + 1, m, 0))
    if s > 0:  # RECV_P
        return _new(Value, (PASS, s - 1, m, action.round))
    return _new(Value, (PASS, num_stages - 1, m, action.round - 1))


_SENT = {"SEND_F": ACT, "SEND_B": GRAD, "SEND_P": PASS}


def consumer(value: Value, num_stages: int) -> tuple[int, int] | None:
    """The other stage that consumes a value, and in which round: ACT goes down, GRAD goes up (round 0);
    a PASS goes down, the last stage's back to stage 0 for the next round; WGRAD stays (None), and a vocabulary
    shard's values go by collectives (None). The stage may be out of range: the last stage's ACT (but to the
    vocabulary passes) and the first stage's GRAD go nowhere."""
    kind, s, _, t = value
    if kind is ACT:
        return s + 1, 0
    if kind is GRAD:
        return s - 1, 0
    if kind is PASS:
        return (s + 1, t) if s < num_stages - 1 else (0, t + 1)
    return None


def recv_action_for(value: Value, num_stages: int) -> Action:
    """The RECV action, on the consuming stage, that brings `value` in."""
    stage, t = consumer(value, num_stages)
    op = Op.RECV_F if value.kind is ACT else Op.RECV_B if value.kind is GRAD else Op.RECV_P
    return Action(stage, op, value.mb, t)


def send_action_for(value: Value) -> Action:
    """The SEND action, on the producing stage, that ships `value` out."""
    kind, s, m, t = value
    return Action(s, Op.SEND_F if kind is ACT else Op.SEND_B if kind is GRAD else Op.SEND_P, m, t)
