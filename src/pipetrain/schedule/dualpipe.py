"""DualPipeV: DeepSeek's DualPipe cut in half, on zbv's V placement (deepseek-ai/DualPipe, dualpipev.py).

Rank r holds stage a = r (down) and b = 2P-1-r (back up). Counted phases on rank r, each count a closed
formula as in DualPipe's code; "a pair" is the forward of one stage followed by the full backward of the
other (DualPipe overlaps the two on a GPU; here they run one after the other):

    F_a x 2(P-r-1)  |  (F_a, F_b) x (r+1)  |  (I_b, W, F_b) x (P-r-1)
    main: (F_a B_b, F_b B_a) x (M - 2P + r + 1)
    (B_b, F_b B_a) x (P-r-1)  |  (B_b, B_a) x (r+1), the second half split into I (W deferred)
    (W, I_a or B_a) x (P-r-1)  |  W x (r+1)

W passes run the deferred weight gradients oldest first. P=2, M=4 (stages 0 and 3 on rank 0):

    rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 0I2 0W2 0I3 0W3
    rank 1: 1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 1I3 2W3 1W3

With f = b = w its bubble equals zbv's; it holds one microbatch more than zbv at its peak (2P+1 against
2P), and its fused pairs are what DualPipe overlaps with communication on GPUs.

Needs M >= 2P microbatches (each rank's main phase must run at least once).
"""

from __future__ import annotations

from collections import deque

from .actions import Action, Op
from .base import Schedule
from .placement import vshape
from .registry import register


def _sizes(num_ranks: int, num_microbatches: int, stages_per_rank: int) -> None:
    if stages_per_rank != 2:
        raise ValueError(f"dualpipev places exactly two stages per rank (a V); got stages_per_rank={stages_per_rank}")
    if num_microbatches < 2 * num_ranks:
        raise ValueError(f"dualpipev needs at least 2 x ranks = {2 * num_ranks} microbatches, got {num_microbatches}: "
                         "raise the microbatch count, or use 'zbv', which runs any count")


@register("dualpipev", listing=6, sizes=_sizes)
def dualpipev(num_ranks: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    P, M = num_ranks, num_microbatches
    return Schedule("dualpipev", P, M, 2, vshape(P), [_dualpipev_rank(P, r, M) for r in range(P)])


def _dualpipev_rank(P: int, r: int, M: int) -> list[Action]:
    a, b = r, 2 * P - 1 - r
    forwards = {a: 0, b: 0}
    backwards = {a: 0, b: 0}  # B or I, whichever ran
    deferred: deque[tuple[int, int]] = deque()  # (stage, microbatch) whose W is owed, oldest first
    acts: list[Action] = []

    def forward(stage: int) -> None:
        acts.append(Action(stage, Op.F, forwards[stage]))
        forwards[stage] += 1

    def backward(stage: int, split: bool = False) -> None:
        mb = backwards[stage]
        acts.append(Action(stage, Op.I if split else Op.B, mb))
        backwards[stage] += 1
        if split:
            deferred.append((stage, mb))

    def weight() -> None:
        if deferred:
            stage, mb = deferred.popleft()
            acts.append(Action(stage, Op.W, mb))

    for _ in range(2 * (P - r - 1)):
        forward(a)
    for _ in range(r + 1):
        forward(a)
        forward(b)
    for _ in range(P - r - 1):
        backward(b, split=True)
        weight()
        forward(b)
    for _ in range(M - 2 * P + r + 1):
        forward(a)
        backward(b)
        forward(b)
        backward(a)
    for _ in range(P - r - 1):
        backward(b)
        forward(b)
        backward(a)
    split = False
    for i in range(r + 1):  # the second half of these backwards leave their W for later
        split = split or (i == (r + 1) // 2 and r % 2 == 1)
        backward(b, split)
        split = split or (i == (r + 1) // 2 and r % 2 == 0)
        backward(a, split)
    for _ in range(P - r - 1):
        weight()
        backward(a, split)
    while deferred:
        weight()
    return acts
