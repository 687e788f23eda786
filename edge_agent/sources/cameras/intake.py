"""Segment intake: a finished segment becomes a sealed `camera` file on the camera lane.

One thread takes segments in order: it discovers each as a `camera` file, with the keys its manifest
adds stored on the row (`extras`: the camera, its location and the gaps that ended where the segment
begins), copies, hashes and seals it, then deletes the spool file. After a crash the segments left in
the spool, including the one cut mid-write, are taken in first; a failure leaves the segment in the
spool and it is tried again at the next rescan.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from cryptography import x509

from drivers.media_signing import check_file, load_anchors
from drivers.rtsp import SEGMENT_SUFFIX, Segment, segment_span, segment_timing
from edge_agent.catalog import LANE_CAMERA, Catalog, State
from edge_agent.config import AgentConfig, Camera
from edge_agent.durable import fsync_dir
from edge_agent.ingest import IngestError, Ingestor, Sealer
from edge_agent.sources.cameras.gaps import GapLedger

log = logging.getLogger(__name__)

RESCAN_S = 10.0     # how often the intake looks for spool segments it could not take in before


def spool_dir(data_dir: Path, camera: str) -> Path:
    return data_dir / "spool" / camera


def signing_anchors(camera: Camera, config: AgentConfig) -> list[x509.Certificate] | None:
    """The trust anchors for this camera's signed video: its own `signing_ca`, else the global one."""
    path = camera.signing_ca or config.evidence.camera_signing_ca
    return None if path is None else load_anchors(path.read_bytes())


@dataclass
class Queued:
    """A finished segment waiting for intake, with who recorded it and that camera's clock offset."""

    segment: Segment
    device_id: str
    clock_offset_ms: int | None


class SegmentIntake:
    """One thread that seals finished segments in order; a failure leaves the segment in the spool."""

    def __init__(self, catalog: Catalog, ingestor: Ingestor, sealer: Sealer, config: AgentConfig,
                 cameras: dict[str, Camera], active: Callable[[], list[Path]], ledger: GapLedger):
        self.catalog = catalog
        self.ingestor = ingestor
        self.sealer = sealer
        self.config = config
        self.cameras = cameras
        self.active = active            # paths being written right now
        self.ledger = ledger
        self.queue: queue.Queue[Queued | None] = queue.Queue()
        self._queued: set[Path] = set()
        self._lock = threading.Lock()
        self.sealed = 0
        self._thread = threading.Thread(target=self._run, name="camera-intake", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Queued) -> None:
        with self._lock:
            if item.segment.path in self._queued:
                return
            self._queued.add(item.segment.path)
        self.queue.put(item)

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join()

    def leftovers(self, camera: str) -> list[Queued]:
        """Segments in a camera's spool not being written now: from a crash, or not yet taken in."""
        spool = spool_dir(self.config.agent.data_dir, camera)
        if not spool.is_dir():
            return []
        busy = set(self.active())
        found = []
        for path in sorted(spool.glob(f"*{SEGMENT_SUFFIX}")):
            if path in busy or not path.stem.isdigit():
                continue
            start = int(path.stem)
            span = segment_span(path)
            if span is None:
                log.warning("segment_empty camera=%s path=%s action=kept_for_inspection", camera, path)
                continue
            found.append(Queued(Segment(camera, path, start, start + span[1], 0, path.stat().st_size,
                                        self._signing(camera, path), segment_timing(path)),
                                self._device_id(camera), None))
        return found

    def _signing(self, camera: str, path: Path) -> dict[str, Any] | None:
        """A leftover segment's signing verdict, from the file alone (its last GOP's SEI, in the next
        segment, is not there: that GOP counts as unchecked)."""
        cam = self.cameras.get(camera)
        anchors = signing_anchors(cam, self.config) if cam is not None else None
        try:
            return check_file(str(path), anchors)
        except (av.FFmpegError, OSError, ValueError) as exc:
            log.warning("segment_signing_not_checked camera=%s path=%s error=%s", camera, path, exc)
            return None

    def _device_id(self, camera: str) -> str:
        device_id = self.ledger.table.device_of(camera)
        return camera if device_id is None else device_id

    def _rescan(self) -> None:
        for camera in self.cameras:
            for left in self.leftovers(camera):
                self.put(left)

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=RESCAN_S)
            except queue.Empty:
                self._rescan()
                continue
            if item is None:
                return
            try:
                self.take_in(item)
            except (IngestError, OSError, av.FFmpegError) as exc:
                log.error("segment_not_taken_in camera=%s path=%s error=%s action=retried_in_%ss",
                          item.segment.camera, item.segment.path, exc, RESCAN_S)
            except Exception:   # one bad segment must not stop every camera's intake: log it, go on
                log.exception("segment_intake_fault camera=%s path=%s action=left_in_spool",
                              item.segment.camera, item.segment.path)
            finally:
                with self._lock:
                    self._queued.discard(item.segment.path)

    def take_in(self, item: Queued) -> None:
        """discover -> staged -> sealed, then delete the spool file. Safe to repeat after a crash."""
        seg = item.segment
        try:
            st = seg.path.stat()
        except FileNotFoundError:
            return   # taken in before a crash, deleted from the spool after
        record, _ = self.catalog.discover(
            kind="camera", device_id=item.device_id, original_path=f"{seg.camera}/{seg.path.name}",
            source_path=str(seg.path), source_size=st.st_size, source_mtime_ns=st.st_mtime_ns,
            recorded_start_ms=seg.start_ms, recorded_end_ms=seg.end_ms, clock_offset_ms=item.clock_offset_ms,
            lane=LANE_CAMERA, actor="edge-agent", extras=self.extras(seg.camera, seg.start_ms, seg.signing, seg.timing))
        if record.state == State.DISCOVERED:
            record = self.ingestor.stage(record, seg.path)
        if record.state == State.STAGED:
            self.sealer.seal(record)
            self.sealed += 1
        os.unlink(seg.path)
        fsync_dir(seg.path.parent)

    def extras(self, camera: str, start_ms: int, signing: dict[str, Any] | None = None,
               timing: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a segment's manifest adds: its camera, the gaps that ended where it begins, whether the
        camera's signature verifies (`signed`: valid | invalid | unsigned | unverifiable; `signing`: details),
        and `timing` when its first picture's time is an estimate (drivers/rtsp.py `first_picture_timing`)."""
        keys: dict[str, Any] = {"gaps_before": [g.as_dict() for g in self.ledger.ended_at(camera, start_ms)]}
        if timing is not None:
            keys["timing"] = timing
        if signing is not None:
            keys["signed"] = signing["status"]
            keys["signing"] = signing
        cam = self.cameras.get(camera)
        if cam is not None:
            keys["camera"] = {"name": cam.name, "location": cam.location, "location_kind": cam.location_kind}
        return keys
