"""The health snapshot (DESIGN.md section 6), published retained on `{root}/{agent}/health`.

`HealthMonitor.snapshot()` assembles the agent's view: what the monitor reads itself (clock, CPU, memory,
disk and store, the sync queue, the audit and chain heads, the active alarms) and what each part reports
through its `HealthProvider` (the process, the uplink, the scrub, the dock slots, the cameras). `tick()`
evaluates the alarms, then publishes the snapshot through the publisher (the uplink, retained) and writes it
atomically to `data_dir/health.json`, which `edge-agent status` shows as the daemon's live view.
`check_change()` publishes early when something a watcher cares about changed (an alarm, a dock slot's
state, a camera or the uplink going up or down). The shape is `edge_agent/protocol/schemas/health.json`,
versioned by `schema_version`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import psutil

from edge_agent.catalog import UNSYNCED, Catalog
from edge_agent.clock import iso_ms, now_ms, read_kernel_clock
from edge_agent.config import AgentConfig
from edge_agent.durable import atomic_write
from edge_agent.layout import StoreLayout
from edge_agent.ops.alarms import AlarmEvaluator
from edge_agent.ops.retention import Retention, filesystem_percent
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.wire import schema

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HEALTH_FILE = "health.json"
CLOCK_CACHE_S = 60.0


def parse_chrony_tracking(csv_line: str) -> dict[str, Any]:
    """`chronyc -c tracking`: field 5 is the system clock's offset from NTP time in seconds, field 14 the
    leap status ("Normal" when synchronised)."""
    fields = csv_line.strip().split(",")
    if len(fields) < 14:
        raise ValueError(f"unexpected chronyc tracking output: {csv_line!r}")
    return {"source": "chrony", "synchronized": fields[13] == "Normal",
            "offset_ms": round(float(fields[4]) * 1000), "reference": fields[1] or fields[0]}


def _tool(args: list[str]) -> str:
    # Without the daemon's systemd variables: a systemd tool that fails would report its ERRNO on our socket.
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    return subprocess.run(args, capture_output=True, text=True, timeout=5, check=True, env=env).stdout


def read_clock() -> dict[str, Any]:
    """Clock sync state: the kernel's own (adjtimex: synchronised, maximum and estimated error) always, and
    chrony's offset and reference when chronyd runs. `source` names what `synchronized` comes from."""
    kernel = read_kernel_clock()
    kernel_part: dict[str, Any] = {"kernel": kernel.as_dict()} if kernel is not None else {}
    if shutil.which("chronyc"):
        try:
            out = _tool(["chronyc", "-c", "tracking"])
            return {**parse_chrony_tracking(out), **kernel_part}
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.debug("chronyc tracking unavailable: %s", exc)
    if kernel is not None:
        return {"source": "kernel", "synchronized": kernel.synchronized, "offset_ms": None, **kernel_part}
    return {"source": "unknown", "synchronized": None, "offset_ms": None}


class HealthProvider(Protocol):
    """A part of the agent that reports on itself in the health snapshot.

    `health()` returns a fragment: the snapshot keys this part owns, with their values, e.g.
    `{"docks": [...]}`, `{"cameras": [...]}`, `{"sync": {...}}`. The monitor merges each named provider's
    fragment at its place (see `HealthMonitor`). It is called from the scheduler thread (every tick and every
    change check): it must be a cheap read, safe against the component's own threads."""

    def health(self) -> dict[str, Any]: ...


class Publisher(Protocol):
    """Where a snapshot goes besides the health file (the uplink: retained on `{root}/{agent}/health`)."""

    def publish(self, suffix: str, payload: dict[str, Any], retain: bool = False) -> bool: ...


class ScrubHealth:
    """`Scrubber` -> `{"scrub": its last run}`; empty until the first scrub slice has run."""

    def __init__(self, scrubber: Any):
        self.scrubber = scrubber

    def health(self) -> dict[str, Any]:
        return {"scrub": self.scrubber.status}


# A part the agent was built without: its fragment says it is not there.
NO_UPLINK: dict[str, Any] = {"sync": {"connected": False, "rate_bps": None, "last_ack_ms": None, "last_ack": None,
                                      "bytes_sent": None, "in_flight": None, "configured": False}}
NO_CAMERAS: dict[str, Any] = {"cameras": []}
NO_SCRUB: dict[str, Any] = {"scrub": {}}


class _Fixed:
    """A provider for a part the agent was built without: always the same fragment."""

    def __init__(self, fragment: dict[str, Any]):
        self.fragment = fragment

    def health(self) -> dict[str, Any]:
        return copy.deepcopy(self.fragment)


class HealthMonitor:
    """Builds, evaluates and publishes the health snapshot of one running agent.

    The monitor reads the catalog, the store and this process itself; every other part reports through a
    named provider: `process` (the `agent` keys version, pid, uptime_s, key_id), `uplink` (`agent.sync`),
    `scrub` (`agent.scrub`), `docks` (top-level `docks`), `cameras` (top-level `cameras`). A part the agent
    was built without (no uplink, no cameras) is left out and shows as not there."""

    def __init__(self, config: AgentConfig, catalog: Catalog, layout: StoreLayout, retention: Retention, *,
                 process: HealthProvider, docks: HealthProvider, cameras: HealthProvider | None = None,
                 gb28181: HealthProvider | None = None,
                 uplink: HealthProvider | None = None, scrub: HealthProvider | None = None,
                 publisher: Publisher | None = None):
        self.catalog = catalog
        self.config = config
        self.layout = layout
        self.retention = retention
        self.process = process
        self.docks = docks
        self.cameras = cameras or _Fixed(NO_CAMERAS)
        self.gb28181 = gb28181   # the GB/T 28181 device (`[gb28181]`): top-level `gb28181`, absent when off
        self.uplink = uplink or _Fixed(NO_UPLINK)
        self.scrub = scrub or _Fixed(NO_SCRUB)
        self.publisher = publisher
        self.alarms = AlarmEvaluator(catalog, config)
        self.path = layout.data_dir / HEALTH_FILE
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading only sets the baseline
        self._clock: dict[str, Any] = {}
        self._clock_read = 0.0
        self._last_signature: str | None = None
        self._lock = threading.Lock()

    # -- gathering ---------------------------------------------------------------------------------

    def clock(self) -> dict[str, Any]:
        """chrony's view cached (a subprocess), the kernel's read afresh (one syscall)."""
        if time.monotonic() - self._clock_read > CLOCK_CACHE_S or not self._clock:
            self._clock = read_clock()
            self._clock_read = time.monotonic()
        kernel = read_kernel_clock()
        if kernel is None:
            return dict(self._clock)
        fresh = {"kernel": kernel.as_dict()}
        if self._clock.get("source") == "kernel":
            fresh["synchronized"] = kernel.synchronized
        return {**self._clock, **fresh}

    def _queue(self, now: int) -> dict[str, Any]:
        queue = self.catalog.files.backlog(UNSYNCED)
        return {"files": queue.files, "bytes": queue.bytes,
                "oldest_unsynced_age_s": queue.oldest_age_s(now),
                "by_state": self.catalog.counts_by_state()}

    def _disk(self) -> dict[str, Any]:
        usage = self.layout.disk_usage()
        store = self.retention.store_bytes()
        store_percent = 100.0 * store / self.retention.max_store_bytes
        fs_percent = filesystem_percent(self.layout)
        return {"total_bytes": usage.total, "free_bytes": usage.free, "store_bytes": store,
                "max_store_bytes": self.retention.max_store_bytes, "store_percent": round(store_percent, 2),
                "filesystem_percent": round(fs_percent, 2), "used_percent": round(max(store_percent, fs_percent), 2),
                "days_until_full": self.retention.forecast_days_until_full()}

    def alarm_list(self) -> list[dict[str, Any]]:
        return [{"key": a["key"], "kind": a["kind"], "subject": a["subject"], "message": a["message"],
                 "raised_ms": a["raised_ms"]} for a in self.catalog.active_alarms()]

    def snapshot(self) -> dict[str, Any]:
        now = now_ms()
        memory = psutil.virtual_memory()
        agent = self.config.agent
        return {
            "schema_version": SCHEMA_VERSION,
            "agent_id": agent.id, "site_id": agent.site, "unit": agent.unit,
            "ts_ms": now, "ts": iso_ms(now),
            "agent": {
                **self.process.health(),
                # How often to expect the next snapshot: a watcher calls the agent stale after 3 of them.
                "health_interval_s": self.config.health.interval_s,
                "clock": self.clock(),
                "cpu_percent": self._process.cpu_percent(None),
                "system_cpu_percent": psutil.cpu_percent(None),
                "memory": {"rss_bytes": self._process.memory_info().rss, "system_percent": memory.percent},
                "disk": self._disk(),
                "queue": self._queue(now),
                **self.uplink.health(),
                "audit_head": self.catalog.meta_get("audit_head"),
                "chain_head": self.catalog.meta_get("chain_head"),
                **self.scrub.health(),
            },
            **self.docks.health(),
            **self.cameras.health(),
            **(self.gb28181.health() if self.gb28181 is not None else {}),
            "alarms": self.alarm_list(),
        }

    # -- publishing --------------------------------------------------------------------------------

    def _state_signature(self) -> list[Any]:
        """What a watcher wants to hear about at once, besides alarms: a recorder docked, done, failing or
        gone; a camera up or down; the uplink coming back (a fresh snapshot right after a reconnect). Counts
        and rates wait for the next interval: a busy dock must not turn health into a stream. All cheap reads."""
        slots = [(s["dock"], s["label"], s["state"], s["last_error"]) for s in self.docks.health()["docks"]]
        cameras = [(c.get("name"), c.get("connected")) for c in self.cameras.health()["cameras"]]
        connected = bool(self.uplink.health()["sync"]["connected"])
        gb_registered = self.gb28181 is not None and bool(self.gb28181.health()["gb28181"]["registered"])
        return [slots, cameras, connected, gb_registered]
    def signature(self) -> str:
        return json.dumps([self._state_signature(), [a["key"] for a in self.catalog.active_alarms()]], default=str)

    def tick(self) -> dict[str, Any]:
        """Evaluate the alarms, then publish and write the snapshot."""
        with self._lock:
            # Each part of the signature is read before what the snapshot shows of it, so a change racing
            # this tick is seen by the next check_change.
            state = self._state_signature()
            snapshot = self.snapshot()
            self.alarms.evaluate(snapshot, snapshot["ts_ms"])
            snapshot["alarms"] = self.alarm_list()
            self._last_signature = json.dumps([state, [a["key"] for a in snapshot["alarms"]]], default=str)
            self.publish(snapshot)
            return snapshot

    def check_change(self) -> bool:
        """Publish now if something a watcher cares about changed since the last snapshot."""
        if self.signature() == self._last_signature:
            return False
        self.tick()
        return True

    def publish(self, snapshot: dict[str, Any]) -> None:
        data = canonical_json(snapshot)
        atomic_write(self.path, data, mode=0o640)
        if self.publisher is not None:
            self.publisher.publish("health", snapshot, retain=True)


def read_health_file(data_dir: Path, max_age_s: float) -> dict[str, Any] | None:
    """The daemon's last snapshot if it is younger than `max_age_s`, else None (daemon stopped or stuck)."""
    path = data_dir / HEALTH_FILE
    try:
        snapshot = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(snapshot, dict) or time.time() * 1000 - snapshot.get("ts_ms", 0) > max_age_s * 1000:
        return None
    return snapshot


def load_schema() -> dict[str, Any]:
    """The snapshot's JSON Schema (edge_agent/protocol/schemas/health.json)."""
    return schema("health")
