"""Append-only, hash-chained audit log (R4, R7).

Each entry's `hash` is SHA-256 over the canonical JSON of the entry's fields
and the previous entry's hash, so an edited, deleted or reordered entry breaks
the chain at that point. Entries are written inside the same SQLite
transaction as the state change they describe. The head (last seq and hash) is
published in health so the platform holds an anchor outside this machine; a
truncated tail shows up there and against the `audit_head` meta row.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog

GENESIS = "0" * 64


def os_user() -> str:
    """The OS account acting: SUDO_USER wins, so `sudo edge-agent ...` names the person."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def entry_hash(seq: int, ts_ms: int, actor: str, action: str, subject: str | None,
               reason: str | None, detail: str, prev: str) -> str:
    body = {"seq": seq, "ts_ms": ts_ms, "actor": actor, "action": action, "subject": subject,
            "reason": reason, "detail": detail, "prev": prev}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def append(conn: sqlite3.Connection, action: str, *, subject: str | None = None, reason: str | None = None,
           actor: str | None = None, detail: dict[str, Any] | None = None) -> int:
    """Append one entry; the caller holds the write transaction. Returns its seq."""
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    ts_ms = now_ms()
    who = actor or os_user()
    detail_json = canonical_json(detail or {}).decode("utf-8")
    digest = entry_hash(seq, ts_ms, who, action, subject, reason, detail_json, prev)
    conn.execute(
        "INSERT INTO audit (seq, ts_ms, actor, action, subject, reason, detail, prev, hash)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        (seq, ts_ms, who, action, subject, reason, detail_json, prev, digest),
    )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('audit_head', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (f"{seq}:{digest}",),
    )
    return seq


@dataclass(frozen=True)
class AuditProblem:
    seq: int
    message: str

    def __str__(self) -> str:
        return f"audit entry {self.seq}: {self.message}"


def verify(conn: sqlite3.Connection) -> tuple[int, list[AuditProblem]]:
    """Walk the whole chain. Returns (entries checked, problems found)."""
    problems: list[AuditProblem] = []
    expected_seq, prev, count = 1, GENESIS, 0
    last_hash = GENESIS
    cursor = conn.execute(
        "SELECT seq, ts_ms, actor, action, subject, reason, detail, prev, hash FROM audit ORDER BY rowid"
    )
    for seq, ts_ms, actor, action, subject, reason, detail, stored_prev, stored_hash in cursor:
        count += 1
        if seq != expected_seq:
            problems.append(AuditProblem(seq, f"out of order or missing entries: expected seq {expected_seq}"))
        if stored_prev != prev:
            problems.append(AuditProblem(seq, "prev does not match the previous entry (deleted or reordered)"))
        if entry_hash(seq, ts_ms, actor, action, subject, reason, detail, stored_prev) != stored_hash:
            problems.append(AuditProblem(seq, "content does not match its hash (edited)"))
        prev, last_hash, expected_seq = stored_hash, stored_hash, seq + 1
    head = conn.execute("SELECT value FROM meta WHERE key = 'audit_head'").fetchone()
    if head is not None:
        head_seq, _, head_hash = head[0].partition(":")
        if int(head_seq) != expected_seq - 1 or head_hash != last_hash:
            problems.append(AuditProblem(int(head_seq), "the log ends before its recorded head (tail removed)"))
    elif count:
        problems.append(AuditProblem(0, "the recorded head is missing"))
    return count, problems


class AuditLog:
    """Repository view of the audit log (`catalog.audit_log`); entries are added by `Catalog.audit` or by
    `append` inside the transaction of the change they describe."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    def verify(self) -> tuple[int, list[AuditProblem]]:
        """Walk the whole chain. Returns (entries checked, problems found)."""
        with self._catalog.locked() as conn:
            return verify(conn)

    def subjects(self, action: str) -> list[str]:
        """The subjects of every entry of `action`, in seq order."""
        return [r[0] for r in self._catalog.query("SELECT subject FROM audit WHERE action = ? ORDER BY seq",
                                                  (action,))]

    def entries(self, subject: str | None = None, *, limit: int | None = None,
                newest_first: bool = False) -> list[sqlite3.Row]:
        """Entries (all columns), of one `subject` if given, in seq order (or newest first), at most `limit`."""
        sql = "SELECT * FROM audit" + (" WHERE subject = ?" if subject is not None else "")
        sql += " ORDER BY seq" + (" DESC" if newest_first else "")
        params: tuple[object, ...] = (subject,) if subject is not None else ()
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return self._catalog.query(sql, params)
