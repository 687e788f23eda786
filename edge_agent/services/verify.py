"""`edge-agent verify`: re-hash stored files, check every manifest signature, both chains and the platform's
receipt of every synced file; `verify --bag DIR`: check an exported bag from its own files alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import bagit

from edge_agent.catalog import UnknownFile
from edge_agent.clock import now_ms
from edge_agent.evidence.export import check_payload
from edge_agent.evidence.receipts import PinnedKeys, ReceiptTrust
from edge_agent.evidence.verify import Finding, verify_all
from edge_agent.ops.alarms import TAMPER
from edge_agent.services.workspace import Result, Workspace, refusals


@dataclass(frozen=True)
class VerifyReport(Result):
    checked_files: int
    ok: bool = field(init=False)  # no findings
    findings: tuple[Finding, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.findings)


def verify(ws: Workspace, file_ids: list[str] | None = None, *, reason: str | None = None) -> VerifyReport:
    """Check `file_ids`, or (None or empty) every stored file, the document chain and the audit log.
    The request is audited; any finding raises a `tamper` alarm (a custodian clears it after investigating)."""
    catalog, layout = ws.catalog, ws.layout
    file_ids = [ws.file_id(f) for f in file_ids or []]
    catalog.audit("verify", subject=",".join(file_ids) if file_ids else "all", reason=reason)
    checked = 0

    def tick(_record: object) -> None:
        nonlocal checked
        checked += 1

    with refusals(UnknownFile):
        findings = verify_all(catalog, layout, file_ids or None, progress=tick,
                              receipts=ReceiptTrust(ws.config.agent.id, PinnedKeys(ws.config.mqtt.receiver_keys)))
    if findings:
        catalog.raise_alarm(f"tamper:verify:{now_ms() // 1000}", TAMPER, "verify",
                            f"verify found {len(findings)} problem(s); first: {findings[0]}")
    return VerifyReport(checked, tuple(findings))


@dataclass(frozen=True)
class BagReport(Result):
    bag: Path
    ok: bool = field(init=False)  # no problems
    problems: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.problems)


def verify_bag(bag: Path) -> BagReport:
    """Check an exported bag from its files alone, as a third party does (docs/OPERATIONS.md): BagIt
    (RFC 8493), then the agent's key history through its rotation documents, every signature, every media
    file against its manifest. Needs no catalog and no config."""
    problems: list[str] = []
    try:
        bagit.Bag(str(bag)).validate(processes=1)
    except bagit.BagValidationError as exc:
        problems.extend([f"bagit: {d}" for d in exc.details] or [f"bagit: {exc}"])
    except bagit.BagError as exc:
        return BagReport(bag, (f"{bag} is not a bag: {exc}",))
    problems.extend(check_payload(bag / "data"))
    return BagReport(bag, tuple(problems))
