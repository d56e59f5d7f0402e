"""Generation's messages between ranks: each packed into one byte envelope, the next one always posted ahead.

Decoding sends many small messages while both ranks compute. A receive posted only when it is needed
waits for the sender's communication thread to answer (milliseconds on busy cores); so each link keeps one
receive posted in advance, of a size both sides know: the largest of the link's last `history` messages (at
least 4 KiB). A message that does not fit sends its remainder as a second transfer. Layout, 8-byte aligned:

    header  int64[8]: kind, pass, group, stage, kept rows (-1: unchanged), signature id (-1: none),
                      signature bytes (sent the first time a shape crosses the link), total bytes
    signature bytes | kept rows int64[n] | each tensor's bytes
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..runtime.comm import Transport, rank_name, wait_or_raise
from ..runtime.values import Signature, flatten, unflatten

HEADER = 8
END = -1  # the kind of the header that closes a link
MIN_CAPACITY = 4096


@dataclass
class Message:
    kind: int
    keep: torch.Tensor | None  # the rows (of the previous pass) that go on, when some sequences finished
    value: Any  # a tree of tensors, or None


class Wire:
    """The generation links of one rank: it receives from `sources` and sends to `targets` (peer ranks)."""

    def __init__(self, transport: Transport, timeout: float, sources: set[int], targets: set[int], history: int,
                 device: torch.device) -> None:
        self.transport, self.timeout, self.device = transport, timeout, device
        self.sources, self.targets = sources, targets
        # (direction, peer) -> the link's last message sizes, kept alike on both of its ends
        self.sizes = {(way, peer): deque([MIN_CAPACITY], maxlen=history)
                      for way, peers in (("in", sources), ("out", targets)) for peer in peers}
        self.sent_sigs: dict[int, dict[Signature, int]] = {peer: {} for peer in targets}
        self.recv_sigs: dict[int, dict[int, Signature]] = {peer: {} for peer in sources}
        self.sends: list = []
        self.posted = {peer: self._post(peer) for peer in sources}

    def send(self, peer: int, key: tuple[int, int, int], message: Message) -> None:
        leaves, signature, sig_bytes = [], None, None
        if message.value is not None:
            leaves, spec = flatten(message.value, what="a generation value")
            leaves = [leaf.detach().contiguous() for leaf in leaves]
            signature = Signature.of(leaves, spec)
            ids = self.sent_sigs[peer]
            if signature not in ids:
                ids[signature] = len(ids)
                sig_bytes = signature.to_bytes()
        keep = message.keep
        parts = [sig_bytes] if sig_bytes is not None else []
        parts += [keep] if keep is not None else []
        parts += leaves
        header = [message.kind, *key, -1 if keep is None else len(keep),
                  -1 if signature is None else self.sent_sigs[peer][signature],
                  0 if sig_bytes is None else sig_bytes.numel(), 0]
        self._send_packed(peer, header, parts)

    def close(self) -> None:
        """Close every outgoing link, check every incoming one closed, and wait for the sends."""
        for peer in self.targets:
            self._send_packed(peer, [END] + [0] * (HEADER - 1), [])
        for peer in self.sources:
            header, _ = self._take(peer, "the end of generation")
            if header[0] != END:
                raise RuntimeError(f"{rank_name(self.transport, self.transport.rank)}: a generation message "
                                   f"from {rank_name(self.transport, peer)} came after its last item")
        for work, _, peer in self.sends:
            wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=peer, what="a generation send")
        self.sends.clear()

    def receive(self, peer: int, what: str) -> tuple[tuple[int, int, int], Message]:
        header, body = self._take(peer, what)
        kind, t, g, s, kept, sig_id, sig_bytes, _ = header
        at = _aligned(HEADER * 8)
        if sig_bytes:
            self.recv_sigs[peer][sig_id] = Signature.from_bytes(body[at:at + sig_bytes])
            at += _aligned(sig_bytes)
        keep = None
        if kept >= 0:
            keep = body[at:at + 8 * kept].view(torch.int64).to(self.device)
            at += 8 * kept
        value = None
        if sig_id >= 0:
            signature = self.recv_sigs[peer][sig_id]
            leaves = []
            for shape, dtype, _ in signature.leaves:
                n = torch.Size(shape).numel() * dtype.itemsize
                leaves.append(body[at:at + n].view(dtype).reshape(shape).to(self.device))
                at += _aligned(n)
            value = unflatten(leaves, signature.spec)
        return (t, g, s), Message(kind, keep, value)

    # --- envelopes -----------------------------------------------------------------------------------
    def _post(self, peer: int):
        buffer = torch.empty(max(self.sizes[("in", peer)]), dtype=torch.uint8, device=self.transport.device)
        return self.transport.irecv(buffer, peer), buffer

    def _send_packed(self, peer: int, header: list[int], parts: list[torch.Tensor]) -> None:
        raw = [part.reshape(-1).view(torch.uint8).to(self.transport.device) for part in parts]
        total = _aligned(HEADER * 8) + sum(_aligned(r.numel()) for r in raw)
        header[-1] = total
        capacity = max(self.sizes[("out", peer)])
        body = torch.zeros(max(total, capacity), dtype=torch.uint8, device=self.transport.device)
        body[:HEADER * 8] = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
        at = _aligned(HEADER * 8)
        for r in raw:
            body[at:at + r.numel()] = r
            at += _aligned(r.numel())
        chunks = [body[:capacity]] + ([body[capacity:total]] if total > capacity else [])
        for chunk in chunks:
            self.sends.append((self.transport.isend(chunk, peer), chunk, peer))
        self.sizes[("out", peer)].append(total)
        self.sends = [s for s in self.sends if not s[0].is_completed()]

    def _take(self, peer: int, what: str) -> tuple[list[int], torch.Tensor]:
        """The next message from `peer` (header, all its bytes); posts the receive of the one after it."""
        work, body = self.posted.pop(peer)
        wait_or_raise(work, timeout=self.timeout, transport=self.transport, peer=peer, what=what)
        header = body[:HEADER * 8].view(torch.int64).tolist()
        total = header[-1]
        if total > body.numel():
            rest = torch.empty(total - body.numel(), dtype=torch.uint8, device=self.transport.device)
            wait_or_raise(self.transport.irecv(rest, peer), timeout=self.timeout, transport=self.transport,
                          peer=peer, what=what)
            body = torch.cat([body, rest])
        self.sizes[("in", peer)].append(total)
        if header[0] != END:
            self.posted[peer] = self._post(peer)
        return header, body.cpu()


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8
