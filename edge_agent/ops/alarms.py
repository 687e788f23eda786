"""Alarms (R1, R9, R10, R12 "亮灯提醒"): conditions checked on every health tick.

An alarm is raised once (`catalog.alarms.raise_`: one row, one event on the
`events` topic, one audit entry) and stays in the health snapshot until its
condition is gone, when it is cleared the same way. Alarms whose condition a
machine cannot see ending (tamper found by a scrub, an unidentified recorder)
are cleared by a custodian (`edge-agent alarms clear`, or `assign` for an
unknown recorder), with a reason in the audit log. Other parts raise the
alarms they see first: docks (unidentified recorder, disk full), cameras
(camera offline, image checks), the uplink (rejection); this module clears
a rejection once the file was sent again and confirmed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from edge_agent.catalog import CONFIRMED, Catalog, audit
from edge_agent.catalog.alarms import (  # noqa: F401  (the kinds, re-exported for the rest of ops)
    CLOCK_OFFSET,
    CLOCK_UNSYNCHRONIZED,
    DISK_HIGH,
    RECORDER_UNIDENTIFIED,
    REJECTION_KINDS,
    TAMPER,
    UNSYNCED_OVERDUE,
)
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig

log = logging.getLogger(__name__)


class AlarmEvaluator:
    """Raises and clears the alarms whose conditions the health snapshot and the catalog show."""

    def __init__(self, catalog: Catalog, config: AgentConfig):
        self.catalog = catalog
        self.config = config

    def evaluate(self, snapshot: Mapping[str, Any], now: int | None = None) -> None:
        now = now_ms() if now is None else now
        agent = snapshot.get("agent", {})
        self._disk(agent.get("disk", {}))
        self._unsynced(now)
        self._clock("clock_offset", self.config.agent.id, "agent clock", agent.get("clock", {}).get("offset_ms"))
        self._clock_sync(agent.get("clock", {}))
        self._cameras(snapshot.get("cameras") or [])
        self._rejections()

    def _set(self, active: bool, key: str, kind: str, subject: str, message: str) -> None:
        if active:
            if self.catalog.raise_alarm(key, kind, subject, message):
                log.warning("alarm raised key=%s kind=%s subject=%s: %s", key, kind, subject, message)
        elif self.catalog.clear_alarm(key):
            log.info("alarm cleared key=%s kind=%s subject=%s", key, kind, subject)

    def _disk(self, disk: Mapping[str, Any]) -> None:
        percent = disk.get("used_percent")
        if percent is None:
            return
        limit = self.config.health.disk_alarm_percent
        self._set(percent >= limit, DISK_HIGH, DISK_HIGH, self.config.agent.id,
                  f"disk {percent:.1f}% used (alarm at {limit}%): confirmed routine files are purged first; "
                  "if it stays high, check the uplink (unsynced files cannot be purged) or add storage")

    def _unsynced(self, now: int) -> None:
        hours = self.config.health.unsynced_alarm_h
        cutoff = now - int(hours * 3600 * 1000)
        # Files not on the platform yet (catalog.UNSYNCED): an alarm once one waits longer than unsynced_alarm_h.
        count, oldest = self.catalog.files.unsynced_since(cutoff)
        age_h = (now - oldest) / 3_600_000 if oldest is not None else 0
        self._set(count > 0, UNSYNCED_OVERDUE, UNSYNCED_OVERDUE, self.config.agent.id,
                  f"{count} file(s) not on the platform {hours:g} h after reaching the agent (R1), oldest "
                  f"{age_h:.1f} h: check the uplink (edge-agent status) and the broker")

    def _clock(self, key: str, subject: str, what: str, offset_ms: Any) -> None:
        if offset_ms is None:
            return
        limit = self.config.health.clock_offset_alarm_ms
        self._set(abs(offset_ms) > limit, key, CLOCK_OFFSET, subject,
                  f"{what} is off by {offset_ms} ms (alarm above {limit} ms, R9): fix time synchronisation "
                  "(chrony/NTP) so recorded times stay true")

    def _clock_sync(self, clock: Mapping[str, Any]) -> None:
        """The kernel's own verdict on the agent's clock (adjtimex): unsynchronised, or its maximum error too big."""
        kernel = clock.get("kernel")
        if not self.config.health.clock_sync_alarm or not kernel:
            return
        limit_ms = self.config.health.clock_error_alarm_ms
        error_ms = kernel["maxerror_us"] // 1000
        if not clock.get("synchronized"):
            problem = (f"the agent's clock is not synchronised (source {clock.get('source')}; "
                       f"maximum error {error_ms} ms)")
        elif error_ms > limit_ms:
            problem = f"the agent's clock may be off by up to {error_ms} ms (alarm above {limit_ms} ms)"
        else:
            problem = ""
        self._set(bool(problem), CLOCK_UNSYNCHRONIZED, CLOCK_UNSYNCHRONIZED, self.config.agent.id,
                  f"{problem} (R9): start chrony or systemd-timesyncd with a reachable NTP server so recorded and "
                  "sealed times stay true")

    def _cameras(self, cameras: Iterable[Mapping[str, Any]]) -> None:
        # Camera down and image checks are raised and cleared by each camera's worker (edge_agent/sources/cameras.py),
        # which sees them first; here only each camera's clock, read by ONVIF, is judged.
        for camera in cameras:
            name = str(camera.get("name"))
            self._clock(f"clock_offset:{name}", name, f"camera {name}'s clock", camera.get("clock_offset_ms"))

    def _rejections(self) -> None:
        """A receiver's rejection clears once the file was sent again and confirmed (sync now --retry-rejected)."""
        for alarm in self.catalog.active_alarms():
            if alarm["kind"] not in REJECTION_KINDS:
                continue
            if self.catalog.files.state_of(alarm["subject"]) in CONFIRMED:
                self._set(False, alarm["key"], alarm["kind"], alarm["subject"], "")


def clear_by_custodian(catalog: Catalog, key: str, reason: str, actor: str | None = None) -> bool:
    """A custodian clears an alarm after dealing with it; the reason is audited. False if not active."""
    alarm = catalog.alarms.find_active(key)
    if alarm is None:
        return False
    with catalog.transaction() as conn:
        catalog.alarms.clear(key)
        audit.append(conn, "alarm.cleared_by_custodian", subject=alarm["subject"], reason=reason,
                     actor=actor or audit.os_user(), detail={"key": key, "kind": alarm["kind"]})
    return True


def clear_unidentified(catalog: Catalog, device_id: str, reason: str, actor: str | None = None) -> int:
    """Once a custodian assigns an unknown recorder, its 'unidentified' alarms are dealt with."""
    keys = catalog.alarms.active_keys(RECORDER_UNIDENTIFIED, device_id)
    for key in keys:
        clear_by_custodian(catalog, key, reason, actor)
    return len(keys)
