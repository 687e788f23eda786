"""The `holds` table: a hold on one file or on a case stops any purge until released (R6)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


class Holds:
    """Repository of the `holds` table; the rules (who may place, what a release reclassifies) are in
    ops/retention.py."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def place(self, *, file_id: str | None, case_id: str | None, reason: str, actor: str, set_ms: int) -> int:
        """Add an active hold on a file or a case. Returns its id."""
        with self._catalog.transaction() as conn:
            cur = conn.execute("INSERT INTO holds (file_id, case_id, reason, actor, set_ms) VALUES (?,?,?,?,?)",
                               (file_id, case_id, reason, actor, set_ms))
            return int(cur.lastrowid or 0)

    def release(self, *, file_id: str | None = None, case_id: str | None = None, by: str, at_ms: int) -> int:
        """Release the active holds on `file_id`, or else on `case_id`. Returns how many were released."""
        column, value = ("file_id", file_id) if file_id is not None else ("case_id", case_id)
        with self._catalog.transaction() as conn:
            cur = conn.execute(f"UPDATE holds SET released_ms = ?, released_by = ? WHERE {column} = ?"
                               " AND released_ms IS NULL", (at_ms, by, value))
            return cur.rowcount

    def active(self) -> list[dict[str, Any]]:
        """The active holds, oldest first, as dicts of their columns."""
        return [dict(r) for r in self._catalog.query("SELECT * FROM holds WHERE released_ms IS NULL ORDER BY set_ms")]

    def is_held(self, file_id: str) -> bool:
        """An active hold covers the file, itself or through its case."""
        rows = self._catalog.query(
            "SELECT 1 FROM holds h WHERE h.released_ms IS NULL AND (h.file_id = ? OR (h.case_id IS NOT NULL"
            " AND h.case_id = (SELECT case_id FROM files WHERE file_id = ?))) LIMIT 1",
            (file_id, file_id),
        )
        return bool(rows)
