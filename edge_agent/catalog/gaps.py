"""The camera gap ledger's table, and the catalog questions about a camera's recording it answers.

One row per interruption of a camera's recording (`gaps`: camera, start_ms, end_ms, cause, detail),
opened when recording stops and closed (end_ms set) when it resumes; an open gap has end_ms NULL. The
camera's segments are `camera` files whose original path is `<camera>/<name>`, so the coverage questions
("was it recording at 14:03?", "when did its last segment end?") read `files` through the
(kind, original_path) index. `edge_agent.sources.cameras` keeps the ledger; this module is its SQL.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog

_FOREVER_MS = 2**62


@dataclass(frozen=True)
class Gap:
    """One interruption of a camera's recording; `end_ms` is None while it lasts."""

    id: int
    camera: str
    start_ms: int
    end_ms: int | None
    cause: str
    detail: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "camera": self.camera, "start_ms": self.start_ms, "end_ms": self.end_ms,
                "cause": self.cause, "detail": self.detail}

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Gap:
        return cls(row["id"], row["camera"], row["start_ms"], row["end_ms"], row["cause"], row["detail"])


def _prefix_range(camera: str) -> tuple[str, str]:
    """Bounds of the original paths of one camera's segments (`<camera>/<name>`), as an index range:
    '0' is the character after '/'."""
    return f"{camera}/", f"{camera}0"


class Gaps:
    """The `gaps` table and a camera's segment coverage, over one Catalog's public methods."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    # -- the ledger ----------------------------------------------------------------------------------

    def overlapping(self, camera: str, since_ms: int = 0, until_ms: int | None = None) -> list[Gap]:
        """The camera's gaps overlapping [since_ms, until_ms], oldest first."""
        rows = self.catalog.query(
            "SELECT * FROM gaps WHERE camera = ? AND (end_ms IS NULL OR end_ms >= ?) AND start_ms <= ?"
            " ORDER BY start_ms, id", (camera, since_ms, until_ms if until_ms is not None else _FOREVER_MS))
        return [Gap.from_row(r) for r in rows]

    def last_open(self, camera: str) -> Gap | None:
        """The camera's latest gap still open (left open by a previous run, say)."""
        rows = self.catalog.query("SELECT * FROM gaps WHERE camera = ? AND end_ms IS NULL"
                                  " ORDER BY start_ms DESC LIMIT 1", (camera,))
        return Gap.from_row(rows[0]) if rows else None

    @staticmethod
    def insert(conn: sqlite3.Connection, camera: str, start_ms: int, cause: str, detail: str) -> Gap:
        """Open a gap inside the caller's transaction (so its event is queued with it)."""
        cur = conn.execute("INSERT INTO gaps (camera, start_ms, end_ms, cause, detail) VALUES (?,?,?,?,?)",
                           (camera, start_ms, None, cause, detail))
        return Gap(int(cur.lastrowid or 0), camera, start_ms, None, cause, detail)

    def set_detail(self, gap_id: int, detail: str) -> None:
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE gaps SET detail = ? WHERE id = ?", (detail, gap_id))

    @staticmethod
    def set_end(conn: sqlite3.Connection, gap_id: int, end_ms: int | None) -> None:
        """Close a gap inside the caller's transaction."""
        conn.execute("UPDATE gaps SET end_ms = ? WHERE id = ?", (end_ms, gap_id))

    # -- the camera's segments -----------------------------------------------------------------------

    def segment_at(self, camera: str, at_ms: int) -> str | None:
        """The file id of the camera's latest segment covering `at_ms`, if any."""
        rows = self.catalog.query(
            "SELECT file_id FROM files WHERE kind = 'camera' AND original_path >= ? AND original_path < ?"
            " AND recorded_start_ms <= ? AND recorded_end_ms > ? ORDER BY recorded_start_ms DESC LIMIT 1",
            (*_prefix_range(camera), at_ms, at_ms))
        return rows[0][0] if rows else None

    def segments_since(self, camera: str, since_ms: int) -> int:
        """How many of the camera's segments start at or after `since_ms`."""
        return int(self.catalog.query(
            "SELECT COUNT(*) FROM files WHERE kind = 'camera' AND original_path >= ? AND original_path < ?"
            " AND recorded_start_ms >= ?", (*_prefix_range(camera), since_ms))[0][0])

    def last_segment_end(self, camera: str) -> int | None:
        """Where the camera's last catalogued segment ends, None before its first."""
        rows = self.catalog.query(
            "SELECT MAX(recorded_end_ms) FROM files WHERE kind = 'camera' AND original_path >= ?"
            " AND original_path < ?", _prefix_range(camera))
        return rows[0][0] if rows else None

    def device_of(self, camera: str) -> str | None:
        """The device id last seen for the camera of this name (its serial, once ONVIF told it)."""
        rows = self.catalog.query("SELECT device_id FROM devices WHERE kind = 'camera' AND name = ?"
                                  " ORDER BY last_seen_ms DESC LIMIT 1", (camera,))
        return rows[0][0] if rows else None

    def held_between(self, camera: str, since_ms: int, until_ms: int) -> list[HeldSegment]:
        """The camera's segments overlapping [since_ms, until_ms] whose bytes the agent still holds (not
        purged, not rejected), oldest first: what a GB/T 28181 RecordInfo query is answered from."""
        rows = self.catalog.query(
            "SELECT file_id, original_path, recorded_start_ms, recorded_end_ms, size FROM files"
            " WHERE kind = 'camera' AND original_path >= ? AND original_path < ?"
            " AND recorded_start_ms <= ? AND recorded_end_ms >= ? AND state NOT IN ('purged', 'rejected')"
            " ORDER BY recorded_start_ms, file_id", (*_prefix_range(camera), until_ms, since_ms))
        return [HeldSegment(r[0], r[1], r[2], r[3], r[4]) for r in rows]


@dataclass(frozen=True)
class HeldSegment:
    """One of a camera's segments still in the store: its file id, `<camera>/<name>`, span and size."""

    file_id: str
    original_path: str
    start_ms: int
    end_ms: int
    size: int | None
