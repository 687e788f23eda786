"""`edge-agent sync now`: ask the running agent to send now, optionally retrying rejected files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edge_agent.catalog import State, audit
from edge_agent.catalog.files import Backlog
from edge_agent.clock import now_ms
from edge_agent.services.workspace import Result, Workspace
from edge_agent.sync import SYNC_NOW_META

POLL_S = 0.5


@dataclass(frozen=True)
class SyncNow(Result):
    """The files queued again, what still waits to be sent when the call returned, and how many stay rejected."""

    retried: tuple[str, ...]
    waiting: Backlog
    rejected: int

    def as_dict(self) -> dict[str, Any]:
        return {"retried": list(self.retried), "waiting_files": self.waiting.files,
                "waiting_bytes": self.waiting.bytes, "rejected": self.rejected}


def sync_now(ws: Workspace, *, retry_rejected: bool = False, wait_s: float = 0.0,
             reason: str | None = None) -> SyncNow:
    """Set the flag the running uplink polls (it then reconnects without waiting out its backoff), audited.
    With `retry_rejected`, rejected files are queued again first. With `wait_s`, wait up to that long for
    the sync queue to empty."""
    catalog = ws.catalog
    retried = _retry_rejected(ws, reason) if retry_rejected else []
    with catalog.transaction() as conn:
        catalog.meta_set(conn, SYNC_NOW_META, str(now_ms()))
        audit.append(conn, "sync.now", reason=reason, detail={"retry_rejected": retried})
    waiting = ws.reports.sync_queue()
    deadline = time.monotonic() + wait_s
    while waiting.files and time.monotonic() < deadline:
        time.sleep(POLL_S)
        waiting = ws.reports.sync_queue()
    return SyncNow(tuple(retried), waiting, len(catalog.files(states=[State.REJECTED])))


def _retry_rejected(ws: Workspace, reason: str | None) -> list[str]:
    retried = []
    for record in ws.catalog.files(states=[State.REJECTED]):
        # Rejected by the receiver: sealed, send again. Rejected before sealing: copy it again.
        target = State.SEALED if record.manifest_sha256 else State.DISCOVERED
        ws.catalog.transition(record.file_id, target, expect=State.REJECTED,
                              reason=reason or "custodian retried a rejected file (sync now --retry-rejected)",
                              audit_detail={"previous_error": record.last_error})
        retried.append(record.file_id)
    return retried
