"""Cameras: continuous recording of every configured camera, with a ledger of every gap (R2, R3, R10).

`CameraService` (a daemon component) runs one `CameraWorker` thread per camera and one `SegmentIntake`
thread that turns finished segments into catalog files. A worker asks ONVIF (when configured) who the
camera is and where its stream is, and runs the camera's `RtspRecorder`, which writes Matroska
segments under `data_dir/spool/<camera>/`. The intake discovers each segment as a `camera` file on the
camera lane, copies, hashes and seals it (the manifest names the camera, its location and the gaps
that ended where the segment begins) and deletes the spool file. After a crash the segments left in
the spool, including the one cut mid-write, are taken in first.

Every interruption is a row in `gaps` (camera, start_ms, end_ms, cause, detail), opened when recording
stops and closed when the first keyframe arrives again, and an event on the `events` topic at both
ends. Causes: stream_lost, auth_failed, disk_full, agent_stopped (detected at start from the end of
the camera's last segment), clock_step. `was_recording(catalog, camera, at_ms)` answers the
custodian's question "was this camera recording at 14:03?".

Workers share nothing but the catalog and the intake queue: one bad camera never holds up another.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import av

from drivers import onvif
from drivers.image_checks import CHECKS, ImageHealth, KeyframeSampler
from drivers.rtsp import (
    SEGMENT_SUFFIX,
    AuthFailed,
    RtspRecorder,
    Segment,
    StreamError,
    segment_span,
    with_credentials,
)
from edge_agent.catalog import LANE_CAMERA, Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig, Camera
from edge_agent.durable import fsync_dir
from edge_agent.ingest import IngestError, Ingestor, Sealer

log = logging.getLogger(__name__)

GAP_CAUSES = ("stream_lost", "auth_failed", "disk_full", "agent_stopped", "clock_step")
RESCAN_S = 10.0     # how often the intake looks for spool segments it could not take in before


def spool_dir(data_dir: Path, camera: str) -> Path:
    return data_dir / "spool" / camera


@dataclass(frozen=True)
class Gap:
    id: int
    camera: str
    start_ms: int
    end_ms: int | None
    cause: str
    detail: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "camera": self.camera, "start_ms": self.start_ms, "end_ms": self.end_ms,
                "cause": self.cause, "detail": self.detail}


def gaps(catalog: Catalog, camera: str, since_ms: int = 0, until_ms: int | None = None) -> list[Gap]:
    """The camera's gaps overlapping [since_ms, until_ms], oldest first; an open gap has end_ms None."""
    rows = catalog.query(
        "SELECT * FROM gaps WHERE camera = ? AND (end_ms IS NULL OR end_ms >= ?) AND start_ms <= ?"
        " ORDER BY start_ms, id", (camera, since_ms, until_ms if until_ms is not None else 2**62))
    return [Gap(r["id"], r["camera"], r["start_ms"], r["end_ms"], r["cause"], r["detail"]) for r in rows]


def _prefix_range(camera: str) -> tuple[str, str]:
    """Bounds of the original paths of one camera's segments (`<camera>/<name>`), as an index range:
    '0' is the character after '/'."""
    return f"{camera}/", f"{camera}0"


def was_recording(catalog: Catalog, camera: str, at_ms: int) -> tuple[bool, Gap | None, str | None]:
    """(True, None, file_id) when a segment covers `at_ms`; else (False, the gap if one covers it, None)."""
    rows = catalog.query(
        "SELECT file_id FROM files WHERE kind = 'camera' AND original_path >= ? AND original_path < ?"
        " AND recorded_start_ms <= ? AND recorded_end_ms > ? ORDER BY recorded_start_ms DESC LIMIT 1",
        (*_prefix_range(camera), at_ms, at_ms))
    if rows:
        return True, None, rows[0][0]
    for gap in gaps(catalog, camera, at_ms, at_ms):
        if gap.end_ms is None or gap.end_ms > at_ms:
            return False, gap, None
    return False, None, None


@dataclass
class _Queued:
    segment: Segment
    device_id: str
    clock_offset_ms: int | None


class SegmentIntake:
    """One thread that seals finished segments in order; a failure leaves the segment in the spool."""

    def __init__(self, catalog: Catalog, ingestor: Ingestor, sealer: Sealer, config: AgentConfig,
                 cameras: dict[str, Camera], active: Any):
        self.catalog = catalog
        self.ingestor = ingestor
        self.sealer = sealer
        self.config = config
        self.cameras = cameras
        self.active = active            # callable: paths being written right now
        self.queue: queue.Queue[_Queued | None] = queue.Queue()
        self._queued: set[Path] = set()
        self._lock = threading.Lock()
        self.sealed = 0
        self._thread = threading.Thread(target=self._run, name="camera-intake", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: _Queued) -> None:
        with self._lock:
            if item.segment.path in self._queued:
                return
            self._queued.add(item.segment.path)
        self.queue.put(item)

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join()

    def leftovers(self, camera: str) -> list[_Queued]:
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
            found.append(_Queued(Segment(camera, path, start, start + span[1], 0, path.stat().st_size),
                                 self._device_id(camera), None))
        return found

    def _device_id(self, camera: str) -> str:
        rows = self.catalog.query("SELECT device_id FROM devices WHERE kind = 'camera' AND name = ?"
                                  " ORDER BY last_seen_ms DESC LIMIT 1", (camera,))
        return rows[0][0] if rows else camera

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=RESCAN_S)
            except queue.Empty:
                for camera in self.cameras:
                    for left in self.leftovers(camera):
                        self.put(left)
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

    def take_in(self, item: _Queued) -> None:
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
            lane=LANE_CAMERA, actor="edge-agent")
        if record.state == State.DISCOVERED:
            record = self.ingestor.stage(record, seg.path)
        if record.state == State.STAGED:
            self.sealer.seal(record)   # manifest_keys adds the camera and its gaps
            self.sealed += 1
        os.unlink(seg.path)
        fsync_dir(seg.path.parent)

    def manifest_keys(self, record: FileRecord) -> dict[str, Any]:
        """A segment's manifest names its camera and the gaps that ended where it begins."""
        name = record.original_path.split("/", 1)[0]
        start = record.recorded_start_ms or 0
        keys: dict[str, Any] = {"gaps_before": [g.as_dict() for g in gaps(self.catalog, name, start, start)
                                                if g.end_ms == start]}
        camera = self.cameras.get(name)
        if camera is not None:
            keys["camera"] = {"name": camera.name, "location": camera.location, "location_kind": camera.location_kind}
        return keys


@dataclass
class CameraHealth:
    device_id: str
    clock_offset_ms: int | None = None
    identity: dict[str, Any] | None = None
    image: ImageHealth | None = None
    image_samples: int = 0
    open_gap: Gap | None = None
    # Counted in memory, read from the catalog once a day: the health check reads it every few seconds.
    day_ms: int | None = None
    segments_today: int = 0


class CameraWorker:
    """One camera: ONVIF identity, its recorder thread, its gaps and its image health."""

    def __init__(self, camera: Camera, service: CameraService):
        self.camera = camera
        self.service = service
        self.catalog = service.catalog
        self.health = CameraHealth(device_id=camera.name)
        self.sampler = KeyframeSampler(camera.image_check_s)
        self.password = onvif.read_password(camera.password_file)
        self.recorder = RtspRecorder(
            camera.name, self.resolve, spool_dir(service.config.agent.data_dir, camera.name), self,
            segment_s=camera.segment_s, stall_timeout_s=camera.stall_timeout_s,
            reconnect_max_s=camera.reconnect_max_s, min_free_bytes=service.config.agent.min_free_mb * 1024**2)
        self._thread = threading.Thread(target=self.recorder.run, name=f"camera-{camera.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.recorder.stop()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # -- where the stream is ---------------------------------------------------------------------

    def resolve(self) -> str:
        cam = self.camera
        if cam.onvif is None:
            assert cam.rtsp is not None
            self._seen(None)
            return with_credentials(cam.rtsp, cam.username, self.password)
        try:
            identity = onvif.probe(cam.onvif, cam.username, self.password, cam.profile,
                                   timeout=max(cam.stall_timeout_s, 5.0))
        except onvif.OnvifAuthFailed as exc:
            raise AuthFailed(str(exc)) from exc
        except onvif.OnvifError as exc:
            raise StreamError(str(exc)) from exc
        self.health.clock_offset_ms = identity.clock_offset_ms
        self._seen(identity)
        return with_credentials(identity.stream_uri, cam.username, self.password)

    def _seen(self, identity: onvif.CameraIdentity | None) -> None:
        cam = self.camera
        device_id = (identity.serial if identity and identity.serial else None) or cam.name
        self.health.device_id = device_id
        self.health.identity = identity.as_dict() if identity else None
        info = {"location": cam.location, "location_kind": cam.location_kind,
                "source": cam.onvif or (cam.rtsp or "").split("@")[-1]}
        with self.catalog.transaction() as conn:
            self.catalog.touch_device(conn, device_id, kind="camera", name=cam.name,
                                      model=identity.model if identity else None,
                                      serial=identity.serial if identity else None,
                                      info={**info, **(identity.as_dict() if identity else {})})

    # -- RecorderListener --------------------------------------------------------------------------

    def connected(self, camera: str, url: str) -> None:
        log.info("camera_connected camera=%s url=%s device=%s", camera, url, self.health.device_id)

    def interrupted(self, camera: str, cause: str, since_ms: int, detail: str) -> None:
        gap = self.health.open_gap
        if gap is None:
            self.health.open_gap = self.service.open_gap(camera, since_ms, cause, detail)
            self.catalog.raise_alarm(f"camera.{camera}.offline", "camera_offline", camera,
                                     f"camera {camera} is not recording: {cause}: {detail}")
        elif gap.detail != detail:
            self.health.open_gap = self.service.note_gap(gap, detail)

    def resumed(self, camera: str, at_ms: int) -> None:
        gap = self.health.open_gap
        if gap is not None:
            self.service.close_gap(gap, at_ms)
            self.health.open_gap = None
            self.catalog.clear_alarm(f"camera.{camera}.offline")
        log.info("camera_recording camera=%s since_ms=%d", camera, at_ms)

    def clock_stepped(self, camera: str, at_ms: int, step_ms: int) -> None:
        gap = self.service.open_gap(camera, at_ms, "clock_step", f"wall clock stepped by {step_ms:+d} ms")
        self.service.close_gap(gap, at_ms + max(step_ms, 0))

    def segment_done(self, segment: Segment) -> None:
        self.health.segments_today += 1
        self.service.intake.put(_Queued(segment, self.health.device_id, self.health.clock_offset_ms))

    def packet(self, camera: str, packet: av.Packet, stream: av.video.stream.VideoStream, key: bool) -> None:
        result = self.sampler.offer(packet, stream, key)
        if result is None:
            return
        previous = self.health.image
        self.health.image = result
        self.health.image_samples += 1
        for check, flagged in result.flags().items():
            if previous is not None and getattr(previous, check) == flagged:
                continue
            key = f"camera.{camera}.{check}"
            if flagged:
                self.catalog.raise_alarm(key, f"camera_{check}", camera,
                                         f"camera {camera} at {self.camera.location}: picture is {check}")
            else:
                self.catalog.clear_alarm(key)

    # -- health ------------------------------------------------------------------------------------

    def status(self, midnight_ms: int) -> dict[str, Any]:
        stats = self.recorder.stats
        fps, kbps = stats.rates()
        image = self.health.image
        health = self.health
        if health.day_ms != midnight_ms:
            health.day_ms = midnight_ms
            health.segments_today = self.catalog.query(
                "SELECT COUNT(*) FROM files WHERE kind = 'camera' AND original_path >= ? AND original_path < ?"
                " AND recorded_start_ms >= ?",
                (*_prefix_range(self.camera.name), midnight_ms))[0][0]
        return {
            "name": self.camera.name, "device_id": self.health.device_id, "location": self.camera.location,
            "connected": stats.connected, "fps": round(fps, 1), "bitrate_kbps": round(kbps, 1),
            "last_packet_ms": stats.last_packet_ms, "codec": stats.codec, "width": stats.width,
            "height": stats.height, "segments_today": health.segments_today,
            "gaps_today": len(gaps(self.catalog, self.camera.name, midnight_ms)),   # indexed by camera: cheap
            "recording": stats.connected and self.health.open_gap is None,
            "open_gap": self.health.open_gap.as_dict() if self.health.open_gap else None,
            "clock_offset_ms": self.health.clock_offset_ms, "last_error": stats.last_error,
            "model": (health.identity or {}).get("model"), "profile": (health.identity or {}).get("profile_token"),
            "image_checks": image.as_dict() if image else {name: None for name in CHECKS},
        }


class CameraService:
    """The daemon component that records every configured camera."""

    def __init__(self, catalog: Catalog, ingestor: Ingestor, sealer: Sealer, config: AgentConfig):
        self.catalog = catalog
        self.config = config
        self.tz = config.agent.zone
        self.workers = {cam.name: CameraWorker(cam, self) for cam in config.cameras}
        self.intake = SegmentIntake(catalog, ingestor, sealer, config, {c.name: c for c in config.cameras},
                                    self._active_paths)
        sealer.extra_keys["camera"] = self.intake.manifest_keys   # also for segments resealed after a crash
        self._gap_lock = threading.Lock()

    def _active_paths(self) -> list[Path]:
        return [w.recorder.active_path for w in self.workers.values() if w.recorder.active_path is not None]

    def start(self) -> None:
        for name, worker in self.workers.items():
            leftovers = self.intake.leftovers(name)
            for item in leftovers:
                self.intake.put(item)
            worker.health.open_gap = self._downtime(name, [i.segment.end_ms for i in leftovers])
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

    def _downtime(self, camera: str, leftover_ends: list[int]) -> Gap | None:
        """The gap this camera is in as the agent starts: one left open by the last run, or the agent's
        own downtime since the end of the camera's last segment (agent_stopped)."""
        open_rows = self.catalog.query("SELECT * FROM gaps WHERE camera = ? AND end_ms IS NULL"
                                       " ORDER BY start_ms DESC LIMIT 1", (camera,))
        if open_rows:
            r = open_rows[0]
            return Gap(r["id"], camera, r["start_ms"], None, r["cause"], r["detail"])
        ends = [r[0] for r in self.catalog.query(
            "SELECT MAX(recorded_end_ms) FROM files WHERE kind = 'camera' AND original_path >= ? AND original_path < ?",
            _prefix_range(camera)) if r[0] is not None] + leftover_ends
        if not ends:
            return None
        return self.open_gap(camera, max(ends), "agent_stopped", "the agent was not running")

    # -- the gap ledger ------------------------------------------------------------------------------

    def open_gap(self, camera: str, start_ms: int, cause: str, detail: str) -> Gap:
        with self._gap_lock, self.catalog.transaction() as conn:
            cur = conn.execute("INSERT INTO gaps (camera, start_ms, end_ms, cause, detail) VALUES (?,?,?,?,?)",
                               (camera, start_ms, None, cause, detail))
            gap = Gap(int(cur.lastrowid or 0), camera, start_ms, None, cause, detail)
            self.catalog.queue_event(conn, self._event(gap, "open"))
        log.warning("camera_gap_open camera=%s cause=%s start_ms=%d detail=%s", camera, cause, start_ms, detail)
        return gap

    def note_gap(self, gap: Gap, detail: str) -> Gap:
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE gaps SET detail = ? WHERE id = ?", (detail, gap.id))
        return Gap(gap.id, gap.camera, gap.start_ms, gap.end_ms, gap.cause, detail)

    def close_gap(self, gap: Gap, end_ms: int) -> Gap:
        closed = Gap(gap.id, gap.camera, gap.start_ms, max(end_ms, gap.start_ms), gap.cause, gap.detail)
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE gaps SET end_ms = ? WHERE id = ?", (closed.end_ms, gap.id))
            self.catalog.queue_event(conn, self._event(closed, "closed"))
        log.warning("camera_gap_closed camera=%s cause=%s start_ms=%d end_ms=%s seconds=%.1f", gap.camera,
                    gap.cause, gap.start_ms, closed.end_ms, ((closed.end_ms or 0) - gap.start_ms) / 1000)
        return closed

    def _event(self, gap: Gap, state: str) -> dict[str, Any]:
        return {"type": "gap", "state": state, "ts": now_ms(), "subject": gap.camera, "kind": gap.cause,
                "message": gap.detail or gap.cause, "camera": gap.camera, "gap_id": gap.id,
                "device_id": self.workers[gap.camera].health.device_id if gap.camera in self.workers else None,
                "start_ms": gap.start_ms, "end_ms": gap.end_ms}

    # -- health -------------------------------------------------------------------------------------

    def camera_status(self) -> list[dict[str, Any]]:
        """Per-camera health for the snapshot (DESIGN.md section 6)."""
        midnight = datetime.now(self.tz).replace(hour=0, minute=0, second=0, microsecond=0)
        midnight_ms = int(midnight.timestamp() * 1000)
        return [worker.status(midnight_ms) for worker in self.workers.values()]
