"""`edge-agent audit`: read the tamper-evident audit log and check its hash chain."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.catalog import audit as audit_log
from edge_agent.catalog.reports import AuditEntry
from edge_agent.evidence.verify import verify_audit_checkpoint
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
    """Walk the audit log's hash chain, and check that it still reaches the audit head of the last checkpoint
    the platform receipted (a removed tail with a rewound head passes the walk, not this)."""
    count, problems = audit_log.verify(ws.catalog.conn)
    beyond = verify_audit_checkpoint(ws.catalog)
    return ChainCheck(count, tuple(str(p) for p in problems) + tuple(str(f) for f in beyond))
