"""The `sessions` table: one row per docking of a recorder (or import of a card), from docked to undocked."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any

from edge_agent.catalog import audit
from edge_agent.catalog.files import new_id
from edge_agent.clock import now_ms

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


class Sessions:
    """Repository of the `sessions` table."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def open(self, *, dock: str, slot: int | None, device_id: str, serial: str | None, model: str | None,
             volume_label: str | None, volume_path: str, officer_id: str | None,
             recorder: dict[str, Any] | None = None) -> str:
        """Record a docking (and the recorder as seen), audited. Returns the new session id. `recorder`: what
        the recorder's vendor handshake told (signed into the session manifest)."""
        session_id, ts = new_id(), now_ms()
        with self._catalog.transaction() as conn:
            conn.execute(
                "INSERT INTO sessions (session_id, dock, slot, device_id, serial, model, volume_label,"
                " volume_path, officer_id, docked_ms, state, files_total, recorder)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,0,?)",
                (session_id, dock, slot, device_id, serial, model, volume_label, volume_path, officer_id,
                 ts, "docked", None if recorder is None else json.dumps(recorder, sort_keys=True,
                                                                       ensure_ascii=False)),
            )
            self._catalog.devices.touch(device_id, kind="recorder", model=model, serial=serial)
            audit.append(conn, "dock.docked", subject=session_id,
                         detail={"dock": dock, "slot": slot, "device_id": device_id, "serial": serial,
                                 "volume": volume_label})
        return session_id

    def close(self, session_id: str, state: str, *, manifest_sha256: str | None = None,
              files_total: int | None = None, last_error: str | None = None) -> None:
        """Set the session's end state (`undocked` stamps undocked_ms once), audited."""
        with self._catalog.transaction() as conn:
            conn.execute(
                "UPDATE sessions SET state = ?, undocked_ms = COALESCE(undocked_ms, ?),"
                " manifest_sha256 = COALESCE(?, manifest_sha256), files_total = COALESCE(?, files_total),"
                " last_error = ? WHERE session_id = ?",
                (state, now_ms() if state == "undocked" else None, manifest_sha256, files_total,
                 last_error, session_id),
            )
            audit.append(conn, f"dock.session_{state}", subject=session_id,
                         detail={"files": files_total, "error": last_error})

    def get(self, session_id: str) -> sqlite3.Row | None:
        """The session's row (all columns), None if there is no such session."""
        rows = self._catalog.query("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        return rows[0] if rows else None

    def files(self, session_id: str) -> list[sqlite3.Row]:
        """The files the session brought, by id (columns: file_id, original_path, sha256, size, state)."""
        return self._catalog.query(
            "SELECT file_id, original_path, sha256, size, state FROM files WHERE session_id = ? ORDER BY file_id",
            (session_id,))

    def set_manifest(self, session_id: str, manifest_sha256: str, files_total: int) -> None:
        """Record the session's signed batch manifest (call in the transaction that chains it)."""
        with self._catalog.transaction() as conn:
            conn.execute("UPDATE sessions SET manifest_sha256 = ?, files_total = ? WHERE session_id = ?",
                         (manifest_sha256, files_total, session_id))
