"""`DockService`: the dock drivers' listener, one `VolumeWorker` per docked volume, and the docks' health.

The driver's thread calls `docked`/`undocked`; each docked volume gets its own worker thread (slot numbers
come with the volume: the drivers hand them out, `drivers.base.free_slot`). Health and tests read the
slots through `slots()`/`health()`, which copy them under each slot's lock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from drivers.base import DockedVolume, RefusedDevice
from drivers.gat947 import RecorderHandshake
from edge_agent.catalog import Catalog, audit
from edge_agent.catalog.docking import DockingRecords
from edge_agent.config import AgentConfig, Dock
from edge_agent.evidence.receipts import PinnedKeys
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.protocol.heartbeat import Vital
from edge_agent.sources.docks import policy
from edge_agent.sources.docks.slots import SETTLED, SlotState, SlotStatus
from edge_agent.sources.docks.worker import DockContext, Progress, VolumeWorker
from edge_agent.sources.recorders import RecorderModel, VolumeIdentity


class DockService:
    """Listens to dock drivers (`drivers.base.DockListener`) and runs one worker per docked volume."""

    def __init__(self, catalog: Catalog, ingestor: Ingestor, sealer: Sealer, config: AgentConfig,
                 models: list[RecorderModel]):
        self.context = DockContext(
            catalog=catalog, records=DockingRecords(catalog), ingestor=ingestor, sealer=sealer, models=models,
            zone=config.agent.zone, agent_id=config.agent.id,
            permits=threading.BoundedSemaphore(config.agent.ingest_workers),
            receiver_keys=PinnedKeys(config.mqtt.receiver_keys))
        self.docks: dict[str, Dock] = {d.name: d for d in config.docks}
        self._workers: dict[tuple[str, str], VolumeWorker] = {}
        self._imports: set[VolumeWorker] = set()   # running in their callers' threads (import_volume)
        self._lock = threading.Lock()

    # -- DockListener -------------------------------------------------------------------------------

    def docked(self, volume: DockedVolume) -> None:
        with self._lock:
            key = (volume.dock, volume.label)
            old = self._workers.get(key)
            if old is not None and old.is_alive():
                return
            worker = VolumeWorker(self.context, volume, self.docks.get(volume.dock))
            self._workers[key] = worker
        worker.start()

    def undocked(self, volume: DockedVolume) -> None:
        with self._lock:   # under the lock: a re-dock (`redock`) cannot slip a new worker in after this
            worker = self._workers.get((volume.dock, volume.label))
            if worker is not None:
                worker.undock()

    def recorder_clock_read(self, dock: str, usb_serial: str | None, report: RecorderHandshake) -> None:
        """Audit the recorder's clock offset as read, before the driver corrects it (R9): one transaction,
        committed before this returns."""
        with self.context.catalog.transaction() as conn:
            audit.append(conn, "recorder.clock_read", subject=report.serial or usb_serial, actor="edge-agent",
                         detail={"dock": dock, "usb_serial": usb_serial, "serial": report.serial,
                                 "clock_offset_ms": report.clock_offset_ms, "clock_read_ms": report.clock_read_ms})

    def recorder_handshake(self, dock: str, usb_serial: str | None, report: RecorderHandshake) -> None:
        """Audit the handshake's outcome; raise or clear its alarms (failed steps, low battery)."""
        catalog = self.context.catalog
        with catalog.transaction() as conn:
            audit.append(conn, "recorder.handshake", subject=report.serial or usb_serial, actor="edge-agent",
                         detail={"dock": dock, "usb_serial": usb_serial, **report.as_dict()})
        if report.errors:
            policy.handshake_failed(dock, usb_serial, report).raise_on(catalog)
        else:
            catalog.clear_alarm(policy.handshake_key(dock, usb_serial))
        device_id = report.serial or usb_serial
        if device_id is not None and report.battery_percent is not None:
            if report.battery_low:
                policy.battery_low(device_id, report).raise_on(catalog)
            else:
                catalog.clear_alarm(policy.battery_key(device_id))

    def device_refused(self, dock: str, device: RefusedDevice) -> None:
        policy.refused_device(dock, device).raise_on(self.context.catalog)

    def redock(self, key: tuple[str, str]) -> None:
        """Start the slot's worker again, as if its volume were docked anew, if it ended while still docked
        (ops/liveness.py calls it for a dead worker). The new worker opens a new session; what the old one
        copied is in the catalog and is not copied twice."""
        with self._lock:
            old = self._workers.get(key)
            if old is None or not old.ended_early:
                return
            worker = VolumeWorker(self.context, old.volume, self.docks.get(old.volume.dock))
            self._workers[key] = worker
        worker.start()

    def vitals(self) -> list[Vital]:
        """Every docked slot's worker as a supervised component; a dead one is restarted by `redock`."""
        with self._lock:
            workers = [(key, w) for key, w in self._workers.items() if not w.undocking]
        return [Vital(w.name, w.heartbeat, lambda w=w: not w.ended_early, lambda key=key: self.redock(key))
                for key, w in workers]

    # -- lifecycle ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """End every slot's passes (the recorders stay docked) and wait for the workers."""
        with self._lock:
            workers = list(self._workers.values())
            imports = list(self._imports)
        for worker in workers + imports:
            worker.undock(stopping=True)
        for worker in workers:
            worker.join(timeout=30)

    def import_volume(self, volume: DockedVolume, identity: VolumeIdentity, *,
                      on_progress: Progress | None = None) -> SlotStatus:
        """One pass over a folder that is not on any dock, in the caller's thread; the session is sealed
        and closed as `imported`; `stop()` ends it early. Returns the slot's final status."""
        worker = VolumeWorker(self.context, volume, self.docks.get(volume.dock), identity=identity, once=True,
                              on_progress=on_progress)
        with self._lock:
            self._imports.add(worker)
        try:
            worker.run()
        finally:
            with self._lock:
                self._imports.discard(worker)
        return worker.status.snapshot()

    # -- what a custodian sees ----------------------------------------------------------------------

    def slots(self) -> list[SlotStatus]:
        """Every docked slot (an undocked one is gone from here), copied."""
        with self._lock:
            snapshots = [w.status.snapshot() for w in self._workers.values()]
        return [s for s in snapshots if s.state is not SlotState.UNDOCKED]

    def collecting(self) -> bool:
        """True while any docked bay is identifying or collecting its recorder (not yet safe to take)."""
        return any(s.state in (SlotState.IDENTIFYING, SlotState.INGESTING) for s in self.slots())

    def health(self) -> dict[str, Any]:
        """The health snapshot's dock section: `{"docks": [one entry per docked slot]}`."""
        return {"docks": [s.health() for s in self.slots()]}

    def wait_idle(self, timeout: float) -> bool:
        """True once every docked volume has been fully ingested (for tests and the demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [s.state for s in self.slots()]
            if states and all(s in SETTLED for s in states):
                return True
            time.sleep(0.05)
        return False
