"""`edge-agent run`: one daemon per workstation or gateway (DESIGN.md section 1). The composition root.

`Agent(config)` builds the core every use needs (store, catalog, key, ingest, the dock service and its
drivers); `build_agent` adds the long-running parts the config asks for, in start order: the uplink, the
cameras, the operations scheduler. Each part is a declared attribute (None when not built) and a
`Component` in `components`; `Agent.start` starts them in that order and `Agent.stop` stops them in reverse.
Parts talk through the catalog, small queues and callables handed over here, never through each other's
internals; nothing but `edge_agent.cli` imports this module.

An `Agent` owns its data dir (`layout.DataDirLock`, taken first in `Agent(...)`, given up in `stop()`); a
second one on the same data dir raises `DataDirOwned` naming the first's pid. While it runs, the control
socket (`ops/control.py`) takes what only the owner may do from CLI commands: `import`, run on this
agent's own `DockService` (so crash recovery never runs beside anyone's copy), and `keys_rotate`, done by its
sealer (so it signs with the new key at once).
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from drivers.base import DockDriver
from edge_agent import __version__
from edge_agent.catalog import Catalog
from edge_agent.catalog.health_reads import HealthReads
from edge_agent.config import AgentConfig
from edge_agent.evidence.keys import KEY_IN_FORCE
from edge_agent.evidence.manifest import AgentKey, recover_rotation
from edge_agent.evidence.scrub import Scrubber
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.layout import DataDirLock, DataDirOwned, StoreLayout
from edge_agent.ops import sdnotify
from edge_agent.ops.control import (
    ControlError,
    ControlServer,
    ImportArgs,
    Request,
    RotateArgs,
    Send,
    import_outcome,
)
from edge_agent.ops.health import HealthMonitor, ScrubHealth
from edge_agent.ops.liveness import Liveness, VitalsProvider
from edge_agent.ops.retention import Retention
from edge_agent.ops.scheduler import Job, Scheduler, daily_summary
from edge_agent.services.workspace import store_layout
from edge_agent.sources.docks import DockService
from edge_agent.sources.recorders import RecorderModel, VolumeIdentity, load_models

if TYPE_CHECKING:  # imported when built: paho, av and OpenCV (and the web stack) load only when the config needs them
    from edge_agent.sources.cameras import CameraService
    from edge_agent.sources.gb28181 import GbDevice
    from edge_agent.sync import Uplink
    from edge_agent.ui import StatusPage

log = logging.getLogger(__name__)

__all__ = ["Agent", "DataDirOwned", "build_agent"]

SCRUB_EVERY_S = 60
SCRUB_BUDGET_S = 50


class Component(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Operations:
    """Health and alarms, retention, the scrub, the daily summary and the systemd watchdog: jobs on one
    scheduler thread (the component `build_agent` adds last)."""

    retention: Retention
    scrubber: Scrubber
    health: HealthMonitor
    scheduler: Scheduler
    liveness: Liveness

    def start(self) -> None:
        self.scheduler.start()
        self.liveness.start()

    def stop(self) -> None:
        self.liveness.stop()
        self.scheduler.stop()

    def on_command(self, command: dict[str, Any]) -> None:
        """`{"cmd": "health"}` from the platform (already authenticated by the uplink): a snapshot now.
        Runs on the MQTT network thread, so it only moves the job's next run."""
        if command.get("cmd") == "health":
            self.scheduler.run_now("health")


class Agent:
    """Everything `edge-agent run` starts, built from one config."""

    config: AgentConfig
    layout: StoreLayout
    owner: DataDirLock
    catalog: Catalog
    sealer: Sealer
    ingestor: Ingestor
    models: list[RecorderModel]
    docks: DockService
    dock_drivers: list[DockDriver]
    uplink: Uplink | None
    cameras: CameraService | None
    gb28181: GbDevice | None
    operations: Operations | None
    status_page: StatusPage | None
    components: list[Component]

    def __init__(self, config: AgentConfig, *, dock_drivers: list[DockDriver] | None = None):
        self.config = config
        self.started_monotonic = time.monotonic()
        self.version = __version__
        self.layout = store_layout(config).open()
        if config.store.encrypt is not None or config.store.key_file is not None:
            self.layout.at_rest.key()   # StoreKeyError (a PermissionError) now, not at the first copy
        self.owner = DataDirLock.acquire(self.layout, command="run")   # DataDirOwned: another agent runs here
        try:
            self._build_core(dock_drivers)
        except BaseException:
            self.owner.release()
            raise
        self.uplink = None
        self.cameras = None
        self.gb28181 = None
        self.operations = None
        self.status_page = None
        self.components = []
        self.control = ControlServer(self.layout.control_socket, {"import": self._import,
                                                                  "keys_rotate": self._rotate_key})
        self._stop = threading.Event()

    def _build_core(self, dock_drivers: list[DockDriver] | None) -> None:
        config = self.config
        self.catalog = Catalog(config.catalog_path)
        settled = recover_rotation(self.layout.keys, self.catalog.meta.get(KEY_IN_FORCE))   # owner only
        if settled is not None:
            log.warning("key rotation interrupted by a crash was %s", settled)
        self.sealer = Sealer(self.catalog, AgentKey.load_or_create(self.layout.keys, config.crypto.suite), self.layout,
                             config)
        followed = self.sealer.follow_suite()
        if followed is not None:
            log.warning("crypto suite is now %s: signing key rotated old=%s new=%s", config.crypto.suite, *followed)
        self.ingestor = Ingestor(self.catalog, self.layout, self.sealer, config)
        self.models = load_models(config.agent.recorders_file)
        self.docks = DockService(self.catalog, self.ingestor, self.sealer, config, self.models)
        self.dock_drivers = dock_drivers if dock_drivers is not None else build_dock_drivers(config, self.models)

    # -- building: each adds one declared part and its component, in start order -------------------

    def add_uplink(self) -> Uplink:
        """The uplink to the platform (edge_agent/sync)."""
        from edge_agent.sync import Uplink

        self._refuse_twice(self.uplink, "an uplink")
        self.uplink = Uplink(self.catalog, self.layout, self.config, version=self.version,
                             intake_busy=self.docks.collecting)
        self.components.append(self.uplink)
        return self.uplink

    def add_cameras(self) -> CameraService:
        """ONVIF + RTSP recording of every configured camera (edge_agent/sources/cameras.py)."""
        from edge_agent.sources.cameras import CameraService

        self._refuse_twice(self.cameras, "a camera service")
        self.cameras = CameraService(self.catalog, self.ingestor, self.sealer, self.config)
        self.components.append(self.cameras)
        return self.cameras

    def add_gb28181(self) -> GbDevice:
        """The gateway as a GB/T 28181 device (`[gb28181]`, edge_agent/sources/gb28181): registers with the
        platform and answers its Catalog / DeviceInfo / RecordInfo queries; add it after the cameras."""
        from edge_agent.sources.gb28181 import GbDevice

        self._refuse_twice(self.gb28181, "a GB/T 28181 device")
        cameras = self.cameras
        self.gb28181 = GbDevice(self.config, self.catalog, cameras.online if cameras is not None else None)
        self.components.append(self.gb28181)
        return self.gb28181

    def add_operations(self) -> Operations:
        """Health, alarms, retention, scrub, summary and watchdog (edge_agent/ops); add it after the parts
        it reports on, so it stops first and its last snapshot still sees them."""
        self._refuse_twice(self.operations, "an operations scheduler")
        scheduler = Scheduler(self.config.agent.zone, beat_s=self.config.liveness.check_s)
        retention = Retention(self.catalog, self.layout, self.config)
        scrubber = Scrubber(self.catalog, self.layout, self.config, stop=scheduler.stopping)
        health = self.health_monitor(retention, scrubber)
        liveness = Liveness(self.catalog, self.config.liveness, self.vitals(scheduler))
        for job in operations_jobs(self.config, self.catalog, retention, scrubber, health, scheduler.stopping,
                                   liveness, checkpoint=lambda: self.sealer.checkpoint("periodic")):
            scheduler.add(job)
        self.operations = Operations(retention, scrubber, health, scheduler, liveness)
        self.components.append(self.operations)
        if self.uplink is not None:
            self.uplink.on_command(self.operations.on_command)
        return self.operations

    def add_status_page(self) -> StatusPage:
        """The status page at the dock (edge_agent/ui, `[ui]`): read-only, reads the docks, uplink and cameras
        built so far; add it after them, so it stops first."""
        from edge_agent import i18n
        from edge_agent.services.board import LiveParts
        from edge_agent.ui import StatusPage

        self._refuse_twice(self.status_page, "a status page")
        self.status_page = StatusPage(self.config, LiveParts(self.docks, self.uplink, self.cameras),
                                      i18n.choose(self.config.ui.language))
        self.components.append(self.status_page)
        return self.status_page

    def vitals(self, scheduler: Scheduler) -> list[VitalsProvider]:
        """What ops/liveness.py supervises: the uplink's connection and sender, every dock worker, every
        camera's recorder, the GB/T 28181 device's thread, the scheduler."""
        providers: list[VitalsProvider] = [self.docks.vitals, lambda: [scheduler.vital()]]
        if self.uplink is not None:
            providers.append(self.uplink.vitals)
        if self.cameras is not None:
            providers.append(self.cameras.vitals)
        if self.gb28181 is not None:
            providers.append(self.gb28181.vitals)
        return providers

    @staticmethod
    def _refuse_twice(current: object, what: str) -> None:
        if current is not None:
            raise RuntimeError(f"this agent already has {what}; build each part once")

    def health_monitor(self, retention: Retention, scrubber: Scrubber | None = None) -> HealthMonitor:
        """The health monitor over the parts built so far, each as a named provider; publishes through the
        uplink when there is one."""
        return HealthMonitor(
            self.config, self.catalog, self.layout, retention, process=self, docks=self.docks,
            cameras=self.cameras,
            gb28181=self.gb28181,
            uplink=self.uplink,
            scrub=None if scrubber is None else ScrubHealth(scrubber),
            publisher=self.uplink)

    def health(self) -> dict[str, Any]:
        """The process's own keys of the snapshot's `agent` section (HealthProvider)."""
        return {"version": self.version, "pid": self.pid, "uptime_s": int(self.uptime_s),
                "key_id": self.sealer.key.key_id}

    # -- running -----------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.ingestor.recover()
        self.catalog.audit("agent.started", actor="edge-agent",
                           detail={"version": self.version, "key_id": self.sealer.key.key_id, **recovered})
        for component in self.components:
            component.start()
        if self.operations is not None:  # the daemon proper: systemd may now count it as started
            sdnotify.notify(f"READY=1\nSTATUS=collecting; agent {self.config.agent.id}")
        for driver in self.dock_drivers:
            driver.start(self.docks)
        self.control.start()   # after recovery: an import never runs beside it
        log.info("started agent=%s version=%s docks=%d", self.config.agent.id, self.version, len(self.dock_drivers))

    def stop(self) -> None:
        if self.operations is not None:
            sdnotify.notify("STOPPING=1")
        self.control.stop()
        for driver in self.dock_drivers:
            driver.stop()
        self.docks.stop()   # also ends the imports in progress
        if not self.control.wait(30):
            log.warning("control requests still running at stop; their callers will see the connection end")
        for component in reversed(self.components):
            component.stop()
        try:
            self.catalog.audit("agent.stopped", actor="edge-agent")
        except sqlite3.OperationalError as exc:  # a full disk: stop cleanly all the same, unrecorded
            log.error("agent.stopped not written to the audit log: %s", exc)
        self.catalog.close()
        self.owner.release()

    def _import(self, request: Request, send: Send) -> dict[str, Any]:
        """The control socket's `import`: the folder as one docking session on this agent's DockService,
        `import.started` audited as the calling OS user (from the kernel)."""
        args = ImportArgs.from_wire(request.args)
        if args.path.resolve().is_relative_to(self.layout.data_dir.resolve()):
            raise ControlError(f"{args.path} is inside the data dir: import a card or a folder of recordings")
        if not args.path.is_dir():
            raise ControlError(f"the daemon (user {os.getuid()}) sees no folder at {args.path}: give a path it can "
                               f"read (under systemd not /tmp or /home: the unit hides them)")
        self.catalog.audit("import.started", subject=str(args.path), reason=args.reason,
                           actor=request.caller.actor(args.user),
                           detail={**args.audit_detail(), "via": "control socket", "caller_pid": request.caller.pid})
        status = self.docks.import_volume(
            args.volume(), VolumeIdentity(device_id=args.device_id, method="custodian", officer_id=args.officer_id),
            on_progress=lambda done, total: send({"bytes_done": done, "bytes_total": total}))
        return import_outcome(status)

    def _rotate_key(self, request: Request, _send: Send) -> dict[str, Any]:
        """The control socket's `keys_rotate`: the sealer chains the rotation document signed by the old key
        and signs everything after it with the new one, `keys.rotated` audited as the calling OS user."""
        args = RotateArgs.from_wire(request.args)
        old, new = self.sealer.rotate_key(reason=args.reason, actor=request.caller.actor(args.user),
                                          via=f"control socket (caller pid {request.caller.pid})")
        log.info("key rotated old=%s new=%s", old, new)
        return {"old_key_id": old, "key_id": new, "public_key_pem": self.sealer.key.public_pem()}

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT; systemd's stop is a clean stop."""
        def _signal(signum: int, _frame: object) -> None:
            log.info("signal=%s stopping", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    @property
    def key(self) -> AgentKey:
        """The signing key in force (its sealer's: swapped by a rotation)."""
        return self.sealer.key

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def pid(self) -> int:
        return os.getpid()


def operations_jobs(config: AgentConfig, catalog: Catalog, retention: Retention, scrubber: Scrubber,
                    health: HealthMonitor, stopping: threading.Event, liveness: Liveness, *,
                    checkpoint: Callable[[], object]) -> list[Job]:
    """The operations schedule: the health snapshot every `health.interval_s` (and at once), a check for a
    change a watcher cares about every `health.change_check_s`, retention every `retention.check_s`, the
    scrub in bounded slices, the daily summary event at `health.summary_hour`, a checkpoint of both chains
    every `evidence.checkpoint_s` (and at start), and under systemd the watchdog ping (only while every
    component is live)."""
    def summary() -> None:
        catalog.emit_event(daily_summary(catalog, config.agent.id))

    jobs = [
        Job("health", health.tick, "interval", first_after_s=0, schedule={"seconds": config.health.interval_s}),
        Job("health_change", health.check_change, "interval", schedule={"seconds": config.health.change_check_s}),
        Job("retention", lambda: retention.run(stop=stopping), "interval", first_after_s=5,
            schedule={"seconds": config.retention.check_s}),
        Job("scrub", lambda: scrubber.run_once(SCRUB_BUDGET_S), "interval", first_after_s=30,
            schedule={"seconds": SCRUB_EVERY_S}),
        Job("summary", summary, "cron", schedule={"hour": config.health.summary_hour, "minute": 0}),
        Job("checkpoint", checkpoint, "interval", first_after_s=0, schedule={"seconds": config.evidence.checkpoint_s}),
    ]
    watchdog_s = sdnotify.watchdog_interval_s()
    if watchdog_s:
        jobs.append(Job("watchdog", watchdog_ping(catalog, liveness), "interval", schedule={"seconds": watchdog_s}))
    return jobs


def watchdog_ping(catalog: Catalog, liveness: Liveness) -> Callable[[], None]:
    """The systemd watchdog job: the ping proves the scheduler runs, the catalog answers (no thread holds
    its lock forever) and every component is live (ops/liveness.py); otherwise it is withheld."""
    reads = HealthReads(catalog)

    def ping() -> None:
        reads.ping()
        sdnotify.ping_watchdog(liveness.not_live())
    return ping


def build_dock_drivers(config: AgentConfig, models: list[RecorderModel]) -> list[DockDriver]:
    drivers: list[DockDriver] = []
    for dock in config.docks:
        if dock.kind == "directory":
            from drivers.dock_directory import DirectoryDock

            drivers.append(DirectoryDock(dock.name, dock.root, dock.slots))
        elif dock.kind == "usb":
            from drivers.usb_dock import UsbDock

            drivers.append(UsbDock(dock.name, dock.mount_root, models, unknown_devices=dock.unknown_devices,
                                   zone=config.agent.zone))
    return drivers


def build_agent(config: AgentConfig, *, dock_drivers: list[DockDriver] | None = None) -> Agent:
    """The daemon with every part the config asks for, in start order (stopped in reverse)."""
    agent = Agent(config, dock_drivers=dock_drivers)
    try:
        agent.add_uplink()
        if config.cameras:
            agent.add_cameras()
        if config.gb28181.enabled:
            agent.add_gb28181()
        agent.add_operations()
        if config.ui.enabled:
            agent.add_status_page()
    except BaseException:   # a part the config asks for cannot be built: give the data dir back at once
        agent.catalog.close()
        agent.owner.release()
        raise
    return agent
