"""The `command_ids` table: ids of platform commands obeyed within the replay window, so that a replayed
command is refused across restarts too; the `command_seqs` table: the highest `seq` obeyed per platform key,
which refuses a replay whatever the clock says (sync/commands.py holds the rules)."""

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


class CommandSeqs:
    """Repository of the highest command sequence number obeyed per platform key. Read and advance it in
    one transaction, so that a check and its record are atomic."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def last(self, key_id: str) -> int | None:
        """The highest `seq` obeyed from `key_id`, None if none was."""
        rows = self._catalog.query("SELECT seq FROM command_seqs WHERE key_id = ?", (key_id,))
        return int(rows[0][0]) if rows else None

    def advance(self, key_id: str, seq: int, command_id: str, now_ms: int) -> None:
        """Record `seq` (higher than `last(key_id)`, checked by the caller) as the highest obeyed."""
        with self._catalog.transaction() as conn:
            conn.execute("INSERT INTO command_seqs (key_id, seq, command_id, updated_ms) VALUES (?,?,?,?)"
                         " ON CONFLICT(key_id) DO UPDATE SET seq = excluded.seq, command_id = excluded.command_id,"
                         " updated_ms = excluded.updated_ms", (key_id, seq, command_id, now_ms))
