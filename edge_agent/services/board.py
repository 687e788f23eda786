"""The status page's board (edge_agent/ui): one read of what a custodian at the dock wants to see at a glance.

A bay per docked slot (who, how far, how fast, when done, and 可取走 / safe to take once every file of the
recorder is sealed: copied, read back, hashed and signed locally), the active alarms oldest first, the
cameras, the uplink's backlog and the disk. The running parts (docks, uplink, cameras) report through their
`health()` fragments, the same the health snapshot is made of; the rest comes from the catalog's reports.
Codes here are English and stable (`state`, `stuck`); the page puts them into the custodian's words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.catalog.reports import Alarm
from edge_agent.clock import now_ms
from edge_agent.ops.retention import Retention
from edge_agent.services.workspace import Result, Workspace
from edge_agent.sources.docks import SlotState
from edge_agent.sources.recorders import UNIDENTIFIED_PREFIX

__all__ = ["Bay", "Board", "CameraLine", "camera_thumbnail", "Disk", "DiskForecast", "LiveParts", "UplinkLine", "board"]

# How long a days-until-full forecast is reused: it sums the last week's intake, which moves slowly.
FORECAST_TTL_MS = 60_000

# Why a bay is stuck, as codes the page words: the slot's own error follows in `error`.
STUCK_UNIDENTIFIED = "unidentified"
STUCK_DISK_FULL = "disk_full"
STUCK_READ_ERROR = "read_error"


class HealthProvider(Protocol):
    def health(self) -> dict[str, Any]: ...


class CameraProvider(HealthProvider, Protocol):
    def thumbnail(self, name: str) -> bytes | None: ...


@dataclass(frozen=True)
class LiveParts:
    """The running daemon's parts the board reads: its dock service, and its uplink and cameras if built."""

    docks: HealthProvider
    uplink: HealthProvider | None = None
    cameras: CameraProvider | None = None


@dataclass(frozen=True)
class Bay(Result):
    """One docked slot. `state` is the slot's (identifying, ingesting, paused, done, error); `safe_to_take`
    once every file on the recorder is sealed locally; `stuck` a code (unidentified, disk_full, read_error)
    when the bay needs the custodian, with the slot's `error`."""

    key: str
    dock: str
    slot: int | None
    label: str
    device_id: str | None
    model: str | None
    officer_id: str | None
    officer_name: str | None
    files_done: int
    files_total: int
    bytes_copied: int
    bytes_total: int
    rate_bps: float
    eta_s: int | None
    state: str
    safe_to_take: bool
    stuck: str | None
    error: str | None


@dataclass(frozen=True)
class CameraLine(Result):
    """`thumbnail_ms`: when the last keyframe was checked (its picture at `camera_thumbnail`), None before."""

    name: str
    location: str | None
    connected: bool
    recording: bool
    gaps_today: int
    thumbnail_ms: int | None


@dataclass(frozen=True)
class UplinkLine(Result):
    configured: bool
    connected: bool
    backlog_files: int
    backlog_bytes: int
    oldest_unsynced_age_s: int | None


@dataclass(frozen=True)
class Disk(Result):
    """`days_until_full`: at the last week's intake rate, until the store reaches max_disk_gb or the disk is
    full, whichever comes first (ops.retention's forecast, as in health); None with no intake to project."""

    used_percent: float
    free_bytes: int
    total_bytes: int
    days_until_full: float | None


class DiskForecast:
    """Days until full, worked out again once a minute or when the docks have taken more files (a board is read
    twice a second per screen; the forecast sums the last week's intake)."""

    def __init__(self, ttl_ms: int = FORECAST_TTL_MS):
        self.ttl_ms = ttl_ms
        self._at: int | None = None
        self._taken: int | None = None
        self._days: float | None = None

    def days(self, ws: Workspace, now: int, taken: int) -> float | None:
        """The forecast; `taken` is what the docked bays have taken so far (a change means new intake)."""
        if self._at is None or now - self._at >= self.ttl_ms or taken != self._taken:
            self._days = Retention(ws.catalog, ws.layout, ws.config).forecast_days_until_full(now)
            self._at, self._taken = now, taken
        return self._days


@dataclass(frozen=True)
class Board(Result):
    agent_id: str
    unit: str
    ts_ms: int
    bays: tuple[Bay, ...]
    alarms: tuple[Alarm, ...]
    cameras: tuple[CameraLine, ...]
    uplink: UplinkLine
    disk: Disk


def bay(entry: Mapping[str, Any]) -> Bay:
    """A bay from a slot's health entry (`SlotStatus.health()`)."""
    state = entry["state"]
    done = entry["files_total"] - entry["files_pending"]
    left = max(entry["bytes_total"] - entry["bytes_copied"], 0)
    rate = float(entry["rate_bps"] or 0)
    eta = int(left / rate) if state == SlotState.INGESTING and rate > 0 and left else None
    error = entry["last_error"]
    stuck = None
    unidentified = entry["device_id"] is None or entry["device_id"].startswith(UNIDENTIFIED_PREFIX)
    if state == SlotState.PAUSED:
        stuck = STUCK_DISK_FULL
    elif state == SlotState.ERROR:
        stuck = STUCK_READ_ERROR
    elif unidentified and state != SlotState.IDENTIFYING:
        stuck = STUCK_UNIDENTIFIED   # its files are taken (and sealed) all the same; the custodian says whose
    return Bay(key=f"{entry['dock']}/{entry['label']}", dock=entry["dock"], slot=entry["slot"], label=entry["label"],
               device_id=entry["device_id"], model=entry["model"], officer_id=entry["officer_id"],
               officer_name=entry.get("officer_name"), files_done=done,
               files_total=entry["files_total"], bytes_copied=entry["bytes_copied"],
               bytes_total=entry["bytes_total"], rate_bps=rate, eta_s=eta, state=state,
               safe_to_take=state == SlotState.DONE, stuck=stuck, error=error)


def board(ws: Workspace, live: LiveParts, forecast: DiskForecast | None = None) -> Board:
    """The board now; `forecast` keeps the days-until-full figure between reads (a fresh one if None)."""
    now = now_ms()
    reports = ws.reports
    backlog = reports.unsynced()
    sync = live.uplink.health()["sync"] if live.uplink is not None else {"connected": False}
    cameras = live.cameras.health()["cameras"] if live.cameras is not None else []
    usage = ws.layout.disk_usage()
    bays = sorted((bay(entry) for entry in live.docks.health()["docks"]), key=lambda b: (b.dock, b.slot or 0, b.label))
    return Board(
        agent_id=ws.config.agent.id, unit=ws.config.agent.unit, ts_ms=now, bays=tuple(bays),
        alarms=tuple(reports.active_alarms()),
        cameras=tuple(CameraLine(c["name"], c.get("location"), bool(c.get("connected")), bool(c.get("recording")),
                                 int(c.get("gaps_today") or 0), (c.get("image_checks") or {}).get("checked_ms"))
                      for c in cameras),
        uplink=UplinkLine(live.uplink is not None, bool(sync["connected"]), backlog.files, backlog.bytes,
                          backlog.oldest_age_s(now)),
        disk=Disk(round(100.0 * usage.used / usage.total, 1) if usage.total else 0.0, usage.free, usage.total,
                  (forecast or DiskForecast()).days(ws, now, sum(b.files_done for b in bays))),
    )


def camera_thumbnail(live: LiveParts, name: str) -> bytes | None:
    """The last keyframe of camera `name` the image checks decoded, as a small JPEG; None if there is none."""
    return live.cameras.thumbnail(name) if live.cameras is not None else None
