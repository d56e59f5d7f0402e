"""One wire format for every value between ranks: training's activations and gradients, generation's passes.

A value crosses as one byte envelope, 16-byte aligned (so every leaf can be viewed in place as its dtype):

    header  int64[10]: kind, stage, microbatch (generation: group), round, kept rows (-1: none),
                      signature id (-1: none), signature bytes (0 unless the structure is new on this link),
                      batch check (a checksum of the sender's microbatch shapes; 0: none), 0, total bytes
    signature bytes | kept rows int64[n] | each leaf's bytes

The receiver posts a buffer of a size both ends agree on (the capacity): an envelope longer than that
sends its remainder as a second transfer, which the receiver posts as soon as the first has told it the
total, before anything else on the link. Training knows its sizes: an activation whose shapes crossed the
link before, and every gradient, is received exactly (one transfer, no header read); the first activation
of a new shape is posted at `MIN_CAPACITY`. A value of one leaf whose shapes the receiver knows crosses
as that leaf's own bytes, without an envelope (`direct`): the common case, a hidden state and its gradient.
Generation's sizes depend on the data (a group shrinks when
sequences finish), so each of its links keeps one receive posted ahead, at the largest of its last
messages (`Link`), and every message says what it is. A sender gives each new structure (`Signature`) an
id per link and sends its bytes once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..schedule.actions import Kind, Value
from .comm import CommError, Transport, Work, posting_failed, rank_name, wait_or_raise
from .values import Signature

HEADER = 10  # int64 fields (80 bytes: leaves stay 16-byte aligned)
HEADER_BYTES = 8 * HEADER
ALIGN = 16
MIN_CAPACITY = 4096
END = -1  # the kind of the header that closes a generation link
_KINDS = list(Kind)

Shapes = Sequence[tuple[tuple[int, ...], torch.dtype, bool]]  # Signature.leaves, or a subset of them


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def envelope_size(shapes: Shapes, *, kept: int | None = None, signature_bytes: int = 0) -> int:
    """The bytes of an envelope carrying leaves of `shapes` (and `kept` row indices, and signature bytes)."""
    size = HEADER_BYTES + aligned(signature_bytes) + (aligned(8 * kept) if kept is not None else 0)
    for shape, dtype, _ in shapes:
        size += aligned(torch.Size(shape).numel() * dtype.itemsize)
    return size


class Envelope(NamedTuple):
    """A value as it arrived: what it is, its leaves (views into the received bytes), its structure (None for
    a gradient, whose receiver knows it), and the rows of the group's previous round that go on (generation)."""

    value: Value
    leaves: list[torch.Tensor]
    signature: Signature | None
    keep: torch.Tensor | None
    batch: int = 0  # the sender's check of the microbatch's shapes (`values.batch_check`), 0 if not sent


@dataclass
class Posted:
    """A receive posted for the next envelope from `peer`, `capacity` bytes."""

    work: Work
    body: torch.Tensor
    peer: int


class Wire:
    """One rank's envelopes to and from its peers, over `transport`: the structures each link has seen, and
    the sends in flight (kept until they complete, so their buffers live)."""

    def __init__(self, transport: Transport, timeout: float) -> None:
        self.transport, self.timeout, self.device = transport, timeout, transport.device
        self.me = rank_name(transport, transport.rank)
        self.sent_structures: dict[int, dict[Signature, int]] = {}  # peer -> structure -> id
        self.received_structures: dict[int, dict[int, Signature]] = {}  # peer -> id -> structure
        self.sends: list[tuple[Work, torch.Tensor, object, int]] = []  # (work, buffer, what it is for, peer)

    # --- sending -------------------------------------------------------------------------------------
    def send(self, peer: int, value: Value, leaves: Sequence[torch.Tensor], *, signature: Signature | None = None,
             keep: torch.Tensor | None = None, capacity: int | None = None, batch: int = 0, doing: object) -> int:
        """Post `value`'s envelope to `peer`: its leaves, with `signature` (its id, and its bytes the first
        time) unless the receiver knows the shapes (a gradient), and `keep`. The first transfer is
        `capacity` bytes (None: the envelope's own size, which the receiver computes too); returns the size."""
        sig_id, sig_bytes = -1, None
        ids = self.sent_structures.setdefault(peer, {})
        if signature is not None:
            sig_id = ids.get(signature, -1)
            if sig_id < 0:
                sig_id, sig_bytes = len(ids), signature.to_bytes()
        kept = None if keep is None else len(keep)
        shapes = [(tuple(t.shape), t.dtype, False) for t in leaves]
        total = envelope_size(shapes, kept=kept, signature_bytes=0 if sig_bytes is None else sig_bytes.numel())
        first = total if capacity is None else capacity
        body = torch.empty(max(total, first), dtype=torch.uint8, device=self.device)
        header = [_KINDS.index(value.kind), value.stage, value.mb, value.round, -1 if kept is None else kept,
                  sig_id, 0 if sig_bytes is None else sig_bytes.numel(), batch, 0, total]
        body[:HEADER_BYTES] = self._on_device(torch.tensor(header, dtype=torch.int64).view(torch.uint8))
        at = HEADER_BYTES
        extras = ([sig_bytes] if sig_bytes is not None else []) + ([keep.to(torch.int64)] if keep is not None else [])
        for part in extras:
            raw = part.reshape(-1).view(torch.uint8)
            body[at:at + raw.numel()] = self._on_device(raw)
            at += aligned(raw.numel())
        for t in leaves:
            n = t.numel() * t.element_size()
            body[at:at + n].view(t.dtype).view(t.shape).copy_(t.detach())
            at += aligned(n)
        chunks = [body[:first]] + ([body[first:total]] if total > first else [])
        for chunk in chunks:
            self.sends.append((self._post_send(chunk, peer, doing), chunk, doing, peer))
        if sig_bytes is not None:  # the peer has its bytes from now on (not if packing or posting failed)
            ids[signature] = sig_id
        return total

    def send_leaf(self, peer: int, leaf: torch.Tensor, *, doing: object) -> None:
        """A value of one leaf whose shapes the receiver knows (`direct`): its own bytes, no envelope, no copy."""
        leaf = leaf.contiguous()  # (the stage's outputs and gradients come detached)
        self.sends.append((self._post_send(leaf, peer, doing), leaf, doing, peer))

    def end(self, peer: int, capacity: int) -> None:
        """Close a generation link to `peer` (the receiver has `capacity` bytes posted for it)."""
        body = torch.zeros(capacity, dtype=torch.uint8, device=self.device)
        header = torch.tensor([END] + [0] * (HEADER - 1), dtype=torch.int64)
        body[:HEADER_BYTES] = self._on_device(header.view(torch.uint8))
        self.sends.append((self._post_send(body, peer, "the end of generation"), body, "the end of generation", peer))

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (small: a header, a structure, kept rows) on the wire's device. From the CPU to a GPU it goes
        through pinned memory without blocking the host (the caching host allocator keeps the pinned block
        until the copy ran), so posting a send never waits for the GPU to catch up."""
        if self.device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _post_send(self, tensor: torch.Tensor, peer: int, doing: object) -> Work:
        try:
            return self.transport.isend(tensor, peer)
        except CommError as err:  # a peer that closed its connection: say which action found out
            raise posting_failed(self.transport, peer, "receive", err.__cause__ or err, doing=str(doing)) from err

    def reap(self) -> None:
        """Drop finished sends so their buffers can be freed."""
        if self.sends:
            self.sends = [s for s in self.sends if not s[0].is_completed()]

    def wait_sends(self) -> None:
        for work, _, doing, peer in self.sends:
            wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=peer, what="the send",
                          doing=str(doing))
        self.sends.clear()

    # --- receiving -----------------------------------------------------------------------------------
    def post(self, peer: int, capacity: int) -> Posted:
        body = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        return Posted(self.transport.irecv(body, peer), body, peer)

    def post_leaf(self, peer: int, shape: tuple[int, ...], dtype: torch.dtype) -> Posted:
        """The receive of a `send_leaf`: straight into the leaf (`Posted.body`)."""
        leaf = torch.empty(shape, dtype=dtype, device=self.device)
        return Posted(self.transport.irecv(leaf, peer), leaf, peer)

    def wait(self, posted: Posted, *, what: str, doing: object) -> None:
        """Wait for a posted envelope of a size the receiver knew."""
        wait_or_raise(posted.work, timeout=self.timeout, transport=self.transport, peer=posted.peer, what=what,
                      doing=doing)

    def take(self, posted: Posted, *, what: str, doing: object) -> tuple[list[int], torch.Tensor]:
        """Wait for a posted envelope whose size the receiver did not know; receive its remainder if it is
        longer than the posted capacity. Returns its header and all its bytes."""
        self.wait(posted, what=what, doing=doing)
        body = posted.body
        header = body[:HEADER_BYTES].view(torch.int64).tolist()
        total = header[-1]
        if header[0] != END and total > body.numel():
            rest = torch.empty(total - body.numel(), dtype=torch.uint8, device=self.device)
            wait_or_raise(self.transport.irecv(rest, posted.peer), timeout=self.timeout, transport=self.transport,
                          peer=posted.peer, what=what, doing=doing)
            body = torch.cat([body, rest])
        return header, body

    def open(self, peer: int, header: list[int], body: torch.Tensor, shapes: Shapes | None = None) -> Envelope:
        """An envelope's contents; `shapes` are its leaves' when the receiver knows them (a gradient), else they
        come from the structure it names."""
        kind, stage, mb, t, kept, sig_id, sig_bytes, batch, _, _ = header
        at = HEADER_BYTES
        signature = None
        if sig_bytes:
            signature = Signature.from_bytes(body[at:at + sig_bytes])
            self.received_structures.setdefault(peer, {})[sig_id] = signature
            at += aligned(sig_bytes)
        elif sig_id >= 0:
            signature = self.received_structures[peer][sig_id]
        keep = None
        if kept >= 0:
            keep = body[at:at + 8 * kept].view(torch.int64)
            at += aligned(8 * kept)
        if shapes is None:
            shapes = signature.leaves if signature is not None else ()
        return Envelope(Value(_KINDS[kind], stage, mb, t), unpack(body, at, shapes), signature, keep, batch)


def direct(shapes: Shapes) -> bool:
    """Whether a value of known `shapes` crosses as its one leaf's bytes (`Wire.send_leaf`), not an envelope."""
    return len(shapes) == 1 and torch.Size(shapes[0][0]).numel() > 0


def unpack(body: torch.Tensor, at: int, shapes: Shapes) -> list[torch.Tensor]:
    """The leaves of `shapes` laid out from byte `at` of `body`: views, no copy."""
    leaves = []
    for shape, dtype, _ in shapes:
        n = torch.Size(shape).numel() * dtype.itemsize
        leaves.append(body[at:at + n].view(dtype).view(shape))
        at += aligned(n)
    return leaves


class Link:
    """A generation link from `peer`: one receive always posted ahead, of a size both ends compute alike (the
    largest of the link's last `history` envelopes; `MIN_CAPACITY` before the first), so a small message arriving
    while the rank computes is already there. `Wire.send(..., capacity=link.capacity)` on the sending end
    keeps the same history (`sent`)."""

    def __init__(self, wire: Wire, peer: int, history: int, *, receiving: bool) -> None:
        self.wire, self.peer = wire, peer
        self.sizes: deque[int] = deque([MIN_CAPACITY], maxlen=history)
        self.posted = wire.post(peer, self.capacity) if receiving else None

    @property
    def capacity(self) -> int:
        return max(self.sizes)

    def sent(self, size: int) -> None:
        self.sizes.append(size)

    def receive(self, *, what: str, doing: object) -> Envelope | None:
        """The next envelope from the peer (None: the link's end); posts the receive of the one after it."""
        header, body = self.wire.take(self.posted, what=what, doing=doing)
        if header[0] == END:
            self.posted = None
            return None
        self.sizes.append(header[-1])
        self.posted = self.wire.post(self.peer, self.capacity)
        return self.wire.open(self.peer, header, body)
