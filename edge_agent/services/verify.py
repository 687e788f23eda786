"""`edge-agent verify`: re-hash stored files, check every manifest signature and both chains."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_agent.catalog import UnknownFile
from edge_agent.clock import now_ms
from edge_agent.evidence.verify import Finding, verify_all
from edge_agent.ops.alarms import TAMPER
from edge_agent.services.workspace import Workspace, refusals


@dataclass(frozen=True)
class VerifyReport:
    checked_files: int
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {"checked_files": self.checked_files, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}


def verify(ws: Workspace, file_ids: list[str] | None = None, *, reason: str | None = None) -> VerifyReport:
    """Check `file_ids`, or (None or empty) every stored file, the document chain and the audit log.
    The request is audited; any finding raises a `tamper` alarm (a custodian clears it after investigating)."""
    catalog, layout, key = ws.catalog, ws.layout, ws.key
    catalog.audit("verify", subject=",".join(file_ids) if file_ids else "all", reason=reason)
    checked = 0

    def tick(_record: object) -> None:
        nonlocal checked
        checked += 1

    with refusals(UnknownFile):
        findings = verify_all(catalog, layout, key, file_ids or None, progress=tick)
    if findings:
        catalog.raise_alarm(f"tamper:verify:{now_ms() // 1000}", TAMPER, "verify",
                            f"verify found {len(findings)} problem(s); first: {findings[0]}")
    return VerifyReport(checked, tuple(findings))
