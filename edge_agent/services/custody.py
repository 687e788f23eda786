"""Custody: check a recorder out to an officer and back in, and tag files with a case and party."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.catalog import UnknownFile
from edge_agent.ops import custody
from edge_agent.ops.custody import Checkout, CustodyError
from edge_agent.ops.retention import RETENTION_CLASSES
from edge_agent.services.workspace import Result, Workspace, refusals

__all__ = ["RETENTION_CLASSES", "Annotation", "Assignment", "assign", "return_device", "tag"]


@dataclass(frozen=True)
class Assignment(Result):
    """A new checkout, and the files already collected that now carry its officer (signed annotations)."""

    checkout: Checkout
    files_given_officer: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.checkout), "files_given_officer": list(self.files_given_officer)}


@dataclass(frozen=True)
class Annotation(Result):
    """A signed annotation document (case, party, retention of one file), as written to annotations/."""

    document: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.document)


def assign(ws: Workspace, device_id: str, officer_id: str, *, at_ms: int | None = None,
           reason: str | None = None) -> Assignment:
    """Check `device_id` out to `officer_id` from `at_ms` (default now); files it recorded in the checkout
    that reached the agent without an officer get it by a signed annotation."""
    with refusals(CustodyError):
        checkout = custody.assign(ws.catalog, device_id, officer_id, at_ms=at_ms, reason=reason)
    backfilled = custody.backfill_officer(ws.catalog, ws.sealer, ws.layout, checkout)
    return Assignment(checkout, tuple(backfilled))


def return_device(ws: Workspace, device_id: str, *, at_ms: int | None = None,
                  reason: str | None = None) -> Checkout:
    """End the open checkout of `device_id` at `at_ms` (default now)."""
    with refusals(CustodyError):
        return custody.return_device(ws.catalog, device_id, at_ms=at_ms, reason=reason)


def tag(ws: Workspace, file_ids: list[str], *, case_id: str | None = None, party: str | None = None,
        retention: str | None = None, reason: str | None = None) -> tuple[Annotation, ...]:
    """Tag each file in turn; the first refusal stops there (the files before it stay tagged)."""
    catalog, sealer = ws.catalog, ws.sealer
    done = []
    for file_id in map(ws.file_id, file_ids):
        with refusals(CustodyError, UnknownFile):
            done.append(Annotation(custody.tag(catalog, sealer, ws.layout, file_id, case_id=case_id, party=party,
                                               retention=retention, reason=reason)))
    return tuple(done)
