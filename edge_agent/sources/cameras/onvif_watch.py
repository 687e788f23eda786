"""An ONVIF camera watched for as long as its worker runs: its clock, read again every `clock_check_s`, and its
tamper events (PullPoint) as alarms.

`OnvifWatcher` is the `drivers.onvif.WatchListener` of the camera's `CameraWatch`. A clock reading replaces
the camera's `clock_offset_ms` in health (the health tick's clock alarm judges it, ops/alarms.py; the next
segment's manifest carries it). An event whose topic is a kind of tampering (`TAMPER`) raises the alarm
`camera.<name>.<event>` while its state is true for any of the camera's video sources and clears it when the
state goes false for all of them. A new subscription (also one made again after it was lost) starts with the
camera's `Initialized` state of each topic, so a state that ended while the subscription was down clears too.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Protocol

from drivers import onvif
from edge_agent.catalog import Catalog
from edge_agent.clock import now_ms
from edge_agent.config import Camera


class ClockOffset(Protocol):
    """Where the camera's clock offset lives: the worker's CameraHealth (read by the intake and health)."""

    clock_offset_ms: int | None

log = logging.getLogger(__name__)


# Topic (matched anywhere in the event's topic) -> alarm name, alarm kind, what happened (the alarm's message).
# The kinds' advice, in the custodian's language, is in edge_agent/services/alarms.py (ADVICE).
TAMPER: tuple[tuple[re.Pattern[str], str, str, str], ...] = (
    (re.compile(r"VideoSource/GlobalSceneChange"), "scene_changed", "camera_scene_changed",
     "the scene changed (the camera was moved, turned or covered)"),
    (re.compile(r"VideoSource/ImageTooBlurry"), "too_blurry", "camera_too_blurry", "the picture is too blurry"),
    (re.compile(r"VideoSource/ImageTooDark"), "too_dark", "camera_too_dark", "the picture is too dark"),
    (re.compile(r"VideoSource/ImageTooBright"), "too_bright", "camera_too_bright", "the picture is too bright"),
    (re.compile(r"tamper", re.IGNORECASE), "tamper", "camera_tamper", "the camera reports tampering"),
)


def tamper_of(topic: str) -> tuple[str, str, str] | None:
    """(alarm name, kind, what happened) of an event topic that is a kind of tampering, else None."""
    for pattern, name, kind, what in TAMPER:
        if pattern.search(topic):
            return name, kind, what
    return None


class OnvifWatcher:
    """One ONVIF camera's clock and tamper events, from its `CameraWatch` into health and alarms."""

    def __init__(self, camera: Camera, health: ClockOffset, catalog: Catalog, password: str | None):
        assert camera.onvif is not None
        self.camera = camera
        self.health = health            # the worker's CameraHealth: clock_offset_ms is read by intake and health
        self.catalog = catalog
        self.clock_read_ms: int | None = None
        self.events = "off" if not camera.onvif_events else "starting"
        self.events_detail = ""
        self.last_event_ms: int | None = None
        self._active: dict[str, set[str]] = {}    # alarm name -> video sources whose state is true
        self._lock = threading.Lock()
        self.watch = onvif.CameraWatch(camera.onvif, camera.username, password, self,
                                       clock_check_s=camera.clock_check_s, events=camera.onvif_events,
                                       timeout=max(camera.stall_timeout_s, 5.0))

    def start(self) -> None:
        self.watch.start()

    def stop(self) -> None:
        self.watch.stop(timeout=2.0)

    # -- WatchListener ---------------------------------------------------------------------------------

    def clock_read(self, offset_ms: int | None) -> None:
        """A reading of the camera's clock (also the one taken at every (re)connect)."""
        if offset_ms is None:
            return
        previous = self.health.clock_offset_ms
        self.health.clock_offset_ms = offset_ms
        self.clock_read_ms = now_ms()
        if previous is not None and abs(offset_ms - previous) >= 2000:
            log.warning("camera_clock_moved camera=%s offset_ms=%d previous_ms=%d", self.camera.name, offset_ms,
                        previous)

    def events_state(self, state: str, detail: str) -> None:
        self.events, self.events_detail = state, detail
        log.info("camera_onvif_events camera=%s state=%s detail=%s", self.camera.name, state, detail)

    def camera_event(self, event: onvif.CameraEvent) -> None:
        self.last_event_ms = now_ms()
        tamper = tamper_of(event.topic)
        if tamper is None or event.state is None:
            log.debug("camera_onvif_event camera=%s topic=%s state=%s", self.camera.name, event.topic, event.state)
            return
        name, kind, what = tamper
        cam = self.camera
        with self._lock:
            sources = self._active.setdefault(name, set())
            (sources.add if event.state else sources.discard)(event.source or "")
            active = bool(sources)
        key = f"camera.{cam.name}.{name}"
        log.warning("camera_tamper_event camera=%s topic=%s source=%s state=%s operation=%s", cam.name, event.topic,
                    event.source, event.state, event.operation)
        if active:
            self.catalog.raise_alarm(key, kind, cam.name,
                                     f"camera {cam.name} at {cam.location}: {what} (ONVIF event {event.topic}, "
                                     f"source {event.source or '-'}); check the camera on site")
        else:
            self.catalog.clear_alarm(key)

    # -- health ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The camera's `onvif` entry in health."""
        with self._lock:
            active = sorted(name for name, sources in self._active.items() if sources)
        return {"clock_check_s": self.camera.clock_check_s, "clock_read_ms": self.clock_read_ms,
                "events": self.events, "events_detail": self.events_detail,
                "subscriptions": self.watch.subscriptions, "last_event_ms": self.last_event_ms,
                "tamper_topics": [t for t in self.watch.topics if tamper_of(t) is not None],
                "tamper_active": active}
