"""The `chain_receipt` table: the highest verified chain receipt from the platform ("I hold this agent's document
chain up to seq, whose document has this SHA-256"; docs/PROTOCOL.md section 10), one row, together with the
newest checkpoint document at or before that seq, so the agent can show what the platform holds, and `verify`
and `audit verify` can check that the local chains still extend it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog


@dataclass(frozen=True)
class ChainReceipt:
    """The platform's word on how far it holds the chain, and the last checkpoint that covers."""

    seq: int
    sha256: str
    receipt: dict[str, Any]
    checkpoint_seq: int | None
    checkpoint: dict[str, Any] | None
    received_ms: int


class ChainReceipts:
    """Repository of the one chain receipt kept (a higher verified one replaces it)."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def get(self) -> ChainReceipt | None:
        rows = self._catalog.query("SELECT seq, sha256, receipt, checkpoint_seq, checkpoint, received_ms"
                                   " FROM chain_receipt WHERE id = 1")
        if not rows:
            return None
        row = rows[0]
        return ChainReceipt(row["seq"], row["sha256"], json.loads(row["receipt"]), row["checkpoint_seq"],
                            json.loads(row["checkpoint"]) if row["checkpoint"] else None, row["received_ms"])

    def record(self, receipt: dict[str, Any], checkpoint_seq: int | None,
               checkpoint: dict[str, Any] | None) -> bool:
        """Keep `receipt` (verified by the caller) if it is higher than the one kept; True if it was. Not
        audited: a receipt is the platform's word, kept as it came (an entry per receipt would move the audit
        head, and with it call for the next checkpoint, forever)."""
        with self._catalog.transaction() as conn:
            held = conn.execute("SELECT seq FROM chain_receipt WHERE id = 1").fetchone()
            if held is not None and held[0] >= receipt["seq"]:
                return False
            conn.execute("INSERT OR REPLACE INTO chain_receipt (id, seq, sha256, receiver_key_id, receipt,"
                         " checkpoint_seq, checkpoint, received_ms) VALUES (1,?,?,?,?,?,?,?)",
                         (receipt["seq"], receipt["sha256"], str(receipt.get("key_id")),
                          canonical_json(receipt).decode("utf-8"), checkpoint_seq,
                          canonical_json(checkpoint).decode("utf-8") if checkpoint is not None else None, now_ms()))
        return True
