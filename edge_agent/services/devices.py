"""`edge-agent devices`: the recorders and cameras this agent has seen, with their custody."""

from __future__ import annotations

from edge_agent.catalog.reports import Device
from edge_agent.services.workspace import Workspace


def devices(ws: Workspace) -> tuple[Device, ...]:
    """Every device, by kind then id, with the officer it is checked out to and its file count."""
    return tuple(ws.reports.devices())
