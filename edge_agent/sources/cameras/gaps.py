"""The gap ledger: every interruption of a camera's recording, with its cause, as a row and two events.

A gap is opened when recording stops and closed when the first keyframe arrives again; both ends are
queued as `gap` events on the `events` topic in the same transaction as the row. Causes: stream_lost,
auth_failed, disk_full, agent_stopped (found at start from the end of the camera's last segment),
clock_step. The SQL is `edge_agent.catalog.gaps`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edge_agent.catalog import Catalog
from edge_agent.catalog.gaps import Gap, Gaps
from edge_agent.clock import now_ms

log = logging.getLogger(__name__)


def gaps(catalog: Catalog, camera: str, since_ms: int = 0, until_ms: int | None = None) -> list[Gap]:
    """The camera's gaps overlapping [since_ms, until_ms], oldest first; an open gap has end_ms None."""
    return Gaps(catalog).overlapping(camera, since_ms, until_ms)


def was_recording(catalog: Catalog, camera: str, at_ms: int) -> tuple[bool, Gap | None, str | None]:
    """(True, None, file_id) when a segment covers `at_ms`; else (False, the gap if one covers it, None)."""
    table = Gaps(catalog)
    file_id = table.segment_at(camera, at_ms)
    if file_id is not None:
        return True, None, file_id
    for gap in table.overlapping(camera, at_ms, at_ms):
        if gap.end_ms is None or gap.end_ms > at_ms:
            return False, gap, None
    return False, None, None


class GapLedger:
    """Opens, annotates and closes gaps, each with its event; shared by every camera's worker."""

    def __init__(self, catalog: Catalog, device_of: Callable[[str], str | None]):
        self.catalog = catalog
        self.table = Gaps(catalog)
        self.device_of = device_of      # camera name -> the device id its worker knows, for the events
        self._lock = threading.Lock()

    def downtime(self, camera: str, leftover_ends: list[int]) -> Gap | None:
        """The gap this camera is in as the agent starts: one left open by the last run, or the agent's
        own downtime since the end of the camera's last segment (agent_stopped)."""
        left_open = self.table.last_open(camera)
        if left_open is not None:
            return left_open
        last = self.table.last_segment_end(camera)
        ends = ([] if last is None else [last]) + leftover_ends
        if not ends:
            return None
        return self.open(camera, max(ends), "agent_stopped", "the agent was not running")

    def open(self, camera: str, start_ms: int, cause: str, detail: str) -> Gap:
        with self._lock, self.catalog.transaction() as conn:
            gap = self.table.insert(conn, camera, start_ms, cause, detail)
            self.catalog.queue_event(conn, self._event(gap, "open"))
        log.warning("camera_gap_open camera=%s cause=%s start_ms=%d detail=%s", camera, cause, start_ms, detail)
        return gap

    def note(self, gap: Gap, detail: str) -> Gap:
        """The same gap, with what the latest failed reconnect said."""
        self.table.set_detail(gap.id, detail)
        return Gap(gap.id, gap.camera, gap.start_ms, gap.end_ms, gap.cause, detail)

    def close(self, gap: Gap, end_ms: int) -> Gap:
        closed = Gap(gap.id, gap.camera, gap.start_ms, max(end_ms, gap.start_ms), gap.cause, gap.detail)
        with self.catalog.transaction() as conn:
            self.table.set_end(conn, gap.id, closed.end_ms)
            self.catalog.queue_event(conn, self._event(closed, "closed"))
        log.warning("camera_gap_closed camera=%s cause=%s start_ms=%d end_ms=%s seconds=%.1f", gap.camera,
                    gap.cause, gap.start_ms, closed.end_ms, ((closed.end_ms or 0) - gap.start_ms) / 1000)
        return closed

    def ended_at(self, camera: str, at_ms: int) -> list[Gap]:
        """The camera's gaps that ended exactly at `at_ms` (those a segment starting then follows)."""
        return [g for g in self.table.overlapping(camera, at_ms, at_ms) if g.end_ms == at_ms]

    def _event(self, gap: Gap, state: str) -> dict[str, Any]:
        return {"type": "gap", "state": state, "ts": now_ms(), "subject": gap.camera, "kind": gap.cause,
                "message": gap.detail or gap.cause, "camera": gap.camera, "gap_id": gap.id,
                "device_id": self.device_of(gap.camera), "start_ms": gap.start_ms, "end_ms": gap.end_ms}
