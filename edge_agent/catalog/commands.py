"""The `command_ids` table: ids of platform commands obeyed within the replay window, so that a replayed
command is refused across restarts too (sync/commands.py holds the rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


class CommandIds:
    """Repository of obeyed command ids. Call its methods in one transaction, so that checking and
    remembering an id is atomic."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def forget_before(self, ts_ms: int) -> None:
        """Drop ids of commands stamped before `ts_ms` (out of the window: refused as stale anyway)."""
        with self._catalog.transaction() as conn:
            conn.execute("DELETE FROM command_ids WHERE ts_ms < ?", (ts_ms,))

    def seen(self, command_id: str) -> bool:
        return bool(self._catalog.query("SELECT 1 FROM command_ids WHERE id = ?", (command_id,)))

    def remember(self, command_id: str, ts_ms: int, seen_ms: int) -> None:
        with self._catalog.transaction() as conn:
            conn.execute("INSERT INTO command_ids (id, ts_ms, seen_ms) VALUES (?,?,?)", (command_id, ts_ms, seen_ms))
