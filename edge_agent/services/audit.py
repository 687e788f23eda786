"""`edge-agent audit`: read the tamper-evident audit log and check its hash chain."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.catalog import audit as audit_log
from edge_agent.catalog.reports import AuditEntry
from edge_agent.services.workspace import Result, Workspace


@dataclass(frozen=True)
class ChainCheck(Result):
    """How many entries the walk checked, and every edit, deletion or reordering it found."""

    entries: int
    ok: bool = field(init=False)  # no problems
    problems: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.problems)


def entries(ws: Workspace, *, subject: str | None = None, limit: int = 50) -> tuple[AuditEntry, ...]:
    """The newest `limit` entries, newest first, optionally only those about `subject`."""
    return tuple(ws.reports.audit_entries(subject=subject, limit=limit))


def check_chain(ws: Workspace) -> ChainCheck:
    count, problems = audit_log.verify(ws.catalog.conn)
    return ChainCheck(count, tuple(str(p) for p in problems))
