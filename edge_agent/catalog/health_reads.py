"""The catalog reads the operations side needs: the health snapshot's sync queue, the daily summary's totals,
the watchdog's liveness probe. A repository over `Catalog.query`; the SQL stays inside catalog/."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.catalog import Catalog


@dataclass(frozen=True)
class Totals:
    """A count and a second figure (bytes, milliseconds or distinct devices, as the query says)."""

    count: int
    amount: int


@dataclass(frozen=True)
class DailyTotals:
    """What happened in the window `(since, until]`: the figures of the daily summary event."""

    ingested: Totals     # files and bytes whose ingest finished
    synced: Totals       # files and bytes the platform confirmed
    purged: Totals       # files and bytes purged from the store
    gaps: Totals         # camera gaps opened, and their length so far in ms
    alarms_raised: int
    dockings: Totals     # sessions opened, and distinct devices docked


class HealthReads:
    """Read-only queries for `edge_agent.ops.health` and `edge_agent.ops.scheduler`."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def daily_totals(self, since: int, until: int) -> DailyTotals:
        """Counts of the window `since < t <= until` (ms since the epoch)."""
        def one(sql: str) -> Totals:
            row = self.catalog.query(sql, (since, until))[0]
            return Totals(int(row[0]), int(row[1] or 0))

        return DailyTotals(
            ingested=one("SELECT COUNT(*), SUM(size) FROM files WHERE ingested_at_ms > ? AND ingested_at_ms <= ?"),
            synced=one("SELECT COUNT(*), SUM(size) FROM files WHERE synced_ms > ? AND synced_ms <= ?"),
            purged=one("SELECT COUNT(*), SUM(size) FROM files WHERE purged_ms > ? AND purged_ms <= ?"),
            gaps=one("SELECT COUNT(*), SUM(COALESCE(end_ms, ?2) - start_ms) FROM gaps WHERE start_ms > ?1"
                     " AND start_ms <= ?2"),
            alarms_raised=one("SELECT COUNT(*), 0 FROM alarms WHERE raised_ms > ? AND raised_ms <= ?").count,
            dockings=one("SELECT COUNT(*), COUNT(DISTINCT device_id) FROM sessions WHERE docked_ms > ?"
                         " AND docked_ms <= ?"),
        )

    def ping(self) -> None:
        """One trivial query: proves no thread holds the catalog's lock forever (the systemd watchdog)."""
        self.catalog.query("SELECT 1")
