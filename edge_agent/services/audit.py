"""`edge-agent audit`: read the tamper-evident audit log and check its hash chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_agent.catalog import audit as audit_log
from edge_agent.catalog.reports import AuditEntry
from edge_agent.services.workspace import Workspace


@dataclass(frozen=True)
class ChainCheck:
    """How many entries the walk checked, and every edit, deletion or reordering it found."""

    entries: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "ok": self.ok, "problems": list(self.problems)}


def entries(ws: Workspace, *, subject: str | None = None, limit: int = 50) -> tuple[AuditEntry, ...]:
    """The newest `limit` entries, newest first, optionally only those about `subject`."""
    return tuple(ws.reports.audit_entries(subject=subject, limit=limit))


def check_chain(ws: Workspace) -> ChainCheck:
    count, problems = audit_log.verify(ws.catalog.conn)
    return ChainCheck(count, tuple(str(p) for p in problems))
