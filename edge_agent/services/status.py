"""`edge-agent status`: what is collected, what waits, what is wrong, and the running daemon's live view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.catalog.files import Backlog
from edge_agent.catalog.reports import Alarm
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.ops.health import read_health_file
from edge_agent.services.workspace import Result, Workspace


@dataclass(frozen=True)
class Status(Result):
    """The catalog's counts and backlog, active alarms, and the daemon's last fresh snapshot (None if the
    daemon is not running, or its snapshot may not be read)."""

    files_by_state: Mapping[str, int]
    unsynced: Backlog
    oldest_unsynced_age_s: int | None
    alarms: tuple[Alarm, ...]
    last_sync_ms: int | None
    daemon: Mapping[str, Any] | None
    chain: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "files_by_state": dict(self.files_by_state),
            "unsynced": {"files": self.unsynced.files, "bytes": self.unsynced.bytes,
                         "oldest_age_s": self.oldest_unsynced_age_s},
            "alarms": [a.as_dict() for a in self.alarms],
            "last_sync_ms": self.last_sync_ms,
            "daemon": self.daemon,
            "chain": dict(self.chain),
        }


def status(ws: Workspace) -> Status:
    reports = ws.reports
    unsynced = reports.unsynced()
    return Status(
        files_by_state=reports.counts_by_state(),
        unsynced=unsynced,
        oldest_unsynced_age_s=unsynced.oldest_age_s(now_ms()),
        alarms=tuple(reports.active_alarms()),
        last_sync_ms=reports.last_sync_ms(),
        daemon=daemon_snapshot(ws.config),
        chain=chain_standing(ws),
    )


def chain_standing(ws: Workspace) -> dict[str, Any]:
    """How far the platform holds this agent's document chain: the local head, the highest chain receipt kept
    (docs/PROTOCOL.md section 10) and the last checkpoint it covers."""
    head = ws.catalog.documents.head()
    kept = ws.catalog.chain_receipts.get()
    checkpoint = kept.checkpoint if kept is not None else None
    return {"head_seq": head[0] if head else 0,
            "receipted_seq": kept.seq if kept else None,
            "receipted_ms": kept.received_ms if kept else None,
            "checkpoint_seq": kept.checkpoint_seq if kept else None,
            "checkpoint_id": checkpoint.get("checkpoint_id") if checkpoint else None}


def daemon_snapshot(config: AgentConfig) -> dict[str, Any] | None:
    """The running daemon's last health snapshot, if fresh (three health intervals, at least 90 s)."""
    return read_health_file(config.agent.data_dir, max(3 * config.health.interval_s, 90))
