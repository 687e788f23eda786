"""The `files` table: one row per source file, its life moved only by `Files.transition`.

`Files.transition` checks the edge against `TRANSITIONS` and writes the row and its audit entry in one
transaction; `Files.update` sets bookkeeping columns and refuses `state`. Every query the agent asks about
files is a method here, so their SQL (and the indexes they rely on) stay next to the schema.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ulid import ULID

from edge_agent.catalog import audit
from edge_agent.catalog import states as state_sets
from edge_agent.catalog.schema import (
    FILES_FINGERPRINT,
    FILES_SEND_ORDER,
    FILES_STORED_SIZE,
    FILES_SYNCED_MS,
    LANE_RECORDER,
    SOURCE_FINGERPRINT_KEY,
)
from edge_agent.catalog.states import STORED_FILES, State, state_in
from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json

if TYPE_CHECKING:
    from collections.abc import Iterable

    from edge_agent.catalog import Catalog


@dataclass(frozen=True)
class Backlog:
    """Files in a set of states (UNSYNCED: not on the platform yet; SYNC_QUEUE: waiting for upload): how many,
    their bytes (the stored size, else the source's), and when the oldest reached the agent (its ingest, else its
    discovery; None when there are none). The one definition health, alarms, status and sync all show."""

    files: int
    bytes: int
    oldest_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "oldest_ms": self.oldest_ms}

    def oldest_age_s(self, now_ms: int) -> int | None:
        """How long the oldest has waited, in whole seconds (never negative after a clock step back)."""
        return None if self.oldest_ms is None else max(0, (now_ms - self.oldest_ms) // 1000)


class TransitionError(Exception):
    """A file was asked to move along an edge the state machine does not have."""


class UnknownFile(KeyError):
    def __str__(self) -> str:
        return f"no file with id {self.args[0]!r} in the catalog (see: edge-agent files list)"


def new_id() -> str:
    """A ULID with all 80 bits of randomness fresh (python-ulid's own are monotonic within a millisecond: the
    files of one discovery pass then shared 24 of 26 characters, and no short prefix told them apart in the
    CLI's list views)."""
    return str(ULID.from_bytes(now_ms().to_bytes(6, "big") + os.urandom(10)))


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    state: str
    kind: str
    device_id: str
    dock: str | None
    slot: int | None
    session_id: str | None
    volume_label: str | None
    original_path: str
    source_path: str | None
    source_size: int | None
    source_mtime_ns: int | None
    officer_id: str | None
    case_id: str | None
    party: str | None
    recorded_start_ms: int | None
    recorded_end_ms: int | None
    ingested_at_ms: int | None
    size: int | None
    sha256: str | None
    store_path: str | None
    manifest_sha256: str | None
    media: str | None
    retention: str
    lane: int
    clock_offset_ms: int | None
    created_ms: int
    updated_ms: int
    synced_ms: int | None
    cleared_ms: int | None
    purged_ms: int | None
    attempts: int
    last_error: str | None
    extras: str | None = None  # the source's own manifest keys, canonical JSON (see `source_extras`)
    source_fingerprint: str | None = None  # a recorder file's `digest.fingerprint` at discovery

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        try:
            return cls(**{name: row[name] for name in _FIELDS})
        except IndexError:  # a catalog opened read-only before its migration to the current schema
            present = set(row.keys())
            return cls(**{name: row[name] for name in _FIELDS if name in present})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def source_extras(self) -> dict[str, Any]:
        """The extras given at discovery, as a dict (empty when none were given)."""
        return json.loads(self.extras) if self.extras else {}


_FIELDS = tuple(f.name for f in fields(FileRecord))
COLUMNS = frozenset(_FIELDS)

# A file is purgeable only if every one of these holds; the same text guards the final check in `purge`.
_PURGEABLE = (
    f"{state_in(state_sets.PURGEABLE_STATES, 'f.state')} AND f.retention = 'routine' AND f.store_path IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.released_ms IS NULL AND (h.file_id = f.file_id"
    " OR (h.case_id IS NOT NULL AND h.case_id = f.case_id)))"
)


def _placeholders(values: Iterable[Any]) -> str:
    return ",".join("?" for _ in values)


class Files:
    """Repository of the `files` table. `catalog.files(...)` (calling it) lists rows as before."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    # -- one file -------------------------------------------------------------------------------

    def get(self, file_id: str) -> FileRecord:
        rows = self._catalog.query("SELECT * FROM files WHERE file_id = ?", (file_id,))
        if not rows:
            raise UnknownFile(file_id)
        return FileRecord.from_row(rows[0])

    def state_of(self, file_id: str) -> State | None:
        """The file's state, None if the catalog has no such file."""
        rows = self._catalog.query("SELECT state FROM files WHERE file_id = ?", (file_id,))
        return State(rows[0][0]) if rows else None

    def find_source(self, device_id: str, original_path: str, source_size: int, source_mtime_ns: int,
                    fingerprint: str | None = None) -> FileRecord | None:
        """The row of this source identity: device, path, size, mtime and content fingerprint (None: a row
        recorded without one, as camera segments and files found before fingerprints are)."""
        rows = self._catalog.query(
            "SELECT * FROM files WHERE device_id = ? AND original_path = ? AND source_size = ?"
            f" AND source_mtime_ns = ? AND {SOURCE_FINGERPRINT_KEY} = ?",
            (device_id, original_path, source_size, source_mtime_ns, fingerprint or ""))
        return FileRecord.from_row(rows[0]) if rows else None

    def at_source(self, device_id: str, original_path: str, source_size: int,
                  source_mtime_ns: int) -> list[FileRecord]:
        """Every row with this device, path, size and mtime whatever its content (twins), newest first."""
        rows = self._catalog.query(
            "SELECT * FROM files WHERE device_id = ? AND original_path = ? AND source_size = ?"
            " AND source_mtime_ns = ? ORDER BY created_ms DESC, file_id DESC",
            (device_id, original_path, source_size, source_mtime_ns))
        return [FileRecord.from_row(r) for r in rows]

    def uncopied_at(self, device_id: str, original_path: str) -> list[FileRecord]:
        """The device's rows at this path that nothing has copied yet (`discovered`, no hash), newest first."""
        rows = self._catalog.query(
            "SELECT * FROM files WHERE device_id = ? AND original_path = ? AND state = ? AND sha256 IS NULL"
            " ORDER BY created_ms DESC, file_id DESC", (device_id, original_path, State.DISCOVERED.value))
        return [FileRecord.from_row(r) for r in rows]

    def with_fingerprint(self, device_id: str, fingerprint: str) -> list[FileRecord]:
        """The device's files whose content has this fingerprint (any path; plain or confirmed, as
        `digest.confirmed_fingerprint` writes it: `<fingerprint>+<sha256>`), oldest first."""
        rows = self._catalog.query(
            f"SELECT * FROM files INDEXED BY {FILES_FINGERPRINT} WHERE device_id = ? AND (source_fingerprint = ?"
            " OR (source_fingerprint > ? AND source_fingerprint < ?)) ORDER BY created_ms, file_id",
            (device_id, fingerprint, fingerprint + "+", fingerprint + ","))   # ',' sorts right after '+'

        return [FileRecord.from_row(r) for r in rows]

    def discover(self, *, kind: str, device_id: str, original_path: str, source_path: str | None,
                 source_size: int, source_mtime_ns: int, dock: str | None = None, slot: int | None = None,
                 session_id: str | None = None, volume_label: str | None = None,
                 officer_id: str | None = None, recorded_start_ms: int | None = None,
                 recorded_end_ms: int | None = None, clock_offset_ms: int | None = None,
                 lane: int = LANE_RECORDER, actor: str | None = None,
                 extras: dict[str, Any] | None = None,
                 source_fingerprint: str | None = None) -> tuple[FileRecord, bool]:
        """Record a source file. Returns (record, created); a file seen before (the same device, path, size,
        mtime and `source_fingerprint`) is not added twice. `extras` (a JSON object: the source's own
        manifest keys) is stored as canonical JSON."""
        if extras is not None and not isinstance(extras, dict):
            raise TypeError(f"extras must be a dict of manifest keys, got {type(extras).__name__}")
        extras_json = canonical_json(extras).decode("utf-8") if extras is not None else None
        with self._catalog.transaction() as conn:
            existing = self.find_source(device_id, original_path, source_size, source_mtime_ns, source_fingerprint)
            if existing is not None:
                return existing, False
            file_id, ts = new_id(), now_ms()
            conn.execute(
                "INSERT INTO files (file_id, state, kind, device_id, dock, slot, session_id, volume_label,"
                " original_path, source_path, source_size, source_mtime_ns, officer_id, recorded_start_ms,"
                " recorded_end_ms, clock_offset_ms, lane, retention, created_ms, updated_ms, attempts, extras,"
                " source_fingerprint) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,?,?)",
                (file_id, State.DISCOVERED, kind, device_id, dock, slot, session_id, volume_label,
                 original_path, source_path, source_size, source_mtime_ns, officer_id, recorded_start_ms,
                 recorded_end_ms, clock_offset_ms, lane, "routine", ts, ts, extras_json, source_fingerprint),
            )
            detail = {"device_id": device_id, "path": original_path, "size": source_size}
            if source_fingerprint is not None:
                detail["fingerprint"] = source_fingerprint
            audit.append(conn, "file.discovered", subject=file_id, actor=actor, detail=detail)
        return self.get(file_id), True

    def transition(self, file_id: str, to: State, *, expect: State | None = None, actor: str | None = None,
                   reason: str | None = None, audit_detail: dict[str, Any] | None = None,
                   **columns: Any) -> FileRecord:
        """Move one file to `to`, setting `columns`, in one transaction with its audit entry."""
        _check_columns(columns)
        with self._catalog.transaction() as conn:
            row = conn.execute("SELECT state FROM files WHERE file_id = ?", (file_id,)).fetchone()
            if row is None:
                raise UnknownFile(file_id)
            current = State(row[0])
            if expect is not None and current != expect:
                raise TransitionError(f"file {file_id} is {current}, expected {expect}")
            if to not in state_sets.TRANSITIONS[current]:
                raise TransitionError(f"file {file_id}: {current} -> {to} is not an allowed transition")
            columns["state"] = str(to)
            self._set(conn, file_id, columns)
            detail = {"from": str(current), "to": str(to), **(audit_detail or {})}
            audit.append(conn, f"file.{to}", subject=file_id, reason=reason, actor=actor, detail=detail)
        return self.get(file_id)

    def update(self, file_id: str, **columns: Any) -> None:
        """Set bookkeeping columns (errors, attempts, case/party/lane of an annotation) that are not a state
        change; joins the caller's transaction if there is one. `state` is refused: use `transition`."""
        if "state" in columns:
            raise TransitionError(f"file {file_id}: update() cannot set state (to {columns['state']!r}); "
                                  "use Catalog.transition, which checks the state machine and audits the move")
        _check_columns(columns)
        with self._catalog.transaction() as conn:
            self._set(conn, file_id, columns)

    @staticmethod
    def _set(conn: sqlite3.Connection, file_id: str, columns: dict[str, Any]) -> None:
        columns["updated_ms"] = now_ms()
        assignments = ", ".join(f"{name} = ?" for name in columns)
        conn.execute(f"UPDATE files SET {assignments} WHERE file_id = ?", (*columns.values(), file_id))

    # -- lists ----------------------------------------------------------------------------------

    def select(self, *, states: Iterable[str] | None = None, where: str = "", params: tuple[Any, ...] = (),
               order: str = "created_ms, file_id", limit: int | None = None) -> list[FileRecord]:
        """Rows in `states` matching the `where` fragment, in `order`. Prefer a named query below."""
        clauses, args = [], list(params)
        states = list(states or ())
        if states:
            clauses.append(f"state IN ({_placeholders(states)})")
            args[:0] = states
        if where:
            clauses.append(f"({where})")
        sql = "SELECT * FROM files"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [FileRecord.from_row(r) for r in self._catalog.query(sql, tuple(args))]

    __call__ = select

    def sealed_after(self, file_id: str, limit: int) -> list[FileRecord]:
        """Files with a signed manifest (SEALED_STATES) whose id sorts after `file_id`, by id: a resumable walk."""
        return self.select(states=state_sets.SEALED_STATES, where="file_id > ?", params=(file_id,), order="file_id",
                           limit=limit)

    def of_case(self, case_id: str) -> list[FileRecord]:
        """Every file tagged with `case_id`, in recording order."""
        return self.select(where="case_id = ?", params=(case_id,), order="recorded_start_ms, file_id")

    def without_officer(self, device_id: str, from_ms: int, to_ms: int | None) -> list[FileRecord]:
        """Files of `device_id` recorded in [from_ms, to_ms) (to_ms None: open) that have no officer yet."""
        rows = self._catalog.query(
            "SELECT * FROM files WHERE device_id = ? AND officer_id IS NULL AND recorded_start_ms >= ?"
            " AND (? IS NULL OR recorded_start_ms < ?) ORDER BY recorded_start_ms",
            (device_id, from_ms, to_ms, to_ms))
        return [FileRecord.from_row(r) for r in rows]

    def next_to_send(self, limit: int = 1, exclude: set[str] | frozenset[str] = frozenset()) -> list[FileRecord]:
        """Sealed files in lane order: evidence and held first, recorder files oldest first, cameras."""
        rows = self._catalog.query(
            f"SELECT * FROM files INDEXED BY {FILES_SEND_ORDER} WHERE {state_in(state_sets.SYNC_QUEUE)}"
            " ORDER BY lane, COALESCE(recorded_start_ms, created_ms), file_id LIMIT ?",
            (limit + len(exclude),),
        )
        out = [FileRecord.from_row(r) for r in rows if r["file_id"] not in exclude]
        return out[:limit]

    # -- measures -------------------------------------------------------------------------------

    def counts_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._catalog.query("SELECT state, COUNT(*) FROM files GROUP BY state")}

    def backlog(self, states: Iterable[str]) -> Backlog:
        """The files in `states` (see `Backlog`)."""
        wanted = list(states)
        row = self._catalog.query(
            "SELECT COUNT(*), COALESCE(SUM(COALESCE(size, source_size)), 0), MIN(COALESCE(ingested_at_ms, created_ms))"
            f" FROM files WHERE state IN ({_placeholders(wanted)})", tuple(wanted))[0]
        return Backlog(int(row[0]), int(row[1]), row[2])

    def stored_bytes(self) -> int:
        """Bytes held in the local store (STORED_FILES): what counts against max_disk_gb."""
        rows = self._catalog.query(
            f"SELECT COALESCE(SUM(size), 0) FROM files INDEXED BY {FILES_STORED_SIZE} WHERE {STORED_FILES}")
        return int(rows[0][0])

    def ingested_since(self, since_ms: int) -> tuple[int, int | None]:
        """(bytes ingested at or after `since_ms`, when the first of them was ingested)."""
        row = self._catalog.query(
            "SELECT COALESCE(SUM(size), 0), MIN(ingested_at_ms) FROM files WHERE ingested_at_ms >= ?",
            (since_ms,))[0]
        return int(row[0]), row[1]

    def unsynced_since(self, cutoff_ms: int) -> tuple[int, int | None]:
        """(count, oldest arrival) of UNSYNCED files that reached the agent at or before `cutoff_ms`."""
        unsynced = list(state_sets.UNSYNCED)
        row = self._catalog.query(
            f"SELECT COUNT(*), MIN(COALESCE(ingested_at_ms, created_ms)) FROM files WHERE state IN "
            f"({_placeholders(unsynced)}) AND COALESCE(ingested_at_ms, created_ms) <= ?", (*unsynced, cutoff_ms))[0]
        return int(row[0]), row[1]

    # -- retention ------------------------------------------------------------------------------

    def purgeable(self, *, synced_before_ms: int, limit: int) -> list[FileRecord]:
        """Routine, confirmed, unheld files still on disk, confirmed at or before `synced_before_ms`, the
        longest-confirmed first."""
        # In synced_ms order through its index: a pass stays quick on a catalog of millions of files.
        rows = self._catalog.query(
            f"SELECT f.* FROM files f INDEXED BY {FILES_SYNCED_MS} WHERE {_PURGEABLE} AND f.synced_ms <= ?"
            " ORDER BY f.synced_ms, f.file_id LIMIT ?", (synced_before_ms, limit))
        return [FileRecord.from_row(r) for r in rows]

    def if_purgeable(self, file_id: str) -> FileRecord | None:
        """The file if it is purgeable right now (call inside the transaction that purges it)."""
        rows = self._catalog.query(f"SELECT f.* FROM files f WHERE f.file_id = ? AND {_PURGEABLE}", (file_id,))
        return FileRecord.from_row(rows[0]) if rows else None

    def reclassify_case(self, case_id: str, *, from_class: str, to_class: str) -> int:
        """Move the files of `case_id` in retention class `from_class` to `to_class`. Returns how many."""
        with self._catalog.transaction() as conn:
            cur = conn.execute("UPDATE files SET retention = ?, updated_ms = ? WHERE case_id = ? AND retention = ?",
                               (to_class, now_ms(), case_id, from_class))
            return cur.rowcount


def _check_columns(columns: dict[str, Any]) -> None:
    unknown = set(columns) - COLUMNS
    if unknown:
        raise ValueError(f"files has no column(s) {', '.join(sorted(unknown))}")
