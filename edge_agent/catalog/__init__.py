"""The catalog: one SQLite database holding every file's life, the docking
sessions, devices, custody, holds, gaps, alarms, the signed-document chain and
the audit log. It is the only code that speaks SQL (tests/test_layers.py).

A file's life is the state machine in `states.TRANSITIONS`; `Catalog.transition`
is the only way to move a file, and it does so in one transaction together with
its audit entry. Callers make the bytes durable first (see `durable`).

`Catalog` holds the connection, its lock and `transaction()`, and composes one
repository per table (`catalog.files`, `.sessions`, `.devices`, `.checkouts`,
`.holds`, `.alarms`, `.documents`, `.meta`, `.outbox`, `.command_ids`, `.command_seqs`,
`.receipts`, `.audit_log`); the schema and its migrations are in `schema`. Repository
writes join the caller's transaction when there is one, so several of them
(and `audit.append`) commit together.

The connection is shared by the daemon's threads behind a lock; other
processes (the CLI) open their own connection, WAL lets them read while the
daemon writes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_agent.catalog import audit, schema
from edge_agent.catalog.alarms import Alarms
from edge_agent.catalog.audit import AuditLog
from edge_agent.catalog.commands import CommandIds, CommandSeqs
from edge_agent.catalog.devices import Checkouts, Devices
from edge_agent.catalog.documents import Documents
from edge_agent.catalog.events import Outbox
from edge_agent.catalog.files import FileRecord, Files, TransitionError, UnknownFile, new_id
from edge_agent.catalog.holds import Holds
from edge_agent.catalog.meta import Meta
from edge_agent.catalog.receipts import Receipts
from edge_agent.catalog.schema import LANE_CAMERA, LANE_EVIDENCE, LANE_RECORDER
from edge_agent.catalog.sessions import Sessions
from edge_agent.catalog.states import (
    CONFIRMED,
    PENDING_COPY,
    PURGEABLE_STATES,
    SEALED_STATES,
    STORED,
    STORED_FILES,
    SYNC_QUEUE,
    TRANSITIONS,
    UNSYNCED,
    State,
    state_in,
)
from edge_agent.clock import now_ms

__all__ = [
    "CONFIRMED", "LANE_CAMERA", "LANE_EVIDENCE", "LANE_RECORDER", "PENDING_COPY", "PURGEABLE_STATES",
    "SEALED_STATES", "STORED", "STORED_FILES", "SYNC_QUEUE", "TRANSITIONS", "UNSYNCED", "Catalog", "FileRecord",
    "State", "TransitionError", "UnknownFile", "audit", "new_id", "now_ms", "schema", "state_in",
]


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
        self._lock = threading.RLock()
        if not readonly:
            with self._lock:
                schema.create(conn)
        self.files = Files(self)
        self.sessions = Sessions(self)
        self.devices = Devices(self)
        self.checkouts = Checkouts(self)
        self.holds = Holds(self)
        self.alarms = Alarms(self)
        self.documents = Documents(self)
        self.meta = Meta(self)
        self.outbox = Outbox(self)
        self.command_ids = CommandIds(self)
        self.command_seqs = CommandSeqs(self)
        self.receipts = Receipts(self)
        self.audit_log = AuditLog(self)

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

    @contextmanager
    def locked(self) -> Iterator[sqlite3.Connection]:
        """The connection under the lock, for a read spanning several statements (no transaction begun)."""
        with self._lock:
            yield self.conn

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run one statement and return its rows: the repositories' read tool, and tests' window on the
        tables. Code outside the catalog calls a repository method instead."""
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def audit(self, action: str, *, subject: str | None = None, reason: str | None = None,
              actor: str | None = None, detail: dict[str, Any] | None = None) -> int:
        with self.transaction() as conn:
            return audit.append(conn, action, subject=subject, reason=reason, actor=actor, detail=detail)

    # -- thin methods kept for their callers (each is one repository call) ------------------------

    def meta_get(self, key: str) -> str | None:
        return self.meta.get(key)

    def meta_set(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        """Set `key` in the transaction `conn` belongs to (see `meta.set`)."""
        self.meta.set(key, value)

    def get(self, file_id: str) -> FileRecord:
        return self.files.get(file_id)

    def find_source(self, device_id: str, original_path: str, source_size: int,
                    source_mtime_ns: int) -> FileRecord | None:
        return self.files.find_source(device_id, original_path, source_size, source_mtime_ns)

    def discover(self, **kwargs: Any) -> tuple[FileRecord, bool]:
        """Record a source file (`Files.discover`: keyword arguments, `extras` included)."""
        return self.files.discover(**kwargs)

    def transition(self, file_id: str, to: State, **kwargs: Any) -> FileRecord:
        """Move one file to `to` (`Files.transition`)."""
        return self.files.transition(file_id, to, **kwargs)

    def update(self, file_id: str, **columns: Any) -> None:
        """Set bookkeeping columns; refuses `state` with TransitionError (`Files.update`)."""
        self.files.update(file_id, **columns)

    def next_to_send(self, limit: int = 1, exclude: set[str] | frozenset[str] = frozenset()) -> list[FileRecord]:
        return self.files.next_to_send(limit, exclude)

    def counts_by_state(self) -> dict[str, int]:
        return self.files.counts_by_state()

    def is_held(self, file_id: str) -> bool:
        return self.holds.is_held(file_id)

    def open_session(self, **kwargs: Any) -> str:
        return self.sessions.open(**kwargs)

    def close_session(self, session_id: str, state: str, **kwargs: Any) -> None:
        self.sessions.close(session_id, state, **kwargs)

    def touch_device(self, conn: sqlite3.Connection, device_id: str, **kwargs: Any) -> None:
        """Record a device as seen, in the transaction `conn` belongs to (`Devices.touch`)."""
        self.devices.touch(device_id, **kwargs)

    def officer_at(self, device_id: str, at_ms: int) -> str | None:
        """The officer who had `device_id` checked out at `at_ms` (the checkout register)."""
        return self.checkouts.officer_at(device_id, at_ms)

    def raise_alarm(self, key: str, kind: str, subject: str, message: str) -> bool:
        """Raise an alarm once: returns False if `key` is already active. Queues its event durably."""
        return self.alarms.raise_(key, kind, subject, message)

    def clear_alarm(self, key: str) -> bool:
        return self.alarms.clear(key)

    def active_alarms(self) -> list[sqlite3.Row]:
        return self.alarms.active()

    def queue_event(self, conn: sqlite3.Connection, event: dict[str, Any]) -> None:
        """Durably queue an event for the `events` topic, in the transaction `conn` belongs to."""
        self.outbox.queue(event)

    def emit_event(self, event: dict[str, Any]) -> None:
        self.outbox.queue(event)
