"""`edge-agent run`: one daemon per workstation or gateway (DESIGN.md section 1).

`Agent` builds every part from the config and owns their threads. Parts talk
through the catalog and small queues, never through each other's internals.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from drivers.base import DockDriver
from edge_agent import __version__
from edge_agent.catalog import Catalog
from edge_agent.config import AgentConfig
from edge_agent.evidence.manifest import AgentKey
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.layout import StoreLayout
from edge_agent.sources.docks import DockService
from edge_agent.sources.recorders import load_models

log = logging.getLogger(__name__)


class Component(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def check_data_permissions(data_dir: Path) -> None:
    """Refuse to run with evidence or keys readable by everyone (R8)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    mode = data_dir.stat().st_mode & 0o777
    if mode & 0o007:
        raise PermissionError(f"{data_dir} is open to all users (mode {mode:o}); run: chmod o-rwx {data_dir}")


class Agent:
    """Everything `edge-agent run` starts, built from one config."""

    def __init__(self, config: AgentConfig, *, dock_drivers: list[DockDriver] | None = None):
        self.config = config
        self.started_monotonic = time.monotonic()
        self.version = __version__
        self.layout = StoreLayout(config.agent.data_dir)
        check_data_permissions(config.agent.data_dir)
        self.layout.create()
        self.catalog = Catalog(config.catalog_path)
        self.key = AgentKey.load_or_create(self.layout.keys)
        self.sealer = Sealer(self.catalog, self.key, self.layout, config)
        self.ingestor = Ingestor(self.catalog, self.layout, self.sealer, config)
        self.models = load_models(config.agent.recorders_file)
        self.docks = DockService(self.catalog, self.ingestor, self.sealer, config, self.models)
        self.dock_drivers = dock_drivers if dock_drivers is not None else build_dock_drivers(config, self.models)
        self.components: list[Component] = []
        self._stop = threading.Event()
        self._on_stop: list[Callable[[], None]] = []

    def start(self) -> None:
        recovered = self.ingestor.recover()
        self.catalog.audit("agent.started", actor="edge-agent",
                           detail={"version": self.version, "key_id": self.key.key_id, **recovered})
        for component in self.components:
            component.start()
        for driver in self.dock_drivers:
            driver.start(self.docks)
        log.info("started agent=%s version=%s docks=%d", self.config.agent.id, self.version, len(self.dock_drivers))

    def stop(self) -> None:
        for driver in self.dock_drivers:
            driver.stop()
        self.docks.stop()
        for component in reversed(self.components):
            component.stop()
        try:
            self.catalog.audit("agent.stopped", actor="edge-agent")
        except sqlite3.OperationalError as exc:  # a full disk: stop cleanly all the same, unrecorded
            log.error("agent.stopped not written to the audit log: %s", exc)
        self.catalog.close()

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
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    @property
    def pid(self) -> int:
        return os.getpid()


def build_dock_drivers(config: AgentConfig, models: list) -> list[DockDriver]:
    drivers: list[DockDriver] = []
    for dock in config.docks:
        if dock.kind == "directory":
            from drivers.dock_directory import DirectoryDock

            drivers.append(DirectoryDock(dock.name, dock.root, dock.slots))
        elif dock.kind == "usb":
            from drivers.usb_dock import UsbDock

            drivers.append(UsbDock(dock.name, dock.mount_root, models))
    return drivers


def build_agent(config: AgentConfig, *, dock_drivers: list[DockDriver] | None = None) -> Agent:
    """The daemon with every part the config asks for. Each block adds one stage's components;
    `Agent.start` starts them in this order and `Agent.stop` stops them in reverse."""
    agent = Agent(config, dock_drivers=dock_drivers)
    # -- sync: uplink to the platform (edge_agent/sync) --
    from edge_agent.sync import Uplink

    agent.uplink = Uplink(agent.catalog, agent.layout, config, version=agent.version)
    agent.components.append(agent.uplink)

    # -- cameras: ONVIF + RTSP recording (edge_agent/sources/cameras.py) --
    if config.cameras:
        from edge_agent.sources.cameras import CameraService

        agent.cameras = CameraService(agent.catalog, agent.ingestor, agent.sealer, config)
        agent.components.append(agent.cameras)

    # -- operations: health, alarms, retention, scheduler (edge_agent/ops/health.py, scheduler.py) --
    from edge_agent.ops.scheduler import OperationsScheduler

    agent.operations = OperationsScheduler(agent)
    agent.components.append(agent.operations)

    return agent
