"""The camera service: the daemon component that records every configured camera."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog
from edge_agent.config import AgentConfig
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.protocol.heartbeat import Vital
from edge_agent.sources.cameras.gaps import GapLedger
from edge_agent.sources.cameras.intake import SegmentIntake
from edge_agent.sources.cameras.worker import CameraWorker

log = logging.getLogger(__name__)


class CameraService:
    """One `CameraWorker` thread per configured camera and one `SegmentIntake` thread for all of them."""

    def __init__(self, catalog: Catalog, ingestor: Ingestor, sealer: Sealer, config: AgentConfig):
        self.catalog = catalog
        self.config = config
        self.tz = config.agent.zone
        self.ledger = GapLedger(catalog, self._device_of)
        self.intake = SegmentIntake(catalog, ingestor, sealer, config, {c.name: c for c in config.cameras},
                                    self._active_paths, self.ledger)
        self.workers = {cam.name: CameraWorker(cam, config, catalog, self.ledger, self.intake)
                        for cam in config.cameras}

    def _device_of(self, camera: str) -> str | None:
        worker = self.workers.get(camera)
        return worker.health.device_id if worker is not None else None

    def _active_paths(self) -> list[Path]:
        return [path for w in self.workers.values() for path in w.recorder.active_paths]

    def start(self) -> None:
        for name, worker in self.workers.items():
            leftovers = self.intake.leftovers(name)
            for item in leftovers:
                self.intake.put(item)
            worker.health.open_gap = self.ledger.downtime(name, [i.segment.end_ms for i in leftovers])
        self.intake.start()
        for worker in self.workers.values():
            worker.start()
        log.info("cameras_started count=%d", len(self.workers))

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for worker in self.workers.values():
            worker.join(worker.camera.stall_timeout_s + 10)
        self.intake.stop()

    def vitals(self) -> list[Vital]:
        """Every camera's recorder thread, for ops/liveness.py."""
        return [worker.vital() for worker in self.workers.values()]

    # -- health -------------------------------------------------------------------------------------

    def camera_status(self) -> list[dict[str, Any]]:
        """Per-camera health for the snapshot (DESIGN.md section 6)."""
        midnight = datetime.now(self.tz).replace(hour=0, minute=0, second=0, microsecond=0)
        midnight_ms = int(midnight.timestamp() * 1000)
        return [worker.status(midnight_ms) for worker in self.workers.values()]

    def thumbnail(self, name: str) -> bytes | None:
        """The last keyframe the image checks of camera `name` decoded, as a small JPEG; None before the first."""
        worker = self.workers.get(name)
        return worker.sampler.preview if worker is not None else None

    def online(self) -> dict[str, bool]:
        """Each camera's name -> whether its stream is connected now (GB/T 28181 Catalog's Status)."""
        return {status["name"]: bool(status["connected"]) for status in self.camera_status()}

    def health(self) -> dict[str, Any]:
        """HealthProvider: this component's part of the health snapshot, `{"cameras": [one per camera]}`."""
        return {"cameras": self.camera_status()}
