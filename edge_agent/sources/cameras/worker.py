"""One camera's worker: who the camera is (ONVIF), its recorder thread, its gaps and its image health.

The worker is the `RecorderListener` of the camera's `RtspRecorder`: it turns the recorder's reports
into gap ledger rows and alarms, hands finished segments to the intake and samples keyframes for the
image checks. Workers share nothing but the catalog, the ledger and the intake queue.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import av

from drivers import onvif
from drivers.image_checks import CHECKS, ImageHealth, KeyframeSampler
from drivers.media_signing import INVALID, VALID
from drivers.rtsp import AuthFailed, RtspRecorder, Segment, StreamError, with_credentials
from edge_agent.catalog import Catalog
from edge_agent.catalog.gaps import Gap
from edge_agent.config import AgentConfig, Camera
from edge_agent.protocol.heartbeat import Heartbeat, Vital
from edge_agent.sources.cameras.gaps import GapLedger
from edge_agent.sources.cameras.intake import Queued, SegmentIntake, signing_anchors, spool_dir
from edge_agent.sources.cameras.onvif_watch import OnvifWatcher

log = logging.getLogger(__name__)

AUDIO_SILENT_MS = 3000   # video flowing but no audio packet for this long: the camera's audio is gone


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
    audio_seen: bool = False      # this camera has sent audio since the agent started
    audio_lost: bool = False      # ... and has stopped: the alarm camera.<name>.audio_lost is raised
    signing: dict[str, Any] | None = None   # the last segment's signing verdict (drivers/media_signing.py)
    signed_seen: bool = False     # a segment of this camera verified `valid` since the agent started
    signature_alarm: bool = False  # camera.<name>.signature_invalid is raised


class CameraWorker:
    """One camera: ONVIF identity, its recorder thread, its gaps and its image health."""

    def __init__(self, camera: Camera, config: AgentConfig, catalog: Catalog, ledger: GapLedger,
                 intake: SegmentIntake):
        self.camera = camera
        self.catalog = catalog
        self.ledger = ledger
        self.intake = intake
        self.health = CameraHealth(device_id=camera.name)
        self.sampler = KeyframeSampler(camera.image_check_s)
        self.password = onvif.read_password(camera.password_file)
        self.recorder = RtspRecorder(
            camera.name, self.resolve, spool_dir(config.agent.data_dir, camera.name), self,
            segment_s=camera.segment_s, stall_timeout_s=camera.stall_timeout_s,
            reconnect_max_s=camera.reconnect_max_s, min_free_bytes=config.agent.min_free_mb * 1024**2,
            signing_anchors=signing_anchors(camera, config), pace_s=camera.read_pace_ms / 1000)
        self.heartbeat = Heartbeat(f"camera-{camera.name}")
        self._looked_ms = float("-inf")   # stream time of the last heartbeat and audio check (`packet`)
        self._stopped = False
        self._thread = self._recorder_thread()
        # ONVIF cameras: clock read every clock_check_s and tamper events as alarms (onvif_watch.py)
        self.onvif_watch = OnvifWatcher(camera, self.health, catalog, self.password) if camera.onvif else None

    def _recorder_thread(self) -> threading.Thread:
        return threading.Thread(target=self.recorder.run, name=f"camera-{self.camera.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if self.onvif_watch is not None:
            self.onvif_watch.start()

    def stop(self) -> None:
        self._stopped = True
        self.recorder.stop()
        if self.onvif_watch is not None:
            self.onvif_watch.stop()

    def vital(self) -> Vital:
        """The recorder thread as a supervised component: beats per packet, idle while the camera is down
        (its own alarm says so); restarted with a new thread if a listener fault ended it."""
        def alive() -> bool:
            return self._stopped or self._thread.ident is None or self._thread.is_alive()   # None: not started

        def restart() -> None:
            if not self._stopped and not self._thread.is_alive():
                log.error("camera recorder thread had died camera=%s; starting it again", self.camera.name)
                self._thread = self._recorder_thread()
                self._thread.start()
        return Vital(self.heartbeat.name, self.heartbeat, alive, restart)

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
        assert self.onvif_watch is not None
        self.onvif_watch.clock_read(identity.clock_offset_ms)   # read again at every (re)connect
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
        self.heartbeat.beat()
        log.info("camera_connected camera=%s url=%s device=%s", camera, url, self.health.device_id)

    def interrupted(self, camera: str, cause: str, since_ms: int, detail: str) -> None:
        self.heartbeat.idle()   # reconnecting with backoff for as long as the camera is down
        gap = self.health.open_gap
        if gap is None:
            self.health.open_gap = self.ledger.open(camera, since_ms, cause, detail)
            self.catalog.raise_alarm(f"camera.{camera}.offline", "camera_offline", camera,
                                     f"camera {camera} is not recording: {cause}: {detail}")
        elif gap.detail != detail:
            self.health.open_gap = self.ledger.note(gap, detail)

    def resumed(self, camera: str, at_ms: int) -> None:
        gap = self.health.open_gap
        if gap is not None:
            self.ledger.close(gap, at_ms)
            self.health.open_gap = None
            self.catalog.clear_alarm(f"camera.{camera}.offline")
        log.info("camera_recording camera=%s since_ms=%d", camera, at_ms)

    def clock_stepped(self, camera: str, at_ms: int, step_ms: int) -> None:
        gap = self.ledger.open(camera, at_ms, "clock_step", f"wall clock stepped by {step_ms:+d} ms")
        self.ledger.close(gap, at_ms + max(step_ms, 0))

    def segment_done(self, segment: Segment) -> None:
        self.health.segments_today += 1
        if segment.signing is not None:
            self._check_signing(segment)
        self.intake.put(Queued(segment, self.health.device_id, self.health.clock_offset_ms))

    def _check_signing(self, segment: Segment) -> None:
        """A segment `invalid`, or a signing camera's segment `unsigned`/`unverifiable`, raises
        camera.<name>.signature_invalid; a `valid` segment clears it."""
        verdict = dict(segment.signing or {})
        health = self.health
        health.signing = {**verdict, "segment_start_ms": segment.start_ms}
        status = verdict.get("status")
        name = self.camera.name
        if status == VALID:
            health.signed_seen = True
            if health.signature_alarm:
                health.signature_alarm = False
                self.catalog.clear_alarm(f"camera.{name}.signature_invalid")
                log.info("camera_signature_valid_again camera=%s", name)
            return
        # Signing stopped (switched off, or SEIs stripped): after a valid segment, or from the start for a camera
        # with its own signing_ca (configured as a signing camera). A stream's end is not a stop.
        expected = health.signed_seen or self.camera.signing_ca is not None
        stopped = expected and status != INVALID and not verdict.get("gops_unchecked")
        if (status == INVALID or stopped) and not health.signature_alarm:
            health.signature_alarm = True
            why = verdict.get("reason") or f"the segment is {status}"
            self.catalog.raise_alarm(f"camera.{name}.signature_invalid", "camera_signature_invalid", name,
                                     f"camera {name} at {self.camera.location}: its video no longer verifies "
                                     f"against its signature ({status}: {why}); segment {segment.path.name} is "
                                     "kept and sealed as received")
            log.warning("camera_signature_invalid camera=%s status=%s reason=%s", name, status, why)

    def audio_present(self) -> bool:
        """The stream has an audio track and an audio packet came within `AUDIO_SILENT_MS`."""
        stats = self.recorder.stats
        if not stats.connected or stats.audio_codec is None or stats.last_audio_ms is None:
            return False
        return (stats.last_packet_ms or 0) - stats.last_audio_ms <= AUDIO_SILENT_MS

    def _check_audio(self, camera: str) -> None:
        """Called as video packets come (once a second): video flows, so audio that stops is the camera's audio gone."""
        health = self.health
        present = self.audio_present()
        if present and not health.audio_seen:
            health.audio_seen = True
        if present and health.audio_lost:
            health.audio_lost = False
            self.catalog.clear_alarm(f"camera.{camera}.audio_lost")
            log.info("camera_audio_back camera=%s", camera)
        elif not present and health.audio_seen and not health.audio_lost:
            stats = self.recorder.stats
            if (stats.audio_codec is not None and stats.last_audio_ms is None
                    and (stats.last_packet_ms or 0) - (stats.connected_ms or 0) <= AUDIO_SILENT_MS):
                return   # just connected: its first audio packet is not here yet
            health.audio_lost = True
            reason = "no audio track in the stream" if stats.audio_codec is None else \
                f"no audio packet for {AUDIO_SILENT_MS // 1000} s"
            self.catalog.raise_alarm(f"camera.{camera}.audio_lost", "camera_audio_lost", camera,
                                     f"camera {camera} at {self.camera.location}: audio lost ({reason}); "
                                     "video is still recorded")
            log.warning("camera_audio_lost camera=%s reason=%s", camera, reason)

    def packet(self, camera: str, packet: av.Packet, stream: av.video.stream.VideoStream, key: bool) -> None:
        # The heartbeat and the audio check once a second of the stream, not at every packet (25-30 a second
        # per camera, docs/BENCHMARKS.md "Cameras"): both are judged in seconds (liveness.stall_s, AUDIO_SILENT_MS).
        now = self.recorder.stats.last_packet_ms or 0
        if not self._looked_ms <= now < self._looked_ms + 1000:
            self._looked_ms = now
            self.heartbeat.beat()
            self._check_audio(camera)
        result = self.sampler.offer(packet, stream, key)
        if result is None:
            return
        previous = self.health.image
        self.health.image = result
        self.health.image_samples += 1
        for check, flagged in result.flags().items():
            if previous is not None and getattr(previous, check) == flagged:
                continue
            alarm = f"camera.{camera}.{check}"
            if flagged:
                self.catalog.raise_alarm(alarm, f"camera_{check}", camera,
                                         f"camera {camera} at {self.camera.location}: picture is {check}")
            else:
                self.catalog.clear_alarm(alarm)

    # -- health ------------------------------------------------------------------------------------

    def status(self, midnight_ms: int) -> dict[str, Any]:
        """This camera's entry in the health snapshot's `cameras` list (DESIGN.md section 6)."""
        stats = self.recorder.stats
        fps, kbps = stats.rates()
        image = self.health.image
        health = self.health
        if health.day_ms != midnight_ms:
            health.day_ms = midnight_ms
            health.segments_today = self.ledger.table.segments_since(self.camera.name, midnight_ms)
        return {
            "name": self.camera.name, "device_id": health.device_id, "location": self.camera.location,
            "connected": stats.connected, "fps": round(fps, 1), "bitrate_kbps": round(kbps, 1),
            "last_packet_ms": stats.last_packet_ms, "codec": stats.codec, "width": stats.width,
            "height": stats.height, "segments_today": health.segments_today,
            # indexed by camera: cheap
            "gaps_today": len(self.ledger.table.overlapping(self.camera.name, midnight_ms)),
            "recording": stats.connected and health.open_gap is None,
            "open_gap": health.open_gap.as_dict() if health.open_gap else None,
            "clock_offset_ms": health.clock_offset_ms, "last_error": stats.last_error,
            "model": (health.identity or {}).get("model"), "profile": (health.identity or {}).get("profile_token"),
            "image_checks": image.as_dict() if image else {name: None for name in CHECKS},
            "tracks": stats.tracks if stats.connected else [],
            "signing": health.signing,
            "audio": {"present": self.audio_present(), "codec": stats.audio_codec if stats.connected else None,
                      "lost": health.audio_lost, "last_packet_ms": stats.last_audio_ms},
            "onvif": self.onvif_watch.status() if self.onvif_watch is not None else None,
        }
