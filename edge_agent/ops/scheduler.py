"""The operations scheduler: one APScheduler background thread running the agent's periodic work.

Jobs: the health snapshot every `health.interval_s`, whenever something a
watcher cares about changes (checked every `health.change_check_s`) and when
the platform sends the `health` command;
retention every `retention.check_s`; the scrub in bounded slices; the daily
summary event at `health.summary_hour`; and, under systemd, the watchdog
ping. Every job runs one at a time (no overlap), a slow run is coalesced, and
a failing job is logged and tried again at its next time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

from edge_agent.catalog import Catalog
from edge_agent.clock import now_ms
from edge_agent.evidence.scrub import Scrubber
from edge_agent.ops import sdnotify
from edge_agent.ops.health import HealthMonitor
from edge_agent.ops.retention import Retention

if TYPE_CHECKING:
    from edge_agent.daemon import Agent

log = logging.getLogger(__name__)
# APScheduler logs every run at INFO; with a change check every few seconds that would flood the journal.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

SCRUB_EVERY_S = 60
SCRUB_BUDGET_S = 50
DAY_MS = 24 * 3600 * 1000


def daily_summary(catalog: Catalog, agent_id: str, until: int | None = None) -> dict[str, Any]:
    """What the last 24 hours brought (R12: statistics for supervision); sent as a `summary` event."""
    until = now_ms() if until is None else until
    since = until - DAY_MS

    def one(sql: str) -> tuple[int, int]:
        row = catalog.query(sql, (since, until))[0]
        return int(row[0]), int(row[1] or 0)

    ingested = one("SELECT COUNT(*), SUM(size) FROM files WHERE ingested_at_ms > ? AND ingested_at_ms <= ?")
    synced = one("SELECT COUNT(*), SUM(size) FROM files WHERE synced_ms > ? AND synced_ms <= ?")
    purged = one("SELECT COUNT(*), SUM(size) FROM files WHERE purged_ms > ? AND purged_ms <= ?")
    gaps = one("SELECT COUNT(*), SUM(COALESCE(end_ms, ?2) - start_ms) FROM gaps WHERE start_ms > ?1"
               " AND start_ms <= ?2")
    alarms = one("SELECT COUNT(*), 0 FROM alarms WHERE raised_ms > ? AND raised_ms <= ?")
    sessions = one("SELECT COUNT(*), COUNT(DISTINCT device_id) FROM sessions WHERE docked_ms > ? AND docked_ms <= ?")
    return {
        "type": "summary", "agent_id": agent_id, "from_ms": since, "to_ms": until, "ts": until,
        "ingested": {"files": ingested[0], "bytes": ingested[1]},
        "synced": {"files": synced[0], "bytes": synced[1]},
        "purged": {"files": purged[0], "bytes": purged[1]},
        "dockings": {"sessions": sessions[0], "devices": sessions[1]},
        "gaps": {"count": gaps[0], "total_ms": gaps[1]},
        "alarms_raised": alarms[0],
        "active_alarms": len(catalog.active_alarms()),
        "files_by_state": catalog.counts_by_state(),
    }


class OperationsScheduler:
    """The daemon's component for health, retention, scrub, summary and the systemd watchdog."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.config = agent.config
        self.stopping = threading.Event()
        self.retention = Retention(agent.catalog, agent.layout, agent.config)
        self.health = HealthMonitor(agent, self.retention)
        self.scrubber = Scrubber(agent.catalog, agent.layout, agent.key, agent.config, stop=self.stopping)
        self.scheduler = BackgroundScheduler(
            timezone=agent.config.agent.zone,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60})

    def _job(self, name: str, work: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except Exception:
                log.exception("job failed job=%s; it runs again at its next time", name)
        return run

    def start(self) -> None:
        tz = self.config.agent.zone
        now = datetime.now(tz)
        health = self.config.health

        def add(func: Callable[[], None], trigger: str, **kwargs: Any) -> None:
            self.scheduler.add_job(func, trigger, name=kwargs["id"], **kwargs)

        add(self._job("health", self.health.tick), "interval", seconds=health.interval_s, next_run_time=now,
            id="health")
        add(self._job("health_change", self.health.check_change), "interval", seconds=health.change_check_s,
            id="health_change")
        add(self._job("retention", lambda: self.retention.run(stop=self.stopping)), "interval",
            seconds=self.config.retention.check_s,
            next_run_time=now + timedelta(seconds=5), id="retention")
        add(self._job("scrub", self._scrub), "interval", seconds=SCRUB_EVERY_S,
            next_run_time=now + timedelta(seconds=30), id="scrub")
        add(self._job("summary", self._summary), "cron", hour=health.summary_hour, minute=0, id="summary")
        watchdog = sdnotify.watchdog_interval_s()
        if watchdog:
            add(self._job("watchdog", self._watchdog), "interval", seconds=watchdog, id="watchdog")
        self.scheduler.start()
        uplink = getattr(self.agent, "uplink", None)
        if uplink is not None:
            uplink.on_command(self._command)
        sdnotify.notify(f"READY=1\nSTATUS=collecting; agent {self.config.agent.id}")
        log.info("scheduler started health_s=%s retention_s=%s watchdog_s=%s", health.interval_s,
                 self.config.retention.check_s, watchdog)

    def stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        self.stopping.set()
        self.scheduler.shutdown(wait=True)

    def _command(self, command: dict[str, Any]) -> None:
        """`{"cmd": "health"}` from the platform (already authenticated by the uplink): a snapshot now.
        Runs on the MQTT network thread, so it only moves the job's next run."""
        if command.get("cmd") == "health":
            self.scheduler.modify_job("health", next_run_time=datetime.now(self.config.agent.zone))

    def _scrub(self) -> None:
        self.scrubber.run_once(SCRUB_BUDGET_S)
        self.health.scrub = self.scrubber.status

    def _summary(self) -> None:
        self.agent.catalog.emit_event(daily_summary(self.agent.catalog, self.config.agent.id))

    def _watchdog(self) -> None:
        # The ping proves the scheduler runs and the catalog answers (no thread holds its lock forever).
        self.agent.catalog.query("SELECT 1")
        sdnotify.notify("WATCHDOG=1")
