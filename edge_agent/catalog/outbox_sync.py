"""What the uplink reads from and writes to the catalog besides file transitions: the event outbox
(rows queued by `Catalog.queue_event`, published by `sync.outbox.OutboxRelay`) and the size of the sync
queue (`SYNC_QUEUE`: files sealed and waiting for, or in, upload)."""

from __future__ import annotations

import sqlite3

from edge_agent.catalog import Catalog
from edge_agent.clock import now_ms

try:
    from edge_agent.catalog import SYNC_QUEUE
except ImportError:  # until catalog/states.py (contract 1) is merged; the integrator deletes this fallback
    from edge_agent.catalog import State

    SYNC_QUEUE = frozenset({State.SEALED, State.SENDING})


class OutboxSync:
    """The uplink's repository over one `Catalog`."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def unsent(self, limit: int = 100) -> list[sqlite3.Row]:
        """Outbox rows (`id`, `topic` suffix, `payload` JSON text) not yet confirmed sent, oldest first."""
        return self.catalog.query("SELECT id, topic, payload FROM outbox WHERE sent_ms IS NULL ORDER BY id LIMIT ?",
                                  (limit,))

    def mark_sent(self, row_id: int) -> None:
        """The broker acknowledged row `row_id` (PUBACK): it is not published again."""
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE outbox SET sent_ms = ? WHERE id = ?", (now_ms(), row_id))

    def queue_totals(self) -> tuple[int, int]:
        """(files, bytes) in `SYNC_QUEUE`."""
        states = sorted(SYNC_QUEUE)
        files, size = self.catalog.query(
            f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE state IN ({','.join('?' * len(states))})",
            tuple(states))[0]
        return int(files), int(size)
