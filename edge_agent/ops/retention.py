"""Retention and holds (R6): what may leave the local store, and when.

Classes: `routine` files are purged `retention.routine_days` after the
platform confirmed them; `evidence` files (tagged with a case) stay until
their case is released; `long_term` files are never purged here (they go to
separate media by export). A hold (`edge-agent hold`) on a file or a case
stops any purge until released.

Purge removes the local media bytes only: the catalog row, the manifest and
the audit trail stay, and the file moves to `purged`. Nothing that is not
`synced`/`source_cleared` is ever purged, and disk pressure changes only the
order (oldest confirmed routine files first), never that rule.

The purge check and the state change happen in one write transaction around
the unlink, so a hold placed by the CLI in another process either lands
before (and the file stays) or after (and the file was already purged).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from edge_agent.catalog import Catalog, FileRecord, State, audit, new_id
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.durable import fsync_dir
from edge_agent.i18n import N_, Refusal
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout

log = logging.getLogger(__name__)

ROUTINE, EVIDENCE, LONG_TERM = "routine", "evidence", "long_term"
RETENTION_CLASSES = (ROUTINE, EVIDENCE, LONG_TERM)
DAY_MS = 24 * 3600 * 1000
FORECAST_WINDOW_MS = 7 * DAY_MS


class HoldError(Refusal, ValueError):
    """A hold or release cannot be done as asked; the message says what to give instead."""


@dataclass
class PurgeReport:
    aged: list[str] = field(default_factory=list)       # routine files past routine_days
    pressure: list[str] = field(default_factory=list)   # purged early because the disk was over the limit
    freed_bytes: int = 0
    disk_percent_before: float = 0.0
    disk_percent_after: float = 0.0

    @property
    def purged(self) -> list[str]:
        return self.aged + self.pressure


class Retention:
    """Applies the retention classes and disk pressure to the local store."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, config: AgentConfig):
        self.catalog = catalog
        self.layout = layout
        self.config = config

    # -- measures -------------------------------------------------------------------------------

    @property
    def max_store_bytes(self) -> int:
        return int(self.config.agent.max_disk_gb * 1024**3)

    def store_bytes(self) -> int:
        """Bytes held locally: what counts against max_disk_gb (the same measure intake uses)."""
        return self.catalog.files.stored_bytes()

    def disk_percent(self) -> float:
        """The worse of: the store against max_disk_gb, and the whole filesystem's use."""
        fs_percent = filesystem_percent(self.layout)
        store_percent = 100.0 * self.store_bytes() / self.max_store_bytes
        return max(fs_percent, store_percent)

    def forecast_days_until_full(self, now: int | None = None) -> float | None:
        """Days until the store reaches its limit at the last week's intake rate; None with no intake."""
        now = now_ms() if now is None else now
        since = now - FORECAST_WINDOW_MS
        ingested, first = self.catalog.files.ingested_since(since)
        if not ingested or first is None:
            return None
        span_days = max(now - first, 3600 * 1000) / DAY_MS
        rate = ingested / span_days
        room = min(self.layout.disk_usage().free, max(self.max_store_bytes - self.store_bytes(), 0))
        return round(room / rate, 2)

    # -- which files may go ---------------------------------------------------------------------

    def purgeable(self, *, synced_before_ms: int | None = None, limit: int = 500) -> list[FileRecord]:
        """Routine, confirmed, unheld files still on disk, the longest-confirmed first."""
        before = now_ms() if synced_before_ms is None else synced_before_ms
        return self.catalog.files.purgeable(synced_before_ms=before, limit=limit)

    def purge(self, file_id: str, reason: str, *, actor: str = "edge-agent") -> int | None:
        """Remove one file's local bytes if it is still purgeable. Returns the bytes freed, None if it was not."""
        with self.catalog.transaction():
            record = self.catalog.files.if_purgeable(file_id)
            if record is None:
                return None
            stored = self.layout.data_dir / (record.store_path or "")
            try:
                os.unlink(stored)
            except FileNotFoundError:
                log.warning("purge file=%s stored copy already gone path=%s", file_id, stored)
            else:
                fsync_dir(stored.parent)
            self.catalog.transition(file_id, State.PURGED, expect=State(record.state), actor=actor, reason=reason,
                                    purged_ms=now_ms(), audit_detail={"size": record.size,
                                                                      "path": record.store_path})
        log.info("purged file=%s bytes=%s reason=%r", file_id, record.size, reason)
        return record.size or 0

    def run(self, now: int | None = None, stop: threading.Event | None = None) -> PurgeReport:
        """One retention pass: routine files past their time, then the oldest confirmed ones while over the limit.
        `stop` ends the pass between two files (the daemon is stopping)."""
        now = now_ms() if now is None else now
        halted = stop.is_set if stop is not None else (lambda: False)
        report = PurgeReport(disk_percent_before=self.disk_percent())
        days = self.config.retention.routine_days
        cutoff = now - days * DAY_MS
        while not halted() and (batch := self.purgeable(synced_before_ms=cutoff)):
            for record in batch:
                if halted():
                    break
                freed = self.purge(record.file_id, f"routine retention: confirmed more than {days} days ago")
                if freed is not None:
                    report.aged.append(record.file_id)
                    report.freed_bytes += freed
        limit = self.config.retention.disk_purge_percent
        percent = self.disk_percent()
        while percent >= limit and not halted():
            batch = self.purgeable(synced_before_ms=now, limit=50)
            if not batch:
                log.warning("disk at %.1f%% (limit %s%%) and nothing purgeable: unsynced, held, evidence and "
                            "long-term files are kept", percent, limit)
                break
            for record in batch:
                if halted():
                    break
                freed = self.purge(record.file_id,
                                   f"disk pressure: {percent:.1f}% used, limit {limit}%; oldest confirmed first")
                if freed is not None:
                    report.pressure.append(record.file_id)
                    report.freed_bytes += freed
                percent = self.disk_percent()
                if percent < limit:
                    break
        report.disk_percent_after = percent
        if report.purged:
            log.info("retention purged=%d aged=%d pressure=%d freed=%d disk=%.1f%%", len(report.purged),
                     len(report.aged), len(report.pressure), report.freed_bytes, percent)
        return report


def filesystem_percent(layout: StoreLayout) -> float:
    """Used space as `df` shows it: used / (used + available to us), root's reserve left out."""
    usage = layout.disk_usage()
    room = usage.used + usage.free
    return 100.0 * usage.used / room if room else 0.0


# -- holds and retention classes -------------------------------------------------------------------


def place_hold(catalog: Catalog, *, reason: str, file_id: str | None = None, case_id: str | None = None,
               actor: str | None = None) -> int:
    """Hold one file or every file of a case (also files tagged with it later). Returns the hold id."""
    if (file_id is None) == (case_id is None):
        raise HoldError(N_("give either a file id or --case, not both and not neither"))
    if not reason.strip():
        raise HoldError(N_("a hold needs --reason (why the footage must be kept); it goes into the audit log"))
    who = actor or audit.os_user()
    with catalog.transaction() as conn:
        if file_id is not None:
            catalog.get(file_id)
        hold_id = catalog.holds.place(file_id=file_id, case_id=case_id, reason=reason, actor=who, set_ms=now_ms())
        audit.append(conn, "hold.placed", subject=file_id or f"case:{case_id}", reason=reason, actor=who,
                     detail={"hold_id": hold_id, "file_id": file_id, "case_id": case_id})
    return hold_id


def release_hold(catalog: Catalog, *, reason: str, file_id: str | None = None, case_id: str | None = None,
                 actor: str | None = None, sealer: Sealer | None = None) -> tuple[int, int]:
    """Release the active holds on a file or a case. Releasing a case also ends its files' `evidence` class
    (they become routine and count from their sync) and, with `sealer`, signs a `case_released` annotation into
    the chain in the same transaction: the agent's word the platform may release the case's legal holds on
    (docs/OPERATIONS.md, "Releasing a legal hold"). Returns (holds released, files reclassified)."""
    if (file_id is None) == (case_id is None):
        raise HoldError(N_("give either a file id or --case, not both and not neither"))
    if not reason.strip():
        raise HoldError(N_("a release needs --reason (e.g. the case is closed); it goes into the audit log"))
    who = actor or audit.os_user()
    ts = now_ms()
    counts: list[int] = []

    def release(conn: Any, annotation: dict[str, Any] | None = None) -> None:
        if file_id is not None:
            catalog.get(file_id)
            released, reclassified = catalog.holds.release(file_id=file_id, by=who, at_ms=ts), 0
        else:
            released = catalog.holds.release(case_id=case_id, by=who, at_ms=ts)
            reclassified = catalog.files.reclassify_case(str(case_id), from_class=EVIDENCE, to_class=ROUTINE)
        if not released and not reclassified:
            raise (HoldError(N_("nothing to release: no active hold on {file_id}"), file_id=file_id) if file_id
                   else HoldError(N_("nothing to release: no active hold on case {case_id}"), case_id=case_id))
        audit.append(conn, "hold.released", subject=file_id or f"case:{case_id}", reason=reason, actor=who,
                     detail={"holds": released, "reclassified": reclassified, "case_id": case_id, **(annotation or {})})
        counts.extend((released, reclassified))

    if case_id is None or sealer is None:
        with catalog.transaction() as conn:
            release(conn)
        return counts[0], counts[1]
    if not any(h["case_id"] == case_id for h in catalog.holds.active()) \
            and not any(r.retention == EVIDENCE for r in catalog.files.of_case(case_id)):
        raise HoldError(N_("nothing to release: no active hold on case {case_id}"), case_id=case_id)
    annotation_id = new_id()
    body = {"annotation_id": annotation_id, "case_id": case_id, "case_released": True, "reason": reason, "by": who,
            "ts_ms": ts}
    sealer.sign_document("annotation", annotation_id, body, sealer.layout.annotation_path(annotation_id),
                         after=lambda conn, digest: release(conn, {"annotation_id": annotation_id,
                                                                   "annotation_sha256": digest}))
    return counts[0], counts[1]


def active_holds(catalog: Catalog) -> list[dict[str, object]]:
    return catalog.holds.active()

