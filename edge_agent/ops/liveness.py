"""Liveness, not just aliveness: the supervisor of every long-lived component.

Each component reports progress through a `protocol.heartbeat.Heartbeat` and is described by a `Vital`
(its pulse, whether its thread still runs, how to restart it). The parts hand their vitals over as
providers (callables returning the current list: dock workers come and go), so this module imports none
of them. Every `liveness.check_s` the supervisor thread looks at each one:

- dead (`alive()` is False: its thread ended while it should run): the `component_stalled` alarm naming
  it, and `restart()` (the MQTT connection reconnects, the sender gets a new thread, a dock worker is
  re-docked);
- stuck (silent longer than `liveness.stall_s` while not idle): the alarm; a stuck thread cannot be
  killed in Python, so it is left to systemd: `live()` turns False and the watchdog ping stops;
- live again: the alarm is cleared (also for a component that is gone, e.g. an undocked slot).

`live()` is what the systemd watchdog job asks (ops/sdnotify.py `ping_watchdog`): True only while every
component is live and the supervisor itself checked recently, so systemd restarts the daemon when the
supervision fails too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from edge_agent.catalog import Catalog
from edge_agent.config import LivenessSection
from edge_agent.protocol.heartbeat import Vital

log = logging.getLogger(__name__)

COMPONENT_STALLED = "component_stalled"

MAX_BACKOFF_CHECKS = 120   # at most this many check intervals between restarts of a component that keeps dying

VitalsProvider = Callable[[], Iterable[Vital]]


def alarm_key(name: str) -> str:
    return f"{COMPONENT_STALLED}:{name}"


class Liveness:
    """Watches the vitals of `providers`; restarts the dead, raises and clears `component_stalled`."""

    def __init__(self, catalog: Catalog, config: LivenessSection, providers: Iterable[VitalsProvider]):
        self.catalog = catalog
        self.check_s = config.check_s
        self.stall_s = config.stall_s
        self.providers = list(providers)
        self.restarts: dict[str, int] = {}
        self._retry: dict[str, tuple[int, float]] = {}   # name -> (restarts since live, not before: monotonic)
        self._stalled: dict[str, str] = {}       # component name -> why (dead / silent), alarm raised
        self._last_check: float | None = None
        self._started: float | None = None   # when the supervisor started: its first check is due from then
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for alarm in self.catalog.active_alarms():   # raised before a restart: cleared once seen live
            if alarm["kind"] == COMPONENT_STALLED:
                self._stalled[alarm["subject"]] = "before the last start"
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def live(self) -> bool:
        """True while every component is live and the supervisor itself looked within three intervals."""
        return not self.not_live()

    def not_live(self) -> dict[str, str]:
        """What is not live, each with why: the stalled components, and the supervisor itself when it has
        not looked within three intervals. Empty while everything is live."""
        problems = self.stalled()
        # Not yet checked is not stalled while the first check is still due (a slow start, under load, used to
        # withhold the first watchdog ping and send STATUS=stalled before READY).
        last = self._last_check if self._last_check is not None else self._started
        if (last is None or time.monotonic() - last > 3 * self.check_s or self._thread is None
                or not self._thread.is_alive()):
            problems["liveness"] = f"the supervisor has not checked for {3 * self.check_s:g} s"
        return problems

    def stalled(self) -> dict[str, str]:
        """The components now stalled, each with why."""
        return dict(self._stalled)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 (the supervisor must outlive a database hiccup; live() tells)
                log.exception("liveness check failed; trying again in %.0f s", self.check_s)
            self._stop.wait(self.check_s)

    def check(self) -> dict[str, str]:
        """One look at every component (see the module docstring). Returns the stalled ones."""
        now = time.monotonic()
        seen: set[str] = set()
        for vital in self._vitals():
            seen.add(vital.name)
            self._judge(vital, now)
        for name in [n for n in self._stalled if n not in seen]:
            self._clear(name, "gone")
        self._last_check = time.monotonic()
        return self.stalled()

    def _vitals(self) -> list[Vital]:
        vitals: list[Vital] = []
        for provider in self.providers:
            vitals.extend(provider())
        return vitals

    def _judge(self, vital: Vital, now: float) -> None:
        if not vital.alive():
            self._raise(vital.name, "its thread died", "it is being restarted" if vital.restart else
                        "it cannot be restarted in process: restart the daemon (systemctl restart edge-agent)")
            self._restart(vital, now)
            return
        silent = vital.heartbeat.silent_s(now)
        if silent > self.stall_s:
            self._raise(vital.name, f"no progress for {silent:.0f} s (limit liveness.stall_s={self.stall_s:g})",
                        "systemd's watchdog restarts the daemon; without systemd, restart it "
                        "(systemctl restart edge-agent) and send its log to support")
        elif vital.name in self._stalled:
            self._clear(vital.name, "live")

    def _restart(self, vital: Vital, now: float) -> None:
        """Restart a dead component, backing off (one check, two, four… up to `MAX_BACKOFF_CHECKS`) while it
        keeps dying: a volume that cannot be read is not re-docked every few seconds."""
        attempt, not_before = self._retry.get(vital.name, (0, 0.0))
        if vital.restart is None or now < not_before:
            return
        self._retry[vital.name] = (attempt + 1, now + self.check_s * min(2 ** attempt, MAX_BACKOFF_CHECKS))
        self.restarts[vital.name] = self.restarts.get(vital.name, 0) + 1
        try:
            vital.restart()
        except Exception:  # noqa: BLE001 (one component's failed restart must not stop the others')
            log.exception("restart failed component=%s", vital.name)
            return
        log.warning("component restarted component=%s restarts=%d", vital.name, self.restarts[vital.name])

    def _raise(self, name: str, why: str, action: str) -> None:
        first = self._stalled.get(name) != why
        self._stalled[name] = why
        message = f"component {name} stalled: {why}; {action}"
        if self.catalog.raise_alarm(alarm_key(name), COMPONENT_STALLED, name, message) or first:
            log.error("alarm raised key=%s kind=%s component=%s: %s", alarm_key(name), COMPONENT_STALLED, name,
                      message)

    def _clear(self, name: str, how: str) -> None:
        self._stalled.pop(name, None)
        self._retry.pop(name, None)
        if self.catalog.clear_alarm(alarm_key(name)):
            log.info("alarm cleared key=%s kind=%s component=%s (%s)", alarm_key(name), COMPONENT_STALLED, name, how)

    def report(self) -> dict[str, Any]:
        """For tests and the log: the stalled components and the restarts so far."""
        return {"live": self.live(), "stalled": self.stalled(), "restarts": dict(self.restarts)}
