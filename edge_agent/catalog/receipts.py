"""The `receipts` table: the receiver's signed receipt of each synced file (evidence/receipts.py says what one
proves). Written in the transaction that marks the file synced: the record of it. The copy beside the
manifest (`receipts/<aa>/<file_id>.json`) is written after that commit and restored from here at start
(sync/receipts.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


class Receipts:
    """Repository of receipts, one per file (a later verified receipt of the same file replaces it)."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def put(self, file_id: str, receipt: dict[str, Any]) -> None:
        """Keep `receipt` for `file_id`, in the caller's transaction when there is one."""
        with self._catalog.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO receipts (file_id, receiver_key_id, receipt, sha256, received_ms)"
                         " VALUES (?,?,?,?,?)", (file_id, str(receipt.get("key_id")),
                                                 canonical_json(receipt).decode("utf-8"),
                                                 str(receipt.get("sha256")), now_ms()))

    def get(self, file_id: str) -> dict[str, Any] | None:
        """The stored receipt of `file_id`, or None."""
        rows = self._catalog.query("SELECT receipt FROM receipts WHERE file_id = ?", (file_id,))
        return json.loads(rows[0]["receipt"]) if rows else None

    def received_since(self, since_ms: int) -> list[tuple[str, bytes, int]]:
        """(file_id, the receipt's canonical bytes, received_ms) of every receipt received at or after
        `since_ms`, oldest first."""
        rows = self._catalog.query("SELECT file_id, receipt, received_ms FROM receipts WHERE received_ms >= ? "
                                   "ORDER BY received_ms", (since_ms,))
        return [(row["file_id"], row["receipt"].encode("utf-8"), int(row["received_ms"])) for row in rows]
