"""The `devices` table (every recorder and camera the agent has seen) and the custody register
`checkouts` (which officer had which recorder when, R5)."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any

from edge_agent.clock import now_ms

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


class Devices:
    """Repository of the `devices` table."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def touch(self, device_id: str, *, kind: str, model: str | None = None, serial: str | None = None,
              name: str | None = None, info: dict[str, Any] | None = None) -> None:
        """Record the device as seen now; known fields not given keep their value."""
        ts = now_ms()
        with self._catalog.transaction() as conn:
            conn.execute(
                "INSERT INTO devices (device_id, kind, model, serial, name, first_seen_ms, last_seen_ms, info)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
                " last_seen_ms = excluded.last_seen_ms, model = COALESCE(excluded.model, model),"
                " serial = COALESCE(excluded.serial, serial), name = COALESCE(excluded.name, name),"
                " info = COALESCE(excluded.info, info)",
                (device_id, kind, model, serial, name, ts, ts,
                 json.dumps(info, ensure_ascii=False) if info else None),
            )

    def kind_of(self, device_id: str, default: str = "recorder") -> str:
        """The device's kind, `default` for a device not seen yet."""
        rows = self._catalog.query("SELECT kind FROM devices WHERE device_id = ?", (device_id,))
        return rows[0][0] if rows else default

    def model_serial(self, device_id: str) -> tuple[str | None, str | None]:
        """The device's model and serial as the catalog knows them."""
        rows = self._catalog.query("SELECT model, serial FROM devices WHERE device_id = ?", (device_id,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)


class Checkouts:
    """Repository of the custody register `checkouts`; the rules are in evidence/custody.py."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def officer_at(self, device_id: str, at_ms: int) -> str | None:
        """The officer who had `device_id` checked out at `at_ms`."""
        rows = self._catalog.query(
            "SELECT officer_id FROM checkouts WHERE device_id = ? AND from_ms <= ?"
            " AND (to_ms IS NULL OR to_ms > ?) ORDER BY from_ms DESC LIMIT 1",
            (device_id, at_ms, at_ms),
        )
        return rows[0][0] if rows else None

    def open_for(self, device_id: str) -> list[sqlite3.Row]:
        """The open checkouts of `device_id`, latest first (columns: id, device_id, officer_id, from_ms,
        to_ms, actor)."""
        return self._catalog.query("SELECT * FROM checkouts WHERE device_id = ? AND to_ms IS NULL"
                                   " ORDER BY from_ms DESC", (device_id,))

    def add(self, device_id: str, officer_id: str, from_ms: int, actor: str) -> int:
        """Open a checkout. Returns its id."""
        with self._catalog.transaction() as conn:
            cur = conn.execute("INSERT INTO checkouts (device_id, officer_id, from_ms, to_ms, actor)"
                               " VALUES (?,?,?,?,?)", (device_id, officer_id, from_ms, None, actor))
            return int(cur.lastrowid or 0)

    def end(self, checkout_id: int, to_ms: int) -> None:
        """Close the checkout `checkout_id` at `to_ms`."""
        with self._catalog.transaction() as conn:
            conn.execute("UPDATE checkouts SET to_ms = ? WHERE id = ?", (to_ms, checkout_id))
