"""Continuous RTSP recording into crash-safe Matroska segments (PyAV, remux only, no transcoding).

`RtspRecorder.run()` is one camera's loop: connect, remux packets into segments of about `segment_s`
cut on keyframes, and on a stall (no packet for `stall_timeout_s`), an error or the server going away,
report the interruption and reconnect with exponential backoff. Everything the camera service needs to
know arrives through a `RecorderListener`; the recorder knows nothing of the catalog.

Why Matroska: its muxer writes each cluster whole, and a file cut anywhere (kill -9, power loss) still
plays up to its last complete cluster; a plain MP4 without its index does not. Clusters start at
keyframes, and the file is fsynced at every keyframe, so a crash loses at most one keyframe interval.

Time: each packet's wall time is its stream timestamp plus an offset anchored to the wall clock: the
moment the connection opened (stream time 0 is the first packet after PLAY), lowered by any packet that
arrives earlier than that predicts (receive time minus pts; probing bursts arrive late and do not move it).
Receive times come from the monotonic clock, so a step of the wall clock does not bend a segment; a step
is reported once (`clock_step`) and the anchor re-taken. Segments of one connection are contiguous
(each ends where the next begins); across reconnects starts never go back before the last end.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import av

from edge_agent.durable import fsync_dir

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".mkv"
TS_JUMP_MS = 5000          # decode timestamps moving back, or ahead by more than this, are a jump
CLOCK_STEP_MS = 1000        # a wall-clock jump larger than this against the monotonic clock is a clock step
BACKOFF_MIN_S = 0.5


class StreamError(Exception):
    """The stream could not be opened or read; `cause` is the gap cause it becomes."""

    cause = "stream_lost"


class AuthFailed(StreamError):
    cause = "auth_failed"


class DiskFull(StreamError):
    cause = "disk_full"


@dataclass(frozen=True)
class Segment:
    camera: str
    path: Path
    start_ms: int
    end_ms: int
    packets: int
    size: int


@dataclass
class StreamStats:
    """Counters read by the health snapshot; written by the recorder thread only."""

    connected: bool = False
    packets: int = 0
    bytes: int = 0
    last_packet_ms: int | None = None
    last_error: str | None = None
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    _window: list[tuple[float, int, int]] = field(default_factory=list)

    def rates(self) -> tuple[float, float]:
        """(frames per second, kilobits per second) over the last few seconds."""
        now = time.monotonic()
        self._window.append((now, self.packets, self.bytes))
        while len(self._window) > 2 and now - self._window[1][0] >= 5:
            self._window.pop(0)
        t0, p0, b0 = self._window[0]
        elapsed = now - t0
        if elapsed <= 0 or not self.connected:
            return 0.0, 0.0
        return (self.packets - p0) / elapsed, (self.bytes - b0) * 8 / 1000 / elapsed


class RecorderListener(Protocol):
    def connected(self, camera: str, url: str) -> None: ...

    def resumed(self, camera: str, at_ms: int) -> None:
        """The first keyframe after an interruption (or after start) arrived at wall time `at_ms`."""

    def interrupted(self, camera: str, cause: str, since_ms: int, detail: str) -> None:
        """Recording is not happening since `since_ms` (end of the last written packet) for `cause`;
        repeated on every failed reconnect with the same `since_ms`."""

    def clock_stepped(self, camera: str, at_ms: int, step_ms: int) -> None: ...

    def segment_done(self, segment: Segment) -> None: ...

    def packet(self, camera: str, packet: av.Packet, stream: av.video.stream.VideoStream, key: bool) -> None:
        """Every packet before it is written, for cheap image sampling; must return quickly."""


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """The RTSP URL with user and password in its userinfo, as cameras expect them."""
    if not username:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    userinfo = quote(username, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s']+@", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the userinfo (user and password) of every URL in it masked."""
    return _USERINFO.sub(r"\1***@", text)


def segment_span(path: Path) -> tuple[int, int] | None:
    """(first, last) packet time in ms relative to the file's start, by demuxing (no decoding);
    None when the file holds no readable packet. Used for segments cut by a crash."""
    first = last = None
    try:
        with av.open(str(path)) as container:
            stream = next(iter(container.streams.video), None)
            if stream is None:
                return None
            for packet in container.demux(stream):
                if packet.pts is None or packet.time_base is None:
                    continue
                start = float(packet.pts * packet.time_base)
                end = start + float((packet.duration or 0) * packet.time_base)
                first = start if first is None else min(first, start)
                last = end if last is None else max(last, end)
    except (av.FFmpegError, OSError, ValueError) as exc:
        log.warning("segment_unreadable path=%s error=%s", path, exc)
    if first is None or last is None:
        return None
    return int(first * 1000), int(last * 1000)


class _Clock:
    """Wall time from the monotonic clock, checked against the system clock for steps."""

    def __init__(self) -> None:
        self.rebase()

    def rebase(self) -> None:
        self.wall0 = time.time()
        self.mono0 = time.monotonic()

    def now_ms(self) -> float:
        return (self.wall0 + time.monotonic() - self.mono0) * 1000

    def step_ms(self) -> int:
        return int(time.time() * 1000 - self.now_ms())


class RtspRecorder:
    """One camera's recording loop. `resolve()` returns the stream URL (ONVIF may be asked each time)."""

    def __init__(self, camera: str, resolve: Callable[[], str], spool: Path, listener: RecorderListener, *,
                 segment_s: float, stall_timeout_s: float, reconnect_max_s: float = 30.0,
                 min_free_bytes: int = 0):
        self.camera = camera
        self.resolve = resolve
        self.spool = spool
        self.listener = listener
        self.segment_ms = segment_s * 1000
        self.stall_timeout_s = stall_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.min_free_bytes = min_free_bytes
        self.stats = StreamStats()
        self.active_path: Path | None = None
        self._stop = threading.Event()
        self._clock = _Clock()
        self._last_end_ms: int | None = None   # end of the last packet written, wall ms
        self._interrupted = True               # no packet written yet since start or the last interruption

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Record until `stop()`; never raises for a camera's faults, only reports them."""
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            try:
                self._session()
                cause, detail = "stream_lost", "stream ended (camera or server closed it)"
            except StreamError as exc:
                cause, detail = exc.cause, str(exc)
            except (av.FFmpegError, OSError) as exc:
                cause, detail = _classify(exc)
            except Exception as exc:   # a bug must not end this camera's recording for good: log, reconnect
                log.exception("camera_recorder_fault camera=%s", self.camera)
                cause, detail = "stream_lost", f"internal error: {exc!r}"
            finally:
                self.stats.connected = False
                self.active_path = None
            if self._stop.is_set():
                break
            detail = redact(detail)   # FFmpeg's errors quote the URL, password included
            self.stats.last_error = detail
            if not self._interrupted:
                backoff = BACKOFF_MIN_S   # it was recording: a fresh fault, retry quickly
            self._interrupted = True
            since = self._last_end_ms if self._last_end_ms is not None else int(self._clock.now_ms())
            self.listener.interrupted(self.camera, cause, since, detail)
            log.warning("camera_interrupted camera=%s cause=%s detail=%s", self.camera, cause, detail)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.reconnect_max_s)

    # -- one connection ------------------------------------------------------------------------

    def _session(self) -> None:
        url = self.resolve()
        opened_ms = self._clock.now_ms()
        container = av.open(url, options={"rtsp_transport": "tcp", "timeout": str(int(self.stall_timeout_s * 1e6))},
                            timeout=(max(self.stall_timeout_s, 5.0), self.stall_timeout_s))
        try:
            stream = next(iter(container.streams.video), None)
            if stream is None:
                raise StreamError(f"{redact(url)} carries no video stream")
            self.stats.connected = True
            self.stats.codec = stream.codec_context.name
            self.stats.width, self.stats.height = stream.codec_context.width, stream.codec_context.height
            self.listener.connected(self.camera, redact(url))
            self._remux(container, stream, opened_ms)
        finally:
            container.close()

    def _remux(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
               opened_ms: float) -> None:
        # Wall ms minus stream ms. Stream time 0 is the first packet after PLAY, so the moment the
        # connection was opened bounds it from below; the least-delayed packet tightens it.
        offset_ms: float | None = opened_ms
        previous_ms: float | None = None
        out: _SegmentWriter | None = None
        tb_ms = float(stream.time_base or 0) * 1000   # once: Fraction arithmetic per packet is costly
        try:
            for packet in container.demux(stream):
                if self._stop.is_set():
                    break
                if packet.pts is None or packet.dts is None:
                    continue
                received = self._clock.now_ms()
                pts_ms = packet.pts * tb_ms
                dts_ms = packet.dts * tb_ms
                if previous_ms is not None and not 0 <= dts_ms - previous_ms < TS_JUMP_MS:
                    # The camera's timestamps jumped (RTCP resync, encoder restart): wall time goes on from
                    # the last packet instead of following the jump.
                    log.info("camera_timestamp_jump camera=%s jump_ms=%d", self.camera, dts_ms - previous_ms)
                    offset_ms = (self._last_end_ms or received) - pts_ms
                previous_ms = dts_ms
                if offset_ms is None or received - pts_ms < offset_ms:
                    offset_ms = received - pts_ms
                at = int(pts_ms + offset_ms)
                key = packet.is_keyframe
                if out is None and not key:
                    continue   # a segment must start with a keyframe to be playable on its own
                if key and (out is None or at - out.start_ms >= self.segment_ms):
                    if out is not None:
                        self._finish(out, at)
                        out = None
                    at, offset_ms = self._check_clock(at, offset_ms)
                    out = self._open_segment(stream, max(at, self._last_end_ms or at))
                    if self._interrupted:
                        self._interrupted = False
                        self.listener.resumed(self.camera, out.start_ms)
                self.listener.packet(self.camera, packet, stream, key)
                self._last_end_ms = at + int((packet.duration or 0) * tb_ms)
                self.stats.packets += 1
                self.stats.bytes += packet.size
                self.stats.last_packet_ms = int(received)
                out.write(packet, key)   # the muxer takes the packet's data: sample and count first
        finally:
            if out is not None:
                self._finish(out, self._last_end_ms or out.start_ms)

    def _check_clock(self, at: int, offset_ms: float) -> tuple[int, float]:
        step = self._clock.step_ms()
        if abs(step) <= CLOCK_STEP_MS:
            return at, offset_ms
        self._clock.rebase()
        self.listener.clock_stepped(self.camera, at, step)
        return at + step, offset_ms + step

    def _open_segment(self, stream: av.video.stream.VideoStream, start_ms: int) -> _SegmentWriter:
        self.spool.mkdir(parents=True, exist_ok=True)
        if self.min_free_bytes and shutil.disk_usage(self.spool).free < self.min_free_bytes:
            raise DiskFull(f"less than {self.min_free_bytes // 1024**2} MiB free under {self.spool} "
                           "(agent.min_free_mb); recording pauses until space returns: check retention and sync")
        path = self.spool / f"{start_ms}{SEGMENT_SUFFIX}"
        writer = _SegmentWriter(path, stream, start_ms)
        self.active_path = path
        return writer

    def _finish(self, out: _SegmentWriter, end_ms: int) -> None:
        segment = out.close(self.camera, max(end_ms, out.start_ms))
        if segment is not None:
            self.listener.segment_done(segment)
        self.active_path = None   # only now: the intake's spool scan must not take it in as a leftover


class _SegmentWriter:
    """One Matroska file being written; fsynced at each keyframe and on close."""

    def __init__(self, path: Path, stream: av.video.stream.VideoStream, start_ms: int):
        self.path = path
        self.start_ms = start_ms
        self.packets = 0
        self._base: int | None = None
        self._last_dts: int | None = None
        try:
            self.container = av.open(str(path), "w", format="matroska",
                                     container_options={"flush_packets": "1"})
            self.stream = self.container.add_stream_from_template(stream)
        except (av.FFmpegError, OSError) as exc:
            raise _disk_error(exc, path) from exc
        self._fd: int | None = None   # opened once the muxer has created the file (at its first packet)

    def write(self, packet: av.Packet, key: bool) -> None:
        if self._base is None:
            self._base = packet.dts
        if key and self._fd is not None:
            os.fsync(self._fd)   # the previous cluster is complete and written: make it durable
        dts = packet.dts - self._base
        if self._last_dts is not None and dts < self._last_dts:
            # The stream's clock jumped back (RTCP resync, encoder restart): continue the file's timeline.
            jump = self._last_dts + (packet.duration or 1) - dts
            self._base -= jump
            dts += jump
        packet.dts = dts
        packet.pts -= self._base
        self._last_dts = dts
        packet.stream = self.stream
        try:
            self.container.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            raise _disk_error(exc, self.path) from exc
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            fsync_dir(self.path.parent)
        self.packets += 1

    def close(self, camera: str, end_ms: int) -> Segment | None:
        """Finish the file; None when no packet was written (the muxer never created it)."""
        if self._fd is None:
            self.container.close()
            return None
        try:
            self.container.close()
            os.fsync(self._fd)
        except (av.FFmpegError, OSError) as exc:
            raise _disk_error(exc, self.path) from exc
        finally:
            os.close(self._fd)
        return Segment(camera, self.path, self.start_ms, end_ms, self.packets, self.path.stat().st_size)


def _disk_error(exc: Exception, path: Path) -> Exception:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full writing {path}; recording pauses until space returns")
    return exc


def _classify(exc: Exception) -> tuple[str, str]:
    text = str(exc)
    if isinstance(exc, av.HTTPUnauthorizedError | av.HTTPForbiddenError | PermissionError):
        return "auth_failed", f"camera refused the credentials ({text}); check username and password_file"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk_full", f"disk full ({text})"
    if isinstance(exc, av.ExitError | TimeoutError):
        return "stream_lost", f"stalled: no data ({text})"
    return "stream_lost", text
