"""The catalog: one SQLite database holding every file's life, the docking
sessions, devices, custody, holds, gaps, alarms, the signed-document chain and
the audit log.

A file's life is the state machine in `TRANSITIONS`; `Catalog.transition` is
the only way to move a file, and it does so in one transaction together with
its audit entry. Callers make the bytes durable first (see `durable`).

The connection is shared by the daemon's threads behind a lock; other
processes (the CLI) open their own connection, WAL lets them read while the
daemon writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlite_utils
from ulid import ULID

from edge_agent.catalog import audit, gaps
from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json


class State(StrEnum):
    DISCOVERED = "discovered"
    STAGED = "staged"
    SEALED = "sealed"
    SENDING = "sending"
    SYNCED = "synced"
    SOURCE_CLEARED = "source_cleared"
    PURGED = "purged"
    REJECTED = "rejected"


# The whole state machine. A transition not listed here is a bug, refused loudly.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.DISCOVERED: frozenset({State.STAGED, State.REJECTED}),
    State.STAGED: frozenset({State.SEALED, State.DISCOVERED, State.REJECTED}),
    State.SEALED: frozenset({State.SENDING}),
    State.SENDING: frozenset({State.SYNCED, State.SEALED, State.REJECTED}),
    State.SYNCED: frozenset({State.SOURCE_CLEARED, State.PURGED}),
    State.SOURCE_CLEARED: frozenset({State.PURGED}),
    State.PURGED: frozenset(),
    # A receiver's rejection is retried only by a custodian's decision (sync now --retry-rejected).
    State.REJECTED: frozenset({State.SEALED, State.DISCOVERED}),
}

# Files whose bytes are in the local store (what counts against max_disk_gb).
STORED_FILES = ("state IN ('staged', 'sealed', 'sending', 'synced', 'source_cleared', 'rejected')"
                " AND store_path IS NOT NULL")

# Sync lanes, lowest first: evidence and held files, recorder files, camera segments.
LANE_EVIDENCE, LANE_RECORDER, LANE_CAMERA = 0, 1, 2


class TransitionError(Exception):
    """A file was asked to move along an edge the state machine does not have."""


class UnknownFile(KeyError):
    def __str__(self) -> str:
        return f"no file with id {self.args[0]!r} in the catalog (see: edge-agent files list)"


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
    extras: str | None = None   # canonical JSON object: what the source adds to the manifest (a camera, gaps)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def new_id() -> str:
    return str(ULID())


def _schema(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db["files"].create(
        {
            "file_id": str, "state": str, "kind": str, "device_id": str, "dock": str, "slot": int,
            "session_id": str, "volume_label": str, "original_path": str, "source_path": str,
            "source_size": int, "source_mtime_ns": int, "officer_id": str, "case_id": str, "party": str,
            "recorded_start_ms": int, "recorded_end_ms": int, "ingested_at_ms": int, "size": int,
            "sha256": str, "store_path": str, "manifest_sha256": str, "media": str, "retention": str,
            "lane": int, "clock_offset_ms": int, "created_ms": int, "updated_ms": int, "synced_ms": int,
            "cleared_ms": int, "purged_ms": int, "attempts": int, "last_error": str, "extras": str,
        },
        pk="file_id", not_null={"state", "kind", "device_id", "original_path", "retention", "lane",
                                "created_ms", "updated_ms", "attempts"},
        defaults={"retention": "routine", "lane": LANE_RECORDER, "attempts": 0},
        if_not_exists=True,
    )
    files = db["files"]
    if "extras" not in files.columns_dict:   # catalogs made before source extras were kept on the row
        files.add_column("extras", str)
    files.create_index(["state", "lane", "recorded_start_ms"], if_not_exists=True)
    files.create_index(["device_id", "original_path", "source_size", "source_mtime_ns"],
                       unique=True, if_not_exists=True, index_name="files_source_identity")
    files.create_index(["session_id"], if_not_exists=True)
    files.create_index(["case_id"], if_not_exists=True)
    files.create_index(["synced_ms"], if_not_exists=True)
    files.create_index(["kind", "original_path"], if_not_exists=True)  # a camera's segments: "<camera>/..."
    # Partial indexes for the two queries asked per file sent / per file copied, so that they stay flat on a
    # catalog of a million rows (scripts/bench_scale.py catalog): the send order, and the bytes held locally.
    db.execute("CREATE INDEX IF NOT EXISTS files_send_order ON files (lane, COALESCE(recorded_start_ms, created_ms),"
               " file_id) WHERE state IN ('sealed', 'sending')")
    db.execute(f"CREATE INDEX IF NOT EXISTS files_stored_size ON files (size) WHERE {STORED_FILES}")
    db["sessions"].create(
        {"session_id": str, "dock": str, "slot": int, "device_id": str, "serial": str, "model": str,
         "volume_label": str, "volume_path": str, "officer_id": str, "docked_ms": int, "undocked_ms": int,
         "state": str, "manifest_sha256": str, "files_total": int, "last_error": str},
        pk="session_id", if_not_exists=True,
    )
    db["devices"].create(
        {"device_id": str, "kind": str, "model": str, "serial": str, "name": str, "first_seen_ms": int,
         "last_seen_ms": int, "info": str},
        pk="device_id", if_not_exists=True,
    )
    db["checkouts"].create(
        {"id": int, "device_id": str, "officer_id": str, "from_ms": int, "to_ms": int, "actor": str},
        pk="id", if_not_exists=True,
    )
    db["checkouts"].create_index(["device_id", "from_ms"], if_not_exists=True)
    db["holds"].create(
        {"id": int, "file_id": str, "case_id": str, "reason": str, "actor": str, "set_ms": int,
         "released_ms": int, "released_by": str},
        pk="id", if_not_exists=True,
    )
    gaps.create(db)
    db["alarms"].create(
        {"id": int, "key": str, "kind": str, "subject": str, "message": str, "raised_ms": int,
         "cleared_ms": int},
        pk="id", if_not_exists=True,
    )
    db["alarms"].create_index(["key", "cleared_ms"], if_not_exists=True)
    db["documents"].create(
        {"seq": int, "kind": str, "doc_id": str, "sha256": str, "prev": str, "path": str, "created_ms": int},
        pk="seq", if_not_exists=True,
    )
    db["documents"].create_index(["doc_id"], if_not_exists=True)
    db["outbox"].create(
        {"id": int, "topic": str, "payload": str, "created_ms": int, "sent_ms": int},
        pk="id", if_not_exists=True,
    )
    db["outbox"].create_index(["sent_ms", "id"], if_not_exists=True)
    db["audit"].create(
        {"seq": int, "ts_ms": int, "actor": str, "action": str, "subject": str, "reason": str,
         "detail": str, "prev": str, "hash": str},
        pk="seq", if_not_exists=True,
    )


class Catalog:
    """The agent's single source of truth. Thread-safe; one instance per process."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        if not readonly:
            with self._lock:
                _schema(self.db)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); nested calls join the outer one."""
        with self._lock:
            if self.conn.in_transaction:
                yield self.conn
                return
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) may leave the transaction open: every later "transaction" would
                # then join it and never commit. SQLite may also have rolled back already on its own.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def audit(self, action: str, *, subject: str | None = None, reason: str | None = None,
              actor: str | None = None, detail: dict[str, Any] | None = None) -> int:
        with self.transaction() as conn:
            return audit.append(conn, action, subject=subject, reason=reason, actor=actor, detail=detail)

    # -- meta -----------------------------------------------------------------------------------

    def meta_get(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def meta_set(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- files ----------------------------------------------------------------------------------

    def get(self, file_id: str) -> FileRecord:
        rows = self.query("SELECT * FROM files WHERE file_id = ?", (file_id,))
        if not rows:
            raise UnknownFile(file_id)
        return FileRecord.from_row(rows[0])

    def find_source(self, device_id: str, original_path: str, source_size: int,
                    source_mtime_ns: int) -> FileRecord | None:
        rows = self.query(
            "SELECT * FROM files WHERE device_id = ? AND original_path = ? AND source_size = ?"
            " AND source_mtime_ns = ?", (device_id, original_path, source_size, source_mtime_ns))
        return FileRecord.from_row(rows[0]) if rows else None

    def discover(self, *, kind: str, device_id: str, original_path: str, source_path: str | None,
                 source_size: int, source_mtime_ns: int, dock: str | None = None, slot: int | None = None,
                 session_id: str | None = None, volume_label: str | None = None,
                 officer_id: str | None = None, recorded_start_ms: int | None = None,
                 recorded_end_ms: int | None = None, clock_offset_ms: int | None = None,
                 lane: int = LANE_RECORDER, actor: str | None = None,
                 extras: dict[str, Any] | None = None) -> tuple[FileRecord, bool]:
        """Record a source file. Returns (record, created); a file seen before is not added twice.
        `extras` (stored as canonical JSON) are keys the source adds to the file's manifest."""
        with self.transaction() as conn:
            existing = self.find_source(device_id, original_path, source_size, source_mtime_ns)
            if existing is not None:
                return existing, False
            file_id, ts = new_id(), now_ms()
            conn.execute(
                "INSERT INTO files (file_id, state, kind, device_id, dock, slot, session_id, volume_label,"
                " original_path, source_path, source_size, source_mtime_ns, officer_id, recorded_start_ms,"
                " recorded_end_ms, clock_offset_ms, lane, retention, created_ms, updated_ms, attempts, extras)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,?)",
                (file_id, State.DISCOVERED, kind, device_id, dock, slot, session_id, volume_label,
                 original_path, source_path, source_size, source_mtime_ns, officer_id, recorded_start_ms,
                 recorded_end_ms, clock_offset_ms, lane, "routine", ts, ts,
                 None if extras is None else canonical_json(extras).decode("utf-8")),
            )
            audit.append(conn, "file.discovered", subject=file_id, actor=actor,
                         detail={"device_id": device_id, "path": original_path, "size": source_size})
        return self.get(file_id), True

    def transition(self, file_id: str, to: State, *, expect: State | None = None, actor: str | None = None,
                   reason: str | None = None, audit_detail: dict[str, Any] | None = None,
                   **columns: Any) -> FileRecord:
        """Move one file to `to`, setting `columns`, in one transaction with its audit entry."""
        with self.transaction() as conn:
            row = conn.execute("SELECT state FROM files WHERE file_id = ?", (file_id,)).fetchone()
            if row is None:
                raise UnknownFile(file_id)
            current = State(row[0])
            if expect is not None and current != expect:
                raise TransitionError(f"file {file_id} is {current}, expected {expect}")
            if to not in TRANSITIONS[current]:
                raise TransitionError(f"file {file_id}: {current} -> {to} is not an allowed transition")
            columns["state"] = str(to)
            columns["updated_ms"] = now_ms()
            assignments = ", ".join(f"{name} = ?" for name in columns)
            conn.execute(f"UPDATE files SET {assignments} WHERE file_id = ?", (*columns.values(), file_id))
            detail = {"from": str(current), "to": str(to), **(audit_detail or {})}
            audit.append(conn, f"file.{to}", subject=file_id, reason=reason, actor=actor, detail=detail)
        return self.get(file_id)

    def update(self, file_id: str, **columns: Any) -> None:
        """Set bookkeeping columns (errors, attempts) that are not a state change."""
        columns["updated_ms"] = now_ms()
        assignments = ", ".join(f"{name} = ?" for name in columns)
        with self.transaction() as conn:
            conn.execute(f"UPDATE files SET {assignments} WHERE file_id = ?", (*columns.values(), file_id))

    def files(self, *, states: list[str] | None = None, where: str = "", params: tuple[Any, ...] = (),
              order: str = "created_ms, file_id", limit: int | None = None) -> list[FileRecord]:
        clauses, args = [], list(params)
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            args[:0] = states
        if where:
            clauses.append(f"({where})")
        sql = "SELECT * FROM files"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [FileRecord.from_row(r) for r in self.query(sql, tuple(args))]

    def next_to_send(self, limit: int = 1, exclude: set[str] | frozenset[str] = frozenset()) -> list[FileRecord]:
        """Sealed files in lane order: evidence and held first, recorder files oldest first, cameras."""
        rows = self.query(
            "SELECT * FROM files INDEXED BY files_send_order WHERE state IN ('sealed', 'sending')"
            " ORDER BY lane, COALESCE(recorded_start_ms, created_ms), file_id LIMIT ?",
            (limit + len(exclude),),
        )
        out = [FileRecord.from_row(r) for r in rows if r["file_id"] not in exclude]
        return out[:limit]

    def counts_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM files GROUP BY state")}

    def is_held(self, file_id: str) -> bool:
        rows = self.query(
            "SELECT 1 FROM holds h WHERE h.released_ms IS NULL AND (h.file_id = ? OR (h.case_id IS NOT NULL"
            " AND h.case_id = (SELECT case_id FROM files WHERE file_id = ?))) LIMIT 1",
            (file_id, file_id),
        )
        return bool(rows)

    # -- sessions and devices -----------------------------------------------------------------

    def open_session(self, *, dock: str, slot: int | None, device_id: str, serial: str | None,
                     model: str | None, volume_label: str | None, volume_path: str,
                     officer_id: str | None) -> str:
        session_id, ts = new_id(), now_ms()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO sessions (session_id, dock, slot, device_id, serial, model, volume_label,"
                " volume_path, officer_id, docked_ms, state, files_total) VALUES (?,?,?,?,?,?,?,?,?,?,?,0)",
                (session_id, dock, slot, device_id, serial, model, volume_label, volume_path, officer_id,
                 ts, "docked"),
            )
            self.touch_device(conn, device_id, kind="recorder", model=model, serial=serial)
            audit.append(conn, "dock.docked", subject=session_id,
                         detail={"dock": dock, "slot": slot, "device_id": device_id, "serial": serial,
                                 "volume": volume_label})
        return session_id

    def close_session(self, session_id: str, state: str, *, manifest_sha256: str | None = None,
                      files_total: int | None = None, last_error: str | None = None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE sessions SET state = ?, undocked_ms = COALESCE(undocked_ms, ?),"
                " manifest_sha256 = COALESCE(?, manifest_sha256), files_total = COALESCE(?, files_total),"
                " last_error = ? WHERE session_id = ?",
                (state, now_ms() if state == "undocked" else None, manifest_sha256, files_total,
                 last_error, session_id),
            )
            audit.append(conn, f"dock.session_{state}", subject=session_id,
                         detail={"files": files_total, "error": last_error})

    def touch_device(self, conn: sqlite3.Connection, device_id: str, *, kind: str, model: str | None = None,
                     serial: str | None = None, name: str | None = None, info: dict[str, Any] | None = None
                     ) -> None:
        ts = now_ms()
        conn.execute(
            "INSERT INTO devices (device_id, kind, model, serial, name, first_seen_ms, last_seen_ms, info)"
            " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms,"
            " model = COALESCE(excluded.model, model), serial = COALESCE(excluded.serial, serial),"
            " name = COALESCE(excluded.name, name), info = COALESCE(excluded.info, info)",
            (device_id, kind, model, serial, name, ts, ts, json.dumps(info, ensure_ascii=False) if info else None),
        )

    def officer_at(self, device_id: str, at_ms: int) -> str | None:
        """The officer who had `device_id` checked out at `at_ms` (the checkout register)."""
        rows = self.query(
            "SELECT officer_id FROM checkouts WHERE device_id = ? AND from_ms <= ?"
            " AND (to_ms IS NULL OR to_ms > ?) ORDER BY from_ms DESC LIMIT 1",
            (device_id, at_ms, at_ms),
        )
        return rows[0][0] if rows else None

    # -- alarms and the event outbox -------------------------------------------------------------

    def raise_alarm(self, key: str, kind: str, subject: str, message: str, topic: str | None = None) -> bool:
        """Raise an alarm once: returns False if `key` is already active. Queues its event durably."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM alarms WHERE key = ? AND cleared_ms IS NULL", (key,)).fetchone():
                return False
            ts = now_ms()
            conn.execute("INSERT INTO alarms (key, kind, subject, message, raised_ms) VALUES (?,?,?,?,?)",
                         (key, kind, subject, message, ts))
            self.queue_event(conn, {"type": "alarm", "state": "raised", "key": key, "kind": kind,
                                    "subject": subject, "message": message, "ts": ts}, topic)
            audit.append(conn, "alarm.raised", subject=subject, reason=message, actor="edge-agent",
                         detail={"key": key, "kind": kind})
        return True

    def clear_alarm(self, key: str, topic: str | None = None) -> bool:
        with self.transaction() as conn:
            row = conn.execute("SELECT id, kind, subject FROM alarms WHERE key = ? AND cleared_ms IS NULL",
                               (key,)).fetchone()
            if row is None:
                return False
            ts = now_ms()
            conn.execute("UPDATE alarms SET cleared_ms = ? WHERE id = ?", (ts, row["id"]))
            self.queue_event(conn, {"type": "alarm", "state": "cleared", "key": key, "kind": row["kind"],
                                    "subject": row["subject"], "ts": ts}, topic)
            audit.append(conn, "alarm.cleared", subject=row["subject"], actor="edge-agent", detail={"key": key})
        return True

    def active_alarms(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM alarms WHERE cleared_ms IS NULL ORDER BY raised_ms")

    def queue_event(self, conn: sqlite3.Connection, event: dict[str, Any], topic: str | None = None) -> None:
        """Durably queue an event for the `events` topic; the uplink publishes and marks it sent."""
        conn.execute("INSERT INTO outbox (topic, payload, created_ms) VALUES (?,?,?)",
                     (topic or "events", json.dumps(event, ensure_ascii=False, sort_keys=True), now_ms()))

    def emit_event(self, event: dict[str, Any], topic: str | None = None) -> None:
        with self.transaction() as conn:
            self.queue_event(conn, event, topic)
