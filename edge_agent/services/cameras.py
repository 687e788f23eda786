"""Cameras: was this camera recording at 14:03 (its gaps, with their causes), the public list of camera
locations (R11), and ONVIF discovery on the local network (only when asked)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig, Camera
from edge_agent.i18n import N_
from edge_agent.services.workspace import Result, ServiceError, Workspace

if TYPE_CHECKING:
    from edge_agent.sources.cameras import Gap

# The camera stage (PyAV, OpenCV, ONVIF) is imported by the two questions that need it, not by every command:
# it was a second of every `edge-agent` start.


@dataclass(frozen=True)
class RecordingAt(Result):
    """Whether `camera` was recording at `at_ms`: the segment that covers it, or the gap that does (neither
    when the time is before the camera's first segment or in one not yet taken in from the spool)."""

    camera: str
    at_ms: int
    recording: bool
    file_id: str | None
    gap: Gap | None


@dataclass(frozen=True)
class GapReport(Result):
    """The camera's gaps overlapping [since_ms, until_ms], oldest first; an open gap has end_ms None."""

    camera: str
    since_ms: int
    until_ms: int
    gaps: tuple[Gap, ...]


@dataclass(frozen=True)
class Location(Result):
    name: str
    location: str
    location_kind: str


@dataclass(frozen=True)
class Discovered(Result):
    """An ONVIF device that answered the WS-Discovery probe."""

    endpoint: str | None
    xaddrs: tuple[str, ...]
    scopes: tuple[str, ...]
    name: str | None
    address: str

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "xaddrs": list(self.xaddrs), "scopes": list(self.scopes),
                "name": self.name, "from": self.address}


def camera(ws: Workspace, name: str) -> Camera:
    """The configured camera `name`, or a refusal listing the cameras there are."""
    for configured in ws.config.cameras:
        if configured.name == name:
            return configured
    known = ", ".join(c.name for c in ws.config.cameras)
    if not known:
        raise ServiceError(N_("no camera {name!r} in {config}: it has no cameras configured"), name=name,
                           config=ws.source)
    raise ServiceError(N_("no camera {name!r} in {config} (cameras: {known})"), name=name, config=ws.source,
                       known=known)


def recording_at(ws: Workspace, name: str, at_ms: int, *, reason: str | None = None) -> RecordingAt:
    """Was camera `name` recording at `at_ms`? The question is audited."""
    camera(ws, name)
    ws.catalog.audit("devices.gaps", subject=name, reason=reason, detail={"at_ms": at_ms})
    from edge_agent.sources.cameras import was_recording

    recording, gap, file_id = was_recording(ws.catalog, name, at_ms)
    return RecordingAt(name, at_ms, recording, file_id, gap)


def gap_report(ws: Workspace, name: str, since_ms: int, *, reason: str | None = None) -> GapReport:
    """Camera `name`'s gaps from `since_ms` until now. The question is audited."""
    camera(ws, name)
    ws.catalog.audit("devices.gaps", subject=name, reason=reason, detail={"since_ms": since_ms})
    until = now_ms()
    from edge_agent.sources.cameras import gaps

    return GapReport(name, since_ms, until, tuple(gaps(ws.catalog, name, since_ms, until)))


def locations(config: AgentConfig) -> tuple[Location, ...]:
    """Camera names and locations, for public announcement before use (R11)."""
    return tuple(Location(c.name, c.location, c.location_kind) for c in config.cameras)


def discover(timeout_s: float, target: tuple[str, int] | None = None) -> tuple[Discovered, ...]:
    """One WS-Discovery probe to the multicast group (or to `target`, a known camera); answers for `timeout_s`."""
    from drivers import onvif  # zeep and aiohttp are slow to import; only this command needs them

    found = onvif.discover(timeout_s, target or onvif.DISCOVERY_ADDRESS)
    return tuple(Discovered(f["endpoint"], tuple(f["xaddrs"]), tuple(f["scopes"]), f["name"], f["from"])
                 for f in found)
