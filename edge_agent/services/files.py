"""Collected files: list them, show one with its manifest and history, view one (R7: who, why, approved by)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.atrest import AtRestError, PlainFile, is_encrypted
from edge_agent.catalog import FileRecord, State, UnknownFile
from edge_agent.catalog import audit as audit_log
from edge_agent.catalog.reports import AuditEntry
from edge_agent.evidence.receipts import PinnedKeys, ReceiptTrust
from edge_agent.i18n import N_
from edge_agent.services.workspace import Result, ServiceError, Workspace, refusals


@dataclass(frozen=True)
class FileDetail(Result):
    """One file's catalog row, its signed manifest (None before sealing), its audit history, and the platform's
    signed receipt (None before it synced) with why it does not verify now (None when it does)."""

    file: FileRecord
    manifest: dict[str, Any] | None
    history: tuple[AuditEntry, ...]
    receipt: dict[str, Any] | None = None
    receipt_problem: str | None = None


@dataclass(frozen=True)
class Viewing(Result):
    """Where to play a file back: the stored file, or the copy made for it."""

    file_id: str
    path: Path


def list_files(ws: Workspace, *, states: list[str] | None = None, device_id: str | None = None,
               case_id: str | None = None, limit: int = 100) -> tuple[FileRecord, ...]:
    """Files, newest first, optionally only these states, this device, this case."""
    return tuple(ws.reports.files(states=states, device_id=device_id, case_id=case_id, limit=limit))


@dataclass(frozen=True)
class FilePage(Result):
    """One page of `files list`: the files, newest first; how many match in all; `next_cursor` to pass for
    the page after this one (None on the last page); each file's short id as list views show it."""

    files: tuple[FileRecord, ...]
    total: int
    limit: int | None
    next_cursor: str | None
    short_ids: Mapping[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": len(self.files), "limit": self.limit, "next_cursor": self.next_cursor,
                "files": [f.as_dict() for f in self.files]}


def page(ws: Workspace, *, states: list[str] | None = None, device_id: str | None = None,
         case_id: str | None = None, since_ms: int | None = None, limit: int | None = 50,
         cursor: str | None = None) -> FilePage:
    """A page of files, newest first (`limit` None: all of them), from `cursor` (a page's `next_cursor`)."""
    reports = ws.reports
    after = _after(cursor) if cursor else None
    files = reports.files(states=states, device_id=device_id, case_id=case_id, since_ms=since_ms, after=after,
                          limit=None if limit is None else limit + 1)
    more = limit is not None and len(files) > limit
    files = files[:limit] if limit is not None else files
    total = reports.count_files(states=states, device_id=device_id, case_id=case_id, since_ms=since_ms)
    next_cursor = f"{files[-1].created_ms}.{files[-1].file_id}" if more and files else None
    return FilePage(tuple(files), total, limit, next_cursor, ws.short_ids([f.file_id for f in files]))


def _after(cursor: str) -> tuple[int, str]:
    created, _, file_id = cursor.partition(".")
    if not created.isdigit() or not file_id:
        raise ServiceError(N_("{cursor!r} is not a cursor: pass the next_cursor of the page before"), cursor=cursor)
    return int(created), file_id


def show(ws: Workspace, file_id: str, *, reason: str | None = None) -> FileDetail:
    """One file; the access is audited (and so is the last entry of the history returned)."""
    file_id = ws.file_id(file_id)
    with refusals(UnknownFile):
        record = ws.catalog.get(file_id)
    ws.catalog.audit("files.show", subject=file_id, reason=reason)
    manifest_path = ws.layout.manifest_path(file_id)
    manifest = json.loads(manifest_path.read_bytes()) if manifest_path.exists() else None
    receipt = ws.catalog.receipts.get(file_id)
    trust = ReceiptTrust(ws.config.agent.id, PinnedKeys(ws.config.mqtt.receiver_keys))
    problem = trust.problem(receipt, record) if receipt is not None else None
    return FileDetail(record, manifest, tuple(ws.reports.history(file_id)), receipt, problem)


def view(ws: Workspace, file_id: str, *, reason: str, approved_by: str, to: Path | None = None) -> Viewing:
    """Play back a stored file: audits who viewed it, why and on whose approval; copies it into `to` if given."""
    catalog = ws.catalog
    if not reason.strip() or not approved_by.strip():
        raise ServiceError(N_("viewing needs --reason and --approved-by (R7)"))
    file_id = ws.file_id(file_id)
    with refusals(UnknownFile):
        record = catalog.get(file_id)
    if record.state == State.PURGED or not record.store_path:
        raise ServiceError(N_("{file_id} is not held locally (state {state}); view it on the platform"),
                           file_id=file_id, state=record.state)
    stored = ws.layout.data_dir / str(record.store_path)
    target = stored
    encrypted = is_encrypted(stored)
    if encrypted and to is None:
        raise ServiceError(N_("{file_id} is stored encrypted ([store] encrypt): give --to DIR for a plaintext "
                              "copy to play back"), file_id=file_id)
    if to is not None:
        to.mkdir(parents=True, exist_ok=True)
        target = to / f"{file_id}{stored.suffix}"
        if encrypted:
            try:
                with PlainFile(ws.layout.at_rest.reader(stored, file_id)) as plain, open(target, "wb") as out:
                    shutil.copyfileobj(plain, out, 1024 * 1024)
            except AtRestError as exc:
                target.unlink(missing_ok=True)
                raise ServiceError(N_("{file_id}: {error}; run: edge-agent verify {file_id}"), file_id=file_id,
                                   error=exc) from exc
        else:
            shutil.copyfile(stored, target)
    catalog.audit("file.viewed", subject=file_id, reason=reason,
                  detail={"approved_by": approved_by, "requested_by": audit_log.os_user(),
                          "copy": str(to) if to else None})
    return Viewing(file_id, target)
