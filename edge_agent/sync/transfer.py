"""One file's transfer as a pure state machine (wire protocol v1, docs/PROTOCOL.md sections 4 to 6).

No MQTT, no threads, no catalog, no clock of its own: every event carries `now` (monotonic seconds) and
returns the actions the caller must take, in order. The sender executes them on the wire; the uplink
applies a verdict to the catalog. "live" below is STREAMING or QUERYING.

    phase       event                                   actions                     next phase
    NEW         start (the file was sealed)             manifest                    STREAMING
    NEW         start (resumed: it was already sending) manifest, query             QUERYING
    STREAMING   receiving, no reason                    (have and outstanding kept) STREAMING
    any live    receiving with a reason, >1 s since     manifest; resend what       STREAMING
                the last manifest or query              `have` lacks
    any live    receiving with a reason, within 1 s     none (back off)             unchanged
    any live    receiving, reason `busy`                none until the ack timeout  QUERYING
    QUERYING    receiving (the answer)                  resend what `have` lacks    STREAMING
    any live    reconnected                             manifest, query             QUERYING
    any live    resync, if querying or nothing is out   manifest, query             QUERYING
    any live    no ack for ack_timeout_s while waiting  manifest, query             QUERYING
    any live    complete with the sealed SHA-256        mark synced                 SYNCED
    any live    complete with another SHA-256, rejected mark rejected               REJECTED

The caller checks a settling ack's receipt first (sync/receipts.py): an ack whose receipt proves nothing
never reaches the machine, and the transfer goes on as if it had not come.

Chunks are pulled, not pushed: the window spans every file in flight, so the sender asks `next_seq()`
whenever the window has room and reports `chunk_sent()`. What the receiver holds (`have`) comes only
from its acks; what is out (`outstanding`) is forgotten whenever the machine re-asks (a query), because
the answer says exactly what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edge_agent.protocol.wire import ACK_COMPLETE, ACK_REJECTED, REASON_BUSY, Ack, RangeSet, chunk_count

RESYNC_INTERVAL_S = 1.0   # a receiver lacking the manifest gets it again at most this often


class Phase(StrEnum):
    NEW = "new"               # nothing said to the receiver yet
    STREAMING = "streaming"   # sending what the receiver lacks, within the window
    QUERYING = "querying"     # manifest + query out; nothing more is sent until the answer
    SYNCED = "synced"         # the receiver stored the file with the sealed SHA-256 (terminal)
    REJECTED = "rejected"     # the receiver will not store the file as sent (terminal)


TERMINAL = frozenset({Phase.SYNCED, Phase.REJECTED})


@dataclass(frozen=True)
class SendManifest:
    """Publish the signed manifest (idempotent at the receiver)."""


@dataclass(frozen=True)
class SendQuery:
    """Publish a query: the receiver answers `receiving` with what it holds."""


@dataclass(frozen=True)
class MarkSynced:
    """The receiver confirmed the sealed SHA-256: the file is synced. `receipt`: the receiver's signed receipt
    that proves it (sync/receipts.py); the ledger records no file as synced without one."""

    sha256: str
    receipt: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class MarkRejected:
    """The file will not be stored as sent; `reason` is for a person. `receipt`: the signed rejection."""

    reason: str
    receipt: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Unverified:
    """A `complete` or `rejected` ack that proves nothing (no receipt, or one that does not verify or bind
    this file): it changes nothing."""

    reason: str


Action = SendManifest | SendQuery | MarkSynced | MarkRejected
Verdict = MarkSynced | MarkRejected
RESUME: tuple[Action, ...] = (SendManifest(), SendQuery())


def verdict(ack: Ack, sealed_sha256: str | None) -> Verdict:
    """What a `complete` or `rejected` ack means for a file sealed with `sealed_sha256`. Only a `complete`
    naming exactly that SHA-256 syncs a file; a `complete` with another one is a rejection (PROTOCOL.md 6).
    `sha256` and `reason` may be absent (None): a reader must not trust the sender to fill them."""
    if ack.state == ACK_COMPLETE and ack.sha256 is not None and ack.sha256 == sealed_sha256:
        return MarkSynced(ack.sha256)
    if ack.state == ACK_COMPLETE:
        return MarkRejected(f"receiver confirmed SHA-256 {ack.sha256}, but the manifest says {sealed_sha256}")
    if ack.state != ACK_REJECTED:
        raise ValueError(f"ack state {ack.state!r} is not a verdict (complete or rejected)")
    return MarkRejected(str(ack.reason) if ack.reason else "no reason given")


@dataclass
class Transfer:
    """The protocol state of one file on its way: what the receiver has, what is out, what to send next."""

    file_id: str
    size: int
    sha256: str
    chunk_size: int
    last_heard: float                 # last ack, or when we last (re)started talking (monotonic s)
    phase: Phase = Phase.NEW
    have: RangeSet = field(default_factory=RangeSet)
    outstanding: dict[int, float] = field(default_factory=dict)   # seq -> when sent
    cursor: int = 0
    last_resync: float = 0.0

    @property
    def total(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    # -- events ------------------------------------------------------------------------------------

    def start(self, *, resumed: bool, now: float) -> list[Action]:
        """First words about the file. Fresh (it was `sealed`): the manifest, then chunks at once.
        Resumed (`sending` before this process started): manifest + query, chunks after the answer."""
        if self.phase != Phase.NEW:
            return []
        return self._resume(now) if resumed else self._announce(now)

    def reconnected(self, now: float) -> list[Action]:
        """A new MQTT session: what the old one did not deliver, the query finds missing."""
        return [] if self.phase in TERMINAL else self._resume(now)

    def resync(self, now: float) -> list[Action]:
        """`sync now` or a `resync` command: re-ask a file that waits for an answer or has nothing out."""
        if self.phase in TERMINAL or (self.phase == Phase.STREAMING and self.outstanding):
            return []
        return self._resume(now)

    def receiving(self, ack: Ack, now: float) -> list[Action]:
        """A `receiving` ack: `have` is what the receiver durably holds. With a reason it could not use
        something (no manifest yet, a dropped chunk): manifest again and everything `have` lacks, at most
        once per RESYNC_INTERVAL_S however many such acks come. Without one while querying: the answer."""
        if self.phase in TERMINAL or self.phase == Phase.NEW:
            return []
        self.have = RangeSet(ack.have or ())
        self.outstanding = {s: t for s, t in self.outstanding.items() if s not in self.have}
        self.last_heard = now
        if ack.reason == REASON_BUSY:   # no room for a new transfer now: ask again after the ack timeout
            self.phase, self.outstanding = Phase.QUERYING, {}
            return []
        if ack.reason:
            if now - self.last_resync <= RESYNC_INTERVAL_S:
                return []   # backing off: the manifest just went
            actions = self._announce(now)
            self._rewind()
            return actions
        if self.phase == Phase.QUERYING:
            self.phase = Phase.STREAMING
            self._rewind()
        return []

    def settled(self, ack: Ack, checked: Verdict | None = None) -> list[Verdict]:
        """A `complete` or `rejected` ack: the transfer ends either way. `checked`: the verdict its receipt
        proved (sync/receipts.py `judge`), which wins over what the ack alone says."""
        if self.phase in TERMINAL:
            return []
        result = checked if checked is not None else verdict(ack, self.sha256)
        self.phase = Phase.SYNCED if isinstance(result, MarkSynced) else Phase.REJECTED
        return [result]

    def timed_out(self, now: float, ack_timeout_s: float) -> list[Action]:
        """No ack for `ack_timeout_s` while waiting for one (a query out, chunks out, or all sent):
        manifest + query, then resend only what `have` lacks."""
        if self.phase not in (Phase.STREAMING, Phase.QUERYING) or now - self.last_heard < ack_timeout_s:
            return []
        waiting = self.phase == Phase.QUERYING or self.outstanding or self.next_seq() is None
        return self._resume(now) if waiting else []

    def chunk_sent(self, seq: int, now: float) -> None:
        """Chunk `seq` went out. The ack clock starts with the first chunk out."""
        if not self.outstanding:
            self.last_heard = now
        self.outstanding[seq] = now

    # -- queries -----------------------------------------------------------------------------------

    def next_seq(self) -> int | None:
        """The next chunk to send: the first from the cursor that the receiver lacks and is not out;
        None while querying, when all are out or held, or once settled."""
        if self.phase != Phase.STREAMING:
            return None
        while self.cursor < self.total and (self.cursor in self.have or self.cursor in self.outstanding):
            self.cursor += 1
        return self.cursor if self.cursor < self.total else None

    def upcoming(self, after: int, limit: int) -> list[int]:
        """Up to `limit` chunks after `after` that will be sent as things stand (to read them ahead)."""
        wanted, seq = [], after + 1
        while seq < self.total and len(wanted) < limit:
            if seq not in self.have and seq not in self.outstanding:
                wanted.append(seq)
            seq += 1
        return wanted

    # -- internals ---------------------------------------------------------------------------------

    def _announce(self, now: float) -> list[Action]:
        self.phase = Phase.STREAMING
        self.last_heard = self.last_resync = now
        return [SendManifest()]

    def _resume(self, now: float) -> list[Action]:
        self._rewind()
        self.phase = Phase.QUERYING
        self.last_heard = self.last_resync = now
        return list(RESUME)

    def _rewind(self) -> None:
        self.cursor = 0
        self.outstanding.clear()
