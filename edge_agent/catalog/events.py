"""The `outbox` table: events queued durably in the transaction of the change they report; the uplink
publishes them in order and marks each sent."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog

EVENTS_TOPIC = "events"


class Outbox:
    """Repository of the event outbox."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def queue(self, event: dict[str, Any]) -> None:
        """Queue `event` for the `events` topic, in canonical JSON; joins the caller's transaction if there is one."""
        with self._catalog.transaction() as conn:
            conn.execute("INSERT INTO outbox (topic, payload, created_ms) VALUES (?,?,?)",
                         (EVENTS_TOPIC, canonical_json(event).decode("utf-8"), now_ms()))

    def pending(self, limit: int = 100) -> list[sqlite3.Row]:
        """The oldest unsent events (columns: id, topic, payload)."""
        return self._catalog.query("SELECT id, topic, payload FROM outbox WHERE sent_ms IS NULL ORDER BY id LIMIT ?",
                                   (limit,))

    def mark_sent(self, event_id: int, sent_ms: int | None = None) -> None:
        with self._catalog.transaction() as conn:
            conn.execute("UPDATE outbox SET sent_ms = ? WHERE id = ?",
                         (now_ms() if sent_ms is None else sent_ms, event_id))
