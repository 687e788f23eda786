"""The `alarms` table: an alarm is raised once per key (one row, one event, one audit entry) and stays
active until cleared the same way. When to raise and clear is ops/alarms.py's business."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from edge_agent.catalog import audit
from edge_agent.clock import now_ms

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog

# Alarm kinds raised by more than one part (the others are named where they are raised).
DISK_HIGH = "disk_high"
UNSYNCED_OVERDUE = "unsynced_overdue"
CLOCK_OFFSET = "clock_offset"
CLOCK_UNSYNCHRONIZED = "clock_unsynchronized"
RECORDER_UNIDENTIFIED = "recorder_unidentified"
TAMPER = "tamper"

# The kinds the uplink raises when the receiver rejects a file or it cannot be sent; the subject is the file id.
REJECTION_KINDS = frozenset({"sync_rejected", "sync_blocked"})


class Alarms:
    """Repository of the `alarms` table; each change queues its event in the outbox, same transaction."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def raise_(self, key: str, kind: str, subject: str, message: str) -> bool:
        """Raise an alarm once: returns False if `key` is already active. Queues its event durably."""
        with self._catalog.transaction() as conn:
            if conn.execute("SELECT 1 FROM alarms WHERE key = ? AND cleared_ms IS NULL", (key,)).fetchone():
                return False
            ts = now_ms()
            conn.execute("INSERT INTO alarms (key, kind, subject, message, raised_ms) VALUES (?,?,?,?,?)",
                         (key, kind, subject, message, ts))
            self._catalog.outbox.queue({"type": "alarm", "state": "raised", "key": key, "kind": kind,
                                        "subject": subject, "message": message, "ts": ts})
            audit.append(conn, "alarm.raised", subject=subject, reason=message, actor="edge-agent",
                         detail={"key": key, "kind": kind})
        return True

    def clear(self, key: str) -> bool:
        """Clear the active alarm `key`: returns False if none is active. Queues its event durably."""
        with self._catalog.transaction() as conn:
            row = self.find_active(key)
            if row is None:
                return False
            ts = now_ms()
            conn.execute("UPDATE alarms SET cleared_ms = ? WHERE id = ?", (ts, row["id"]))
            self._catalog.outbox.queue({"type": "alarm", "state": "cleared", "key": key, "kind": row["kind"],
                                        "subject": row["subject"], "ts": ts})
            audit.append(conn, "alarm.cleared", subject=row["subject"], actor="edge-agent", detail={"key": key})
        return True

    def active(self) -> list[sqlite3.Row]:
        """Every active alarm, oldest first (rows: id, key, kind, subject, message, raised_ms, cleared_ms)."""
        return self._catalog.query("SELECT * FROM alarms WHERE cleared_ms IS NULL ORDER BY raised_ms")

    def find_active(self, key: str) -> sqlite3.Row | None:
        """The active alarm `key` (columns id, kind, subject), None if it is not active."""
        rows = self._catalog.query("SELECT id, kind, subject FROM alarms WHERE key = ? AND cleared_ms IS NULL",
                                   (key,))
        return rows[0] if rows else None

    def active_keys(self, kind: str, subject: str) -> list[str]:
        """Keys of the active alarms of `kind` about `subject`."""
        rows = self._catalog.query("SELECT key FROM alarms WHERE kind = ? AND subject = ? AND cleared_ms IS NULL",
                                   (kind, subject))
        return [r["key"] for r in rows]
