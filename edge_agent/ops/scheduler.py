"""The operations scheduler: one APScheduler background thread running plain callables at their times.

The daemon declares the jobs (edge_agent/daemon.py: health, change check, retention, scrub, daily summary,
watchdog); this module only knows how to run them. Every job runs one at a time (no overlap), a slow run is
coalesced, and a failing job is logged and tried again at its next time. `daily_summary` is the body of the
summary job. The scheduler's own pulse (`heartbeat`, `vital()`) beats from a small job of its own every
`beat_s`, so ops/liveness.py sees it when APScheduler stops dispatching.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from edge_agent.catalog import Catalog
from edge_agent.catalog.health_reads import HealthReads, Totals
from edge_agent.clock import now_ms
from edge_agent.protocol.heartbeat import Heartbeat, Vital

log = logging.getLogger(__name__)
# APScheduler logs every run at INFO; with a change check every few seconds that would flood the journal.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Job:
    """One periodic piece of work. `trigger` is APScheduler's ("interval" with `seconds=`, "cron" with
    `hour=`/`minute=`); `first_after_s` delays the first run of an interval job (0: at once, None: one
    interval after the start)."""

    name: str
    run: Callable[[], Any]
    trigger: str
    first_after_s: float | None = None
    schedule: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """Runs `Job`s on one background thread. `stopping` is set when `stop()` begins, so a long job (a
    retention pass, a scrub slice) can give up early; `stop()` waits for the running job to return."""

    def __init__(self, zone: tzinfo, jobs: list[Job] | None = None, *, beat_s: float = 5.0):
        self.zone = zone
        self.jobs: list[Job] = list(jobs or [])
        self.stopping = threading.Event()
        self.beat_s = beat_s
        self.heartbeat = Heartbeat("scheduler")
        self._scheduler = BackgroundScheduler(
            timezone=zone, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60})

    def add(self, job: Job) -> None:
        """Declare a job; only before `start()`."""
        self.jobs.append(job)

    def start(self) -> None:
        now = datetime.now(self.zone)
        for job in self.jobs:
            first = {} if job.first_after_s is None else {"next_run_time": now + timedelta(seconds=job.first_after_s)}
            self._scheduler.add_job(_logged(job), job.trigger, id=job.name, name=job.name, **first, **job.schedule)
        self._scheduler.add_job(self.heartbeat.beat, "interval", id="heartbeat", name="heartbeat",
                                seconds=self.beat_s, next_run_time=now)
        self.heartbeat.beat()
        self._scheduler.start()
        log.info("scheduler started jobs=%s", ",".join(job.name for job in self.jobs))

    def stop(self) -> None:
        self.stopping.set()
        self._scheduler.shutdown(wait=True)

    def vital(self) -> Vital:
        """The scheduler as a supervised component: no in-process restart (a stuck APScheduler is the daemon's
        restart by systemd)."""
        return Vital("scheduler", self.heartbeat, lambda: self.stopping.is_set() or self._scheduler.running)

    def run_now(self, name: str) -> None:
        """Move job `name`'s next run to now. Cheap and safe from any thread (e.g. the MQTT network thread);
        before `start()` and after `stop()` it does nothing (the job runs at start anyway, or never again)."""
        if not self._scheduler.running:
            log.info("job=%s not moved: the scheduler is not running", name)
            return
        self._scheduler.modify_job(name, next_run_time=datetime.now(self.zone))


def _logged(job: Job) -> Callable[[], None]:
    def run() -> None:
        try:
            job.run()
        except Exception:
            log.exception("job failed job=%s; it runs again at its next time", job.name)
    return run


def daily_summary(catalog: Catalog, agent_id: str, until: int | None = None) -> dict[str, Any]:
    """What the last 24 hours brought (R12: statistics for supervision); sent as a `summary` event."""
    until = now_ms() if until is None else until
    since = until - DAY_MS
    totals = HealthReads(catalog).daily_totals(since, until)

    def sized(t: Totals) -> dict[str, int]:
        return {"files": t.count, "bytes": t.amount}

    return {
        "type": "summary", "agent_id": agent_id, "from_ms": since, "to_ms": until, "ts": until,
        "ingested": sized(totals.ingested),
        "synced": sized(totals.synced),
        "purged": sized(totals.purged),
        "dockings": {"sessions": totals.dockings.count, "devices": totals.dockings.amount},
        "gaps": {"count": totals.gaps.count, "total_ms": totals.gaps.amount},
        "alarms_raised": totals.alarms_raised,
        "active_alarms": len(catalog.active_alarms()),
        "files_by_state": catalog.counts_by_state(),
    }
