"""The fleet monitor's own database (`fleet.db_path`): each agent's latest record and its recent events.

It is not the agent's catalog: the platform's fleet monitor (`edge_agent/platform/fleet/`) keeps what it heard
from every agent here, so its picture (status, last health, the chain and audit heads it compares the next
snapshot against, regressions seen) survives its own restart. The monitor owns the record's shape: to this
repository a record is a JSON object per agent. Events are kept newest first, at most `keep` per agent.

One writer (the monitor's flush thread) and any number of readers (`fleet status`, `fleet show` in other
processes: WAL lets them read while it writes).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS fleet_agents (agent_id TEXT PRIMARY KEY, record TEXT NOT NULL,"
    " health TEXT, updated_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fleet_events (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL,"
    " received_ms INTEGER NOT NULL, event TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS fleet_events_by_agent ON fleet_events (agent_id, id)",
)


class FleetStore:
    """Repository of the fleet monitor's tables."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(f"no fleet database at {self.path}: is `edge-agent fleet serve` running "
                                    f"with fleet.db_path = {self.path}?")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA busy_timeout = 30000")
        self._lock = threading.Lock()
        if not readonly:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")   # a crash loses a flush; retained state rebuilds it
            for statement in SCHEMA:
                self._conn.execute(statement)

    def save(self, records: Iterable[tuple[str, dict[str, Any]]], healths: Iterable[tuple[str, dict[str, Any]]],
             events: Iterable[tuple[str, int, dict[str, Any]]], now_ms: int, keep: int) -> None:
        """In one transaction: replace each agent's record (and its last health snapshot where one is given),
        append the events, keep the newest `keep` events of every agent that got one. An agent in `healths`
        must be in `records` too."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO fleet_agents (agent_id, record, updated_ms) VALUES (?, ?, ?)"
                    " ON CONFLICT(agent_id) DO UPDATE SET record = excluded.record, updated_ms = excluded.updated_ms",
                    [(agent, json.dumps(record, ensure_ascii=False), now_ms) for agent, record in records])
                conn.executemany("UPDATE fleet_agents SET health = ? WHERE agent_id = ?",
                                 [(json.dumps(h, ensure_ascii=False), agent) for agent, h in healths])
                touched: set[str] = set()
                rows = []
                for agent, received_ms, event in events:
                    touched.add(agent)
                    rows.append((agent, received_ms, json.dumps(event, ensure_ascii=False)))
                conn.executemany("INSERT INTO fleet_events (agent_id, received_ms, event) VALUES (?, ?, ?)", rows)
                for agent in touched:
                    conn.execute(
                        "DELETE FROM fleet_events WHERE agent_id = ? AND id <= (SELECT id FROM fleet_events"
                        " WHERE agent_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (agent, agent, keep))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def records(self) -> dict[str, dict[str, Any]]:
        """Every agent's latest record."""
        with self._lock:
            rows = self._conn.execute("SELECT agent_id, record FROM fleet_agents").fetchall()
        return {agent: json.loads(record) for agent, record in rows}

    def record(self, agent_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT record FROM fleet_agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def health(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's last schema-valid health snapshot."""
        with self._lock:
            row = self._conn.execute("SELECT health FROM fleet_agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def events(self, agent_id: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """(received_ms, event) of `agent_id`, newest first."""
        with self._lock:
            rows = self._conn.execute("SELECT received_ms, event FROM fleet_events WHERE agent_id = ?"
                                      " ORDER BY id DESC LIMIT ?", (agent_id, limit)).fetchall()
        return [(received, json.loads(event)) for received, event in rows]

    def event_count(self, agent_id: str) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM fleet_events WHERE agent_id = ?",
                                      (agent_id,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
