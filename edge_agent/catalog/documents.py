"""The `documents` table: the agent's single hash chain of signed documents (manifests, session manifests,
annotations, key rotations), its head kept in meta `chain_head` as "<seq>:<sha256>"."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from edge_agent.clock import now_ms

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog

HEAD_KEY = "chain_head"


class Documents:
    """Repository of the document chain. Signing is evidence's business; this records the links."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def head(self) -> tuple[int, str] | None:
        """(seq, sha256) of the last chained document, None for an empty chain."""
        head = self._catalog.meta.get(HEAD_KEY)
        if head is None:
            return None
        seq, _, digest = head.partition(":")
        return int(seq), digest

    def append(self, seq: int, kind: str, doc_id: str, sha256: str, prev: str, path: str) -> None:
        """Chain one document (path relative to the data dir) and move the head to it; call in the
        transaction that holds the head read by `head()`, so the chain stays linear."""
        with self._catalog.transaction() as conn:
            conn.execute(
                "INSERT INTO documents (seq, kind, doc_id, sha256, prev, path, created_ms) VALUES (?,?,?,?,?,?,?)",
                (seq, kind, doc_id, sha256, prev, path, now_ms()))
            self._catalog.meta.set(HEAD_KEY, f"{seq}:{sha256}")

    def chain(self) -> list[sqlite3.Row]:
        """Every link in chain order (columns: seq, kind, doc_id, sha256, prev, path)."""
        return self._catalog.query("SELECT seq, kind, doc_id, sha256, prev, path FROM documents ORDER BY seq")

    def of_kind(self, kind: str | None, limit: int | None = None) -> list[sqlite3.Row]:
        """The links of `kind` (None: of every kind) in chain order, at most `limit` (columns: seq, kind,
        doc_id, sha256, prev, path)."""
        where, params = ("WHERE kind = ?", (kind,)) if kind is not None else ("", ())
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        return self._catalog.query(f"SELECT seq, kind, doc_id, sha256, prev, path FROM documents {where}"
                                   f" ORDER BY seq{tail}", params)

    def paths(self, kind: str) -> list[str]:
        """The paths (relative to the data dir) of the documents of `kind`, in chain order."""
        return [r["path"] for r in self._catalog.query("SELECT path FROM documents WHERE kind = ? ORDER BY seq",
                                                       (kind,))]
