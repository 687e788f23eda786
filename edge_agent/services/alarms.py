"""Active alarms: list them; clear one a custodian dealt with (the reason is audited)."""

from __future__ import annotations

from edge_agent.catalog.reports import Alarm
from edge_agent.i18n import N_
from edge_agent.ops.alarms import clear_by_custodian
from edge_agent.services.workspace import ServiceError, Workspace


def active(ws: Workspace) -> tuple[Alarm, ...]:
    """Alarms not cleared yet, oldest first."""
    return tuple(ws.reports.active_alarms())


def clear(ws: Workspace, key: str, *, reason: str) -> str:
    """Clear the active alarm `key` (tamper investigated, recorder identified). Returns the key."""
    catalog = ws.catalog
    if not reason.strip():
        raise ServiceError(N_("say what was done about it: --reason"))
    if not clear_by_custodian(catalog, key, reason):
        raise ServiceError(N_("no active alarm with key {key!r} (see: edge-agent alarms list)"), key=key)
    return key
