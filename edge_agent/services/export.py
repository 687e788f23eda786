"""`edge-agent export` (R7): a case as a BagIt bag, verified as it is written; approved and audited."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.evidence.export import ExportError, export_case
from edge_agent.services.workspace import Result, Workspace, refusals


@dataclass(frozen=True)
class CaseExport(Result):
    """The bag written; `not_local` are files purged here (their manifests only are in the bag); `problems`
    are verification failures of the bag (then it must not be handed over)."""

    bag: Path
    case_id: str
    files: int
    media_bytes: int
    not_local: tuple[str, ...]
    ok: bool = field(init=False)  # no problems
    problems: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.problems)


def export(ws: Workspace, *, case_id: str, dest: Path, reason: str, approved_by: str,
           requested_by: str | None = None) -> CaseExport:
    """Write the bag of `case_id` into `dest` (new or empty); `requested_by` defaults to the OS user."""
    catalog = ws.catalog
    with refusals(ExportError):
        result = export_case(catalog, ws.layout, ws.config, case_id=case_id, dest=dest, reason=reason,
                             approved_by=approved_by, requested_by=requested_by)
    return CaseExport(result.bag_dir, case_id, result.files, result.media_bytes, tuple(result.not_local),
                      tuple(result.problems))
