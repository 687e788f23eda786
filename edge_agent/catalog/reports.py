"""Read models: the catalog's answers to the questions a custodian (CLI, status page) asks.

`CatalogReports` wraps one `Catalog` and only reads, through `Catalog.query` and `Catalog.files`; each
answer is a frozen dataclass (or the catalog's own `FileRecord`) whose `as_dict()` has the table's
column names, in the table's order, so `--json` output keeps its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from edge_agent.catalog import Catalog, FileRecord
from edge_agent.catalog.files import Backlog
from edge_agent.catalog.states import SYNC_QUEUE, UNSYNCED


class RowModel:
    """A read model built from a row (`sqlite3.Row` or mapping) whose keys are the dataclass's field names."""

    @classmethod
    def from_row(cls, row: Any) -> Any:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Device(RowModel):
    """A row of `devices`, with its current checkout's officer and how many files it gave."""

    device_id: str
    kind: str
    model: str | None
    serial: str | None
    name: str | None
    first_seen_ms: int | None
    last_seen_ms: int | None
    info: str | None
    officer: str | None
    files: int


@dataclass(frozen=True)
class AuditEntry(RowModel):
    """A row of the hash-chained `audit` log."""

    seq: int
    ts_ms: int
    actor: str | None
    action: str
    subject: str | None
    reason: str | None
    detail: str | None
    prev: str | None
    hash: str | None


@dataclass(frozen=True)
class Alarm(RowModel):
    """A row of `alarms`; active while `cleared_ms` is None."""

    id: int
    key: str
    kind: str
    subject: str
    message: str
    raised_ms: int
    cleared_ms: int | None


@dataclass(frozen=True)
class Hold(RowModel):
    """A row of `holds`; active while `released_ms` is None."""

    id: int
    file_id: str | None
    case_id: str | None
    reason: str
    actor: str
    set_ms: int
    released_ms: int | None
    released_by: str | None


class CatalogReports:
    """Read-only questions about one catalog."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def counts_by_state(self) -> dict[str, int]:
        return self.catalog.counts_by_state()

    def unsynced(self) -> Backlog:
        """Files not on the platform yet (`UNSYNCED`); bytes are the stored size, else the source size."""
        return self.catalog.files.backlog(UNSYNCED)

    def sync_queue(self) -> Backlog:
        """Sealed files waiting for upload (`SYNC_QUEUE`), with their stored bytes."""
        return self.catalog.files.backlog(SYNC_QUEUE)

    def last_sync_ms(self) -> int | None:
        """When the platform last confirmed a file."""
        return self.catalog.query("SELECT MAX(synced_ms) FROM files")[0][0]

    def devices(self) -> list[Device]:
        """Every device seen, recorders and cameras, by kind then id."""
        rows = self.catalog.query(
            "SELECT d.*, (SELECT officer_id FROM checkouts c WHERE c.device_id = d.device_id AND c.to_ms IS NULL"
            " ORDER BY from_ms DESC LIMIT 1) AS officer, (SELECT COUNT(*) FROM files f WHERE f.device_id ="
            " d.device_id) AS files FROM devices d ORDER BY d.kind, d.device_id")
        return [Device.from_row(r) for r in rows]

    def files(self, *, states: list[str] | None = None, device_id: str | None = None, case_id: str | None = None,
              limit: int | None = None, since_ms: int | None = None,
              after: tuple[int, str] | None = None) -> list[FileRecord]:
        """Files, newest first, optionally only these states, this device, this case, collected since
        `since_ms`; `after` (created_ms, file_id) of the last row of a page starts the next page."""
        where, params = self._file_filter(device_id, case_id, since_ms)
        if after is not None:
            where.append("(created_ms < ? OR (created_ms = ? AND file_id < ?))")
            params += [after[0], after[0], after[1]]
        return self.catalog.files(states=states or None, where=" AND ".join(where), params=tuple(params),
                                  order="created_ms DESC, file_id DESC", limit=limit)

    def count_files(self, *, states: list[str] | None = None, device_id: str | None = None,
                    case_id: str | None = None, since_ms: int | None = None) -> int:
        """How many files `files` would list without a limit."""
        where, params = self._file_filter(device_id, case_id, since_ms)
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        sql = "SELECT COUNT(*) FROM files" + (" WHERE " + " AND ".join(where) if where else "")
        return int(self.catalog.query(sql, tuple(params))[0][0])

    @staticmethod
    def _file_filter(device_id: str | None, case_id: str | None, since_ms: int | None) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (("device_id = ?", device_id), ("case_id = ?", case_id), ("created_ms >= ?", since_ms)):
            if value is not None and value != "":
                where.append(clause)
                params.append(value)
        return where, params

    def file_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to `limit` file ids that start with `prefix`, in order (an index range: cheap)."""
        rows = self.catalog.query("SELECT file_id FROM files WHERE file_id >= ? AND file_id < ? ORDER BY file_id"
                                  " LIMIT ?", (prefix, prefix + "\U0010ffff", limit))
        return [r[0] for r in rows]

    def history(self, subject: str) -> list[AuditEntry]:
        """Every audit entry about `subject`, oldest first."""
        rows = self.catalog.query("SELECT * FROM audit WHERE subject = ? ORDER BY seq", (subject,))
        return [AuditEntry.from_row(r) for r in rows]

    def audit_entries(self, *, subject: str | None = None, limit: int = 50) -> list[AuditEntry]:
        """The newest `limit` audit entries, newest first, optionally only those about `subject`."""
        if subject:
            rows = self.catalog.query("SELECT * FROM audit WHERE subject = ? ORDER BY seq DESC LIMIT ?",
                                      (subject, limit))
        else:
            rows = self.catalog.query("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
        return [AuditEntry.from_row(r) for r in rows]

    def active_alarms(self) -> list[Alarm]:
        """Alarms not cleared yet, oldest first."""
        return [Alarm.from_row(r) for r in self.catalog.active_alarms()]
