"""`edge-agent audit`: read the tamper-evident audit log and check its hash chain, and that the key rotations
it records are the ones the signed rotation chain holds (evidence/keys.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.catalog import audit as audit_log
from edge_agent.catalog.reports import AuditEntry
from edge_agent.evidence.keys import key_history
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
    """The audit log's hash chain, and its `keys.rotated` entries against the signed key history: a rotation
    audited but not in the signed chain (or the reverse), or a broken rotation document, is a problem."""
    count, problems = audit_log.verify(ws.catalog.conn)
    keys = key_history(ws.catalog, ws.layout)
    found = [str(p) for p in problems] + [f"keys: {p}" for p in keys.problems]
    audited = ws.catalog.audit_log.subjects("keys.rotated")
    signed = [r.new_key_id for r in keys.rotations]
    found += [f"keys: rotation to {k} is in the audit log, not in the signed rotation chain" for k in audited
              if k not in signed]
    found += [f"keys: rotation to {k} is in the signed rotation chain, not in the audit log" for k in signed
              if k not in audited]
    return ChainCheck(count, tuple(found))
