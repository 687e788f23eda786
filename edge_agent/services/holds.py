"""Holds (R6): keep a file, or every file of a case, from being purged until released."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.catalog import UnknownFile
from edge_agent.catalog.reports import Hold
from edge_agent.ops.retention import HoldError, active_holds, place_hold, release_hold
from edge_agent.services.workspace import Result, Workspace, refusals


@dataclass(frozen=True)
class Placed(Result):
    hold_id: int
    file_id: str | None
    case_id: str | None
    reason: str


@dataclass(frozen=True)
class Released(Result):
    """Holds released, and (releasing a case) its evidence files that are routine again."""

    released_holds: int
    reclassified_routine: int
    file_id: str | None
    case_id: str | None


def place(ws: Workspace, *, reason: str, file_id: str | None = None, case_id: str | None = None) -> Placed:
    """Hold one file or (`case_id`) every file of a case, also those tagged with it later."""
    with refusals(HoldError, UnknownFile):
        file_id = ws.file_id(file_id) if file_id else file_id
        hold_id = place_hold(ws.catalog, reason=reason, file_id=file_id, case_id=case_id)
    return Placed(hold_id, file_id, case_id, reason)


def release(ws: Workspace, *, reason: str, file_id: str | None = None, case_id: str | None = None) -> Released:
    """Release the active holds on a file or a case; releasing a case ends its files' evidence class."""
    with refusals(HoldError, UnknownFile):
        file_id = ws.file_id(file_id) if file_id else file_id
        released, reclassified = release_hold(ws.catalog, reason=reason, file_id=file_id, case_id=case_id,
                                              sealer=ws.sealer if case_id is not None else None)
    return Released(released, reclassified, file_id, case_id)


def active(ws: Workspace) -> tuple[Hold, ...]:
    """Holds not released, oldest first."""
    return tuple(Hold.from_row(row) for row in active_holds(ws.catalog))
