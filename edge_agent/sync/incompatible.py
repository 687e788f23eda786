"""Loud on incompatibility: acks the agent cannot use are counted per file, never retried in silence.

The reader is tolerant (docs/PROTOCOL.md, "Reading an ack"): missing optional fields take their defaults,
unknown fields are ignored. What is still unusable (not JSON, nested too deep, too large, no `file_id` or
`state`, an unknown state, a `complete` without `sha256`, a field of the wrong type) is dropped; the sender
then times out, queries, and gets the same answer again. `IncompatibleAcks` counts those answers per file
(or, when not even a file id can be read, for the receiver as a whole) and, at `mqtt.incompatible_acks`,
raises the `sync_incompatible` alarm with an excerpt of the receiver's payload and the reason: in the
health snapshot's alarms, in `edge-agent status`, and as an alarm event. The first usable ack for that
file (any usable ack, for the receiver-wide count) clears it.

`unusable` runs on paho's network thread and only counts (under a lock); the alarm itself is written by
the sender thread (`raise_pending`, `usable`), which owns the catalog writes of the uplink.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

from edge_agent.catalog import Catalog
from edge_agent.protocol.wire import FILE_ID_PATTERN

log = logging.getLogger(__name__)

SYNC_INCOMPATIBLE = "sync_incompatible"
EXCERPT_BYTES = 200


@dataclass(frozen=True)
class Incompatible:
    """One alarm due: about `file_id` (None: the receiver as a whole), after `seen` unusable acks."""

    file_id: str | None
    seen: int
    reason: str
    excerpt: str

    @property
    def key(self) -> str:
        return f"{SYNC_INCOMPATIBLE}:{self.file_id}" if self.file_id else SYNC_INCOMPATIBLE


def file_id_of(payload: bytes) -> str | None:
    """The file an unusable ack is about, if even that much can be read from it."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    file_id = doc.get("file_id") if isinstance(doc, dict) else None
    return file_id if isinstance(file_id, str) and FILE_ID_PATTERN.match(file_id) else None


def excerpt_of(payload: bytes) -> str:
    text = payload[:EXCERPT_BYTES].decode("utf-8", errors="replace")
    return text + (f"… ({len(payload)} bytes)" if len(payload) > EXCERPT_BYTES else "")


class IncompatibleAcks:
    """Counts unusable acks per file and raises/clears `sync_incompatible` (see the module docstring)."""

    def __init__(self, catalog: Catalog, agent_id: str, threshold: int):
        self.catalog = catalog
        self.agent_id = agent_id
        self.threshold = threshold
        self._lock = threading.Lock()
        self._seen: dict[str | None, int] = {}
        self._pending: list[Incompatible] = []
        self._raised = {a["key"] for a in catalog.active_alarms() if a["kind"] == SYNC_INCOMPATIBLE}
        self.dropped = 0

    def unusable(self, payload: bytes, reason: str, *, readable: bool = True) -> None:
        """An ack that could not be used, for `reason` (network thread). `readable`: the payload was small
        enough to look for a file id in."""
        file_id = file_id_of(payload) if readable else None
        with self._lock:
            self.dropped += 1
            seen = self._seen.get(file_id, 0) + 1
            self._seen[file_id] = seen
            if seen == self.threshold:
                self._pending.append(Incompatible(file_id, seen, reason, excerpt_of(payload)))

    def raise_pending(self) -> None:
        """Write the alarms that came due (sender thread)."""
        with self._lock:
            due, self._pending = self._pending, []
        for item in due:
            about = f"file {item.file_id}" if item.file_id else "acks that name no file"
            message = (f"the receiver answered {about} {item.seen} times with an ack this agent cannot use "
                       f"({item.reason}); payload: {item.excerpt!r}. Nothing of it syncs until the receiver "
                       "speaks wire protocol v1: ask the platform team to check its acks against "
                       "docs/PROTOCOL.md ('Reading an ack')")
            if self.catalog.raise_alarm(item.key, SYNC_INCOMPATIBLE, item.file_id or self.agent_id, message):
                log.error("alarm raised key=%s kind=%s: %s", item.key, SYNC_INCOMPATIBLE, message)
            self._raised.add(item.key)

    def usable(self, file_id: str) -> None:
        """A usable ack for `file_id` arrived (sender thread): its count, and the receiver-wide one, restart."""
        with self._lock:
            if self._seen:
                self._seen.pop(file_id, None)
                self._seen.pop(None, None)
        if not self._raised:
            return
        for key in (f"{SYNC_INCOMPATIBLE}:{file_id}", SYNC_INCOMPATIBLE):
            if key in self._raised:
                self._raised.discard(key)
                if self.catalog.clear_alarm(key):
                    log.info("alarm cleared key=%s kind=%s", key, SYNC_INCOMPATIBLE)
