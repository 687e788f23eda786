"""The `meta` table: small named values (chain and audit heads, the scrub's cursor, key rotation state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


class Meta:
    """Repository of the `meta` key/value table."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def get(self, key: str) -> str | None:
        rows = self._catalog.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set(self, key: str, value: str) -> None:
        """Set `key`; joins the caller's transaction if there is one."""
        with self._catalog.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                         " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
