"""Continuous RTSP recording into crash-safe Matroska segments (PyAV, remux only, no transcoding).

`RtspRecorder.run()` is one camera's loop: connect, remux packets into segments of about `segment_s`
cut on keyframes, and on a stall (no video packet for `stall_timeout_s`: drivers/stall_watch.py), an error
or the server going away, report the interruption and reconnect with exponential backoff. Everything the
camera service needs to know arrives through a `RecorderListener`; the recorder knows nothing of the catalog.

Why Matroska: its muxer writes each cluster whole, and a file cut anywhere (kill -9, power loss) still
plays up to its last complete cluster; a plain MP4 without its index does not. Clusters start at
keyframes, and the file is fsynced at every keyframe, so a crash loses at most one keyframe interval.

Every track: video, audio and any other stream the camera sends go into the same segment, remuxed
as sent, except G.711 (`pcm_mulaw`, `pcm_alaw`), which FFmpeg's Matroska muxer refuses: it is stored
as 16-bit PCM (`pcm_s16le`), decoded by the G.711 tables, so every player plays it. The decoding is
made reversible: standard µ-law decodes both of its zeros (codes 0xFF and 0x7F) to 0, so here 0x7F,
the negative zero, decodes to -1 (one 16-bit step, inaudible); then each of the 256 codes has its own
sample and the inverse of this table gives back the camera's bytes exactly (`s16le_to_g711`). A
standard encoder gives them back too, except that FFmpeg's never writes 0x7F (it encodes -1 as 0x7E).
The track carries the tag `ORIGINAL_CODEC` so a reader knows what the camera sent. A data stream (ONVIF
metadata: FFmpeg gives its RTP payloads, with no codec) goes into a text track tagged `ORIGINAL_KIND=data`,
payloads unchanged, since the Matroska muxer holds no data track. Subtitle streams are left out, logged
once per connection, and named in `StreamStats.dropped`.

Cuts: segments are cut on video keyframes. An audio packet belongs to the segment its start time
falls in: audio is held until the video has passed its time (a camera may send it early), and the
segment before a cut stays open for audio up to `LATE_AUDIO_MS` behind the cut (or sent late), so
consecutive segments' audio tiles the stream with no gap and no overlap.

A connection's first picture, which FFmpeg's RTSP demuxer gives untimed, is kept (joined to the rest of
its picture, or timed by an estimate the segment names: `RtspRecorder._timed`), and each sliced keyframe
is written as one packet.

Batches: a packet is stamped with its receive time (and counted for the stall watch) as it comes, and handled
with the others received since, once a keyframe can be handed on or every `BATCH_MAX` packets (`_batched`):
the interpreter's work per packet costs half again as much when each packet wakes its thread with cold caches.
And reads are paced: once a read had to wait for the camera, the reader sleeps (`pace_s`, shorter for a fast
stream: `_pace`) and then reads what gathered in one go, a few wake-ups a second instead of one per packet.

Time: each packet's wall time is its stream timestamp plus an offset anchored to the wall clock: the
moment the connection opened (stream time 0 is the first packet after PLAY), lowered by any packet that
arrives earlier than that predicts (receive time minus pts; probing bursts arrive late and do not move it).
Receive times come from the monotonic clock, so a step of the wall clock does not bend a segment; a step
is reported once (`clock_step`) and the anchor re-taken. Segments of one connection are contiguous
(each ends where the next begins); across reconnects starts never go back before the last end.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import av
from cryptography import x509

from drivers.media_signing import (
    GopChecker,
    GopResult,
    length_prefixed,
    segment_verdict,
    split_nals,
)
from drivers.stall_watch import STALL_WATCH, Watch
from edge_agent.durable import fsync_dir

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".mkv"
RTSP_PORTS = {"rtsp": 554, "rtsps": 322}   # the default port of each scheme
TS_JUMP_MS = 5000          # decode timestamps moving back, or ahead by more than this, are a jump
CLOCK_STEP_MS = 1000        # a wall-clock jump larger than this against the monotonic clock is a clock step
BACKOFF_MIN_S = 0.5
LATE_AUDIO_MS = 1000       # a closed segment waits this long (stream time) for audio sent after its cut
INTERLEAVE_MAX_US = 500_000   # the muxer waits at most this long (stream time) for a silent track
PENDING_MAX = 512          # audio packets held for the video to catch up, at most (then written as they come)
PACE_S = 0.25              # a camera's reader sleeps this long once it has read all that came (`_batched`)...
PACE_BYTES = 64 * 1024     # ...or less, so that at most this much of its stream waits in the socket meanwhile
CAUGHT_UP_S = 0.004        # a read that waited longer than this found nothing waiting: the reader has caught up
RATE_WINDOW_S = 10.0       # health's fps and bitrate: over about this long...
RATE_STALE_S = 5.0         # ...falling once no batch has been handled for this long
BATCH_MAX = 32             # packets received before they are handled together, at most (`RtspRecorder._batched`)
# Codecs the Matroska muxer refuses, stored losslessly as 16-bit PCM (see the module docstring).
G711 = ("pcm_mulaw", "pcm_alaw")
KEPT_TYPES = ("video", "audio", "data")
DATA_TAG = "ORIGINAL_KIND"   # on a text track that holds a data stream's payloads (ONVIF metadata): "data"
TIMING_TAG = "FIRST_PICTURE_ESTIMATED_MS"   # segment tag: its first picture's time is an estimate (frame ms)


def _g711_tables() -> dict[str, tuple[bytes, bytes]]:
    """Per G.711 codec: (low bytes, high bytes) of the little-endian 16-bit sample of each code, for
    `bytes.translate`. ITU-T G.711's decoding (as FFmpeg's decoders), but µ-law's negative zero is -1."""
    def ulaw(code: int) -> int:
        code = ~code & 0xFF
        magnitude = (((code & 0x0F) << 3) + 0x84) << ((code & 0x70) >> 4)
        if code == 0x80:
            return -1   # the negative zero (code 0x7F): kept apart from the positive one, 0
        return (0x84 - magnitude) if code & 0x80 else (magnitude - 0x84)

    def alaw(code: int) -> int:
        code ^= 0x55
        t = (code & 0x0F) << 4
        seg = (code & 0x70) >> 4
        if seg == 0:
            t += 8
        elif seg == 1:
            t += 0x108
        else:
            t = (t + 0x108) << (seg - 1)
        return t if code & 0x80 else -t

    tables = {}
    for name, decode in (("pcm_mulaw", ulaw), ("pcm_alaw", alaw)):
        samples = [decode(code) & 0xFFFF for code in range(256)]
        tables[name] = (bytes(v & 0xFF for v in samples), bytes(v >> 8 for v in samples))
    return tables


G711_TABLES = _g711_tables()


def g711_to_s16le(codec: str, data: bytes) -> bytes:
    """G.711 codes as little-endian 16-bit samples; `s16le_to_g711` reverses it exactly."""
    low, high = G711_TABLES[codec]
    out = bytearray(2 * len(data))
    out[0::2] = data.translate(low)
    out[1::2] = data.translate(high)
    return bytes(out)


def s16le_to_g711(codec: str, pcm: bytes) -> bytes:
    """The camera's G.711 bytes back from a stored track (for export and audits); a sample no code
    decodes to is a ValueError: the track was not written by `g711_to_s16le`."""
    low, high = G711_TABLES[codec]
    code_of = {low[c] | high[c] << 8: c for c in range(256)}
    try:
        return bytes(code_of[pcm[i] | pcm[i + 1] << 8] for i in range(0, len(pcm) - 1, 2))
    except KeyError as exc:
        raise ValueError(f"sample {exc.args[0]:#06x} is no {codec} code: not a track stored from G.711") from None


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
    # Camera signing (drivers/media_signing.py): the `segment_verdict` of its GOPs; None when not checked.
    signing: dict[str, object] | None = None
    # Set when a timestamp in the segment is not the camera's but estimated (`first_picture_timing`).
    timing: dict[str, object] | None = None


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
    tracks: list[dict[str, object]] = field(default_factory=list)   # the streams of this connection
    dropped: list[str] = field(default_factory=list)                 # streams the muxer refused
    audio_codec: str | None = None      # the camera's audio codec on this connection; None: no audio track
    audio_packets: int = 0
    last_audio_ms: int | None = None    # receive time of the last audio packet of this connection
    connected_ms: int | None = None     # when this connection's stream was opened
    signing: str | None = None          # "onvif" / "axis": this connection carries signing SEIs
    # (monotonic time the batch's last packet came, packets, bytes) after each batch handled (`handled`)
    _window: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=64))

    def handled(self, came: float) -> None:
        """A batch is handled: the counters are right as of `came` (monotonic), when its last packet came."""
        self._window.append((came, self.packets, self.bytes))

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(frames per second, kilobits per second) over the last RATE_WINDOW_S or so, measured between batch
        ends: packets are counted a batch at a time, so counts read at any other moment would jump by a batch
        (a second of video: ±10 % over 5 s). Past RATE_STALE_S without a batch, the rates fall towards 0."""
        now = time.monotonic() if now is None else now
        samples = list(self._window)   # a copy: the recorder thread appends
        if not self.connected or len(samples) < 2:
            return 0.0, 0.0
        start = next(s for s in samples if now - s[0] <= RATE_WINDOW_S or s is samples[-2])
        end_t, packets, size = samples[-1]
        if now - end_t > RATE_STALE_S:
            end_t = now
        elapsed = end_t - start[0]
        if elapsed <= 0:
            return 0.0, 0.0
        return (packets - start[1]) / elapsed, (size - start[2]) * 8 / 1000 / elapsed


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

    monotonic = staticmethod(time.monotonic)

    def __init__(self) -> None:
        self.rebase()

    def rebase(self) -> None:
        self.wall0 = time.time()
        self.mono0 = self.monotonic()

    def now_ms(self) -> float:
        return self.wall_ms(self.monotonic())

    def wall_ms(self, monotonic: float) -> float:
        """The wall time (ms) of a reading of the monotonic clock."""
        return (self.wall0 + monotonic - self.mono0) * 1000

    def step_ms(self) -> int:
        return int(time.time() * 1000 - self.now_ms())


class RtspRecorder:
    """One camera's recording loop. `resolve()` returns the stream URL (ONVIF may be asked each time)."""

    def __init__(self, camera: str, resolve: Callable[[], str], spool: Path, listener: RecorderListener, *,
                 segment_s: float, stall_timeout_s: float, reconnect_max_s: float = 30.0,
                 min_free_bytes: int = 0, signing_anchors: list[x509.Certificate] | None = None,
                 pace_s: float = PACE_S):
        self.camera = camera
        self.resolve = resolve
        self.spool = spool
        self.listener = listener
        self.segment_ms = segment_s * 1000
        self.stall_timeout_s = stall_timeout_s
        self.reconnect_max_s = reconnect_max_s
        self.min_free_bytes = min_free_bytes
        self.signing_anchors = signing_anchors   # trust anchors for camera-signed video; None: none configured
        self._checker: GopChecker | None = None
        self._awaiting: deque[tuple[Segment, int]] = deque()   # closed segments waiting for their GOPs' verdict
        self._segment_seq = 0
        self._size: tuple[int, int] | None = None   # this connection's picture size (`_learn_size`)
        self.stats = StreamStats()
        # The files being written (two for a moment after a cut): replaced whole, read by the intake's thread.
        self.active_paths: tuple[Path, ...] = ()
        self._stop = threading.Event()
        self._stopping = False
        self.pace_s = pace_s   # 0: read each packet as it comes (`_batched`)
        self._clock = _Clock()
        self._last_end_ms: int | None = None   # end of the last packet written, wall ms
        self._estimated: dict[str, object] | None = None   # the first picture's time was estimated (`_timed`)
        self._data_indexes: frozenset[int] = frozenset()   # this connection's data streams (ONVIF metadata)
        self._interrupted = True               # no packet written yet since start or the last interruption
        self._video_seen = 0                   # video packets received, read by the stall watch
        self._unwatchable = False              # the stall watch could not find this camera's socket

    def stop(self) -> None:
        self._stop.set()
        # Read as each packet comes (`_batched`): a plain attribute, not a call. Set after the event, so that a
        # recorder that stops reading for it finds the event set and reports no interruption (`run`).
        self._stopping = True

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
                self.active_paths = ()
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
        parts = urlsplit(url)
        port = parts.port or RTSP_PORTS.get(parts.scheme.lower(), 554)
        opened_ms = self._clock.now_ms()
        container, watch = self._open(url, parts.hostname or "", port)
        try:
            stream = next(iter(container.streams.video), None)
            if stream is None:
                raise StreamError(f"{redact(url)} carries no video stream")
            self.stats.connected = True
            self.stats.codec = stream.codec_context.name
            self.stats.width, self.stats.height = stream.codec_context.width, stream.codec_context.height
            audio = next(iter(container.streams.audio), None)
            self.stats.audio_codec = audio.codec_context.name if audio is not None else None
            self.stats.last_audio_ms = None
            self.stats.connected_ms = int(opened_ms)
            self.stats.tracks = [_track(s) for s in container.streams]
            self.stats.dropped = []
            self.listener.connected(self.camera, redact(url))
            self._remux(container, stream, opened_ms)
        finally:
            cut = watch is not None and STALL_WATCH.withdraw(watch)   # before the close frees the socket
            container.close()
            if cut:
                raise StreamError(f"stalled: no data (no video packet for {self.stall_timeout_s:g} s)")

    def _open(self, url: str, host: str, port: int) -> tuple[av.container.InputContainer, Watch | None]:
        """The stream, and the stall watch's hold on its connection. No read timeout for PyAV: its interrupt
        callback would take the GIL at every socket wait. FFmpeg's socket timeout (`timeout`) ends a silent
        connection, the stall watch one that sends no video. Where the watch cannot tell which socket is this
        camera's (a redirect to another address, /proc/net hidden), the stream is opened again with PyAV's read
        timeout, and this camera keeps it: a hung encoder behind a live connection is never left unseen."""
        options = {"rtsp_transport": "tcp", "timeout": str(int(self.stall_timeout_s * 1e6))}
        open_s = max(self.stall_timeout_s, 5.0)
        if not self._unwatchable:
            with STALL_WATCH.opening(host, port) as connection:
                container = av.open(url, options=options, timeout=(open_s, None))
                conn = connection()
            if conn is not None:
                return container, STALL_WATCH.watch(self.camera, conn, self.stall_timeout_s, lambda: self._video_seen)
            container.close()
            self._unwatchable = True
            log.warning("camera_stall_watch_unavailable camera=%s detail=the connection to %s:%s was not found among "
                        "the process's sockets; this camera is watched by PyAV's read timeout instead (more CPU)",
                        self.camera, host, port)
        return av.open(url, options=options, timeout=(open_s, self.stall_timeout_s)), None

    def _remux(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
               opened_ms: float) -> None:
        # Wall ms minus stream ms. Stream time 0 is the first packet after PLAY, so the moment the
        # connection was opened bounds it from below; the least-delayed video packet tightens it.
        offset_ms: float | None = opened_ms
        previous_ms: float | None = None
        cuts = _Cuts()
        tick_ms = {s.index: float(s.time_base or 0) * 1000 for s in container.streams}   # once: Fractions are costly
        tb_ms = tick_ms[stream.index]
        kept = self._kept_streams(container)
        self._checker = checker = GopChecker(stream.codec_context.name == "hevc", self.signing_anchors)
        prefixed = length_prefixed(stream.codec_context.extradata)
        self.stats.signing = None
        width, height = stream.codec_context.width, stream.codec_context.height
        self._size = (width, height) if width and height else None   # None: learnt from the first keyframe
        # Looked up once: the loop below runs for every packet of every camera (docs/BENCHMARKS.md, "Cameras").
        video, stats, sample = stream.index, self.stats, self.listener.packet
        try:
            for packet, received in self._timed(self._batched(container.demux(kept), video), stream):
                pts, dts = packet.pts, packet.dts
                if pts is None or dts is None:
                    continue
                if packet.stream_index != video:
                    if offset_ms is not None:
                        self._audio(cuts, packet, int(pts * tick_ms[packet.stream_index] + offset_ms), received)
                    continue
                pts_ms = pts * tb_ms
                dts_ms = dts * tb_ms
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
                out = cuts.out
                if out is None and not key:
                    continue   # a segment must start with a keyframe to be playable on its own
                if key and (out is None or at - out.start_ms >= self.segment_ms):
                    at, offset_ms = self._cut(cuts, kept, stream, packet, at, offset_ms)
                    out = cuts.out
                sample(self.camera, packet, stream, key)
                self._last_end_ms = at + int((packet.duration or 0) * tb_ms)
                stats.packets += 1
                stats.bytes += packet.size
                stats.last_packet_ms = int(received)
                self._check_signing(checker, packet, prefixed, out.seq, key)
                out.write(packet, key)   # the muxer takes the packet's data: sample and count first
                self._after_video(cuts, at)
        finally:
            try:
                self._place_audio(cuts, before=None)
                if cuts.closing is not None:
                    self._finish(*cuts.closing)
                if cuts.out is not None:
                    self._finish(cuts.out, self._last_end_ms or cuts.out.start_ms)
            finally:   # the segments closed so far get their verdict, whatever failed above
                checker.finish()
                self._release(force=True)
                self._checker = None

    def _cut(self, cuts: _Cuts, kept: list[av.stream.Stream], video: av.video.stream.VideoStream,
             keyframe: av.Packet, at: int, offset_ms: float) -> tuple[int, float]:
        """Start a segment at the keyframe at `at`; the one before stays open for its late audio."""
        if self._size is None:
            self._size = self._learn_size(video, keyframe)
        self._place_audio(cuts, before=at)
        if cuts.closing is not None:
            self._finish(*cuts.closing)
        cuts.closing = (cuts.out, at) if cuts.out is not None else None
        cuts.out = None
        at, offset_ms = self._check_clock(at, offset_ms)
        cuts.out = self._open_segment(kept, video, max(at, self._last_end_ms or at))
        if self._estimated is not None:   # this keyframe is the connection's first picture, timed by estimate
            cuts.out.mark_timing(self._estimated)
            self._estimated = None
        if self._interrupted:
            self._interrupted = False
            self.listener.resumed(self.camera, cuts.out.start_ms)
        return at, offset_ms

    def _batched(self, packets: Iterator[av.Packet], video: int) -> Iterator[tuple[av.Packet, float]]:
        """The packets, each with its receive time (wall ms), handed on in batches: at the video packet that
        follows a keyframe (the one that lets `_timed` hand the keyframe on) and at every `BATCH_MAX` packets.
        Until `stop()`; a failed read hands on what is held, then raises.

        Why: a camera's packets come one at a time, 25 to 80 a second, each waking its thread from sleep with the
        CPU's caches cold, and the interpreter's work per packet costs half again as much cold as warm (with
        independent cameras, docs/BENCHMARKS.md "Cameras"). Here only the receive time and the stall watch's count
        are taken as a packet comes; the rest (`_timed` included) runs over the batch with warm caches. Nothing
        reaches the disk later for it: the Matroska muxer writes a cluster whole when the next keyframe comes
        (`_SegmentWriter`), and the batch ends as soon as that keyframe can be handed on, so a crash loses what it
        lost before (at most one keyframe interval).

        Paced: a read that waited longer than CAUGHT_UP_S found the socket empty, so the reader sleeps (`_pace`)
        and the next reads find what came meanwhile waiting: 13 wake-ups a second instead of 60 (docs/
        BENCHMARKS.md "Reads paced"). A crash may lose up to the pause more; `stop()` ends the pause."""
        clock, monotonic = self._clock, self._clock.monotonic
        batch: list[tuple[av.Packet, float]] = []   # (packet, monotonic time it came)
        after_key = False   # the last video packet was a keyframe
        wait = self._stop.wait
        ready = since = flushed = monotonic()
        bytes_since = self.stats.bytes
        try:
            for packet in packets:
                came = monotonic()   # a C call: as little as can be done as a packet comes
                waited, ready = came - ready, came
                batch.append((packet, came))
                end = False
                if packet.stream_index == video:
                    self._video_seen += 1   # the stall watch's sign of life, counted as the packet comes
                    end, after_key = after_key, packet.is_keyframe
                if end or len(batch) >= BATCH_MAX:
                    yield from ((p, clock.wall_ms(t)) for p, t in batch)
                    batch = []
                    self.stats.handled(came)
                    flushed, ready = came, monotonic()
                if self._stopping:
                    break
                if waited > CAUGHT_UP_S and (pace := self._pace(flushed - since, self.stats.bytes - bytes_since)):
                    wait(pace)   # this read waited for the camera, so all it sent is read: let the next gather
                    ready = monotonic()
        except (av.FFmpegError, OSError):
            # the connection failed: what came before is the camera's, written first
            yield from ((p, clock.wall_ms(came)) for p, came in batch)
            raise
        yield from ((p, clock.wall_ms(came)) for p, came in batch)

    def _pace(self, elapsed_s: float, received: int) -> float:
        """How long the reader sleeps once it has caught up: `pace_s`, or less, so that no more than PACE_BYTES of
        the stream (`received` bytes in `elapsed_s`: from the connection's start to the last batch handled) wait
        in the socket's receive buffer meanwhile: beyond the buffer, the camera's own sending would block.
        0 until two seconds of the stream are handled, and while no video has been (before the first keyframe):
        no rate is known."""
        if not self.pace_s or elapsed_s < 2.0 or received <= 0:
            return 0.0
        return min(self.pace_s, PACE_BYTES * elapsed_s / received)

    def _timed(self, packets: Iterator[tuple[av.Packet, float]],
               video: av.video.stream.VideoStream) -> Iterator[tuple[av.Packet, float]]:
        """The packets of a batch, each picture one video packet with its timestamps, the connection's first
        picture included; each with its receive time (a packet held here takes the time of the one that
        ends its hold: when it could first be handled).

        FFmpeg's RTSP demuxer parses H.264/H.265 into pictures, and its parser fetches a picture's timestamp
        by byte offset: RTP packets carry none (pos -1), so the connection's first picture matches no input
        and comes without pts/dts (libavcodec/parser.c `ff_fetch_timestamp`: its first-frame case needs
        offset 0). The parser also ends a picture at parameter sets repeated between its slices (as the
        payloader sends them before each IDR slice), so a sliced keyframe (x264's sliced threads) comes as
        two or more packets with one timestamp. So a keyframe (or the untimed first packet) is held until
        the next video packet:
        - that packet continues the same picture (its first slice is not the picture's first), or the held
          packet holds no picture (parameter sets only): both are joined, bytes in the order sent, into one
          packet with the camera's timestamp of that picture, and held again;
        - otherwise a held untimed packet is a whole picture (H.265, an unsliced H.264 picture): its time is
          estimated as one frame duration before the next picture, and the segment says so (`timing`).
        Untimed packets after the first are left out, as before."""
        index = video.index
        hevc = video.codec_context.name == "hevc"
        held: av.Packet | None = None
        first = True   # no video packet seen yet on this connection
        try:
            for packet, received in packets:
                if packet.stream_index != index:
                    yield packet, received
                    continue
                if first:
                    first = False
                    if packet.dts is None:
                        held = packet
                        continue
                if held is not None:
                    packet, out = self._place(held, packet, video, hevc)
                    held = None
                    if out:
                        yield from ((p, received) for p in out)
                    if packet is None:
                        continue
                if packet.is_keyframe and packet.dts is not None:
                    held = packet
                else:
                    yield packet, received
        except (av.FFmpegError, OSError):
            if held is not None:   # the connection failed: the keyframe held is still the camera's, written first
                yield held, self._clock.now_ms()
            raise
        if held is not None:
            yield held, self._clock.now_ms()

    def _place(self, held: av.Packet, packet: av.Packet, video: av.video.stream.VideoStream,
               hevc: bool) -> tuple[av.Packet | None, tuple[av.Packet, ...]]:
        """`held` (a keyframe, or the untimed first packet) and the next video packet: (the packet to go on
        with, the packets to pass on before it); see `_timed`."""
        if packet.dts is None:
            return None, (held,)   # the caller leaves an untimed packet out; the held one goes on
        if held.dts is None:
            start = picture_start(bytes(held), hevc)
            if start is None:   # parameter sets only: they belong to the picture that follows
                return _joined(held, packet, packet), ()
            if not held.is_keyframe:
                return packet, ()   # a segment starts with a keyframe: nothing before the first is recorded
            if picture_start(bytes(packet), hevc) is not False:
                frame = packet.duration or _frame_ticks(video)
                held.pts = held.dts = packet.dts - frame
                held.duration = frame
                held.time_base = packet.time_base
                self._estimated = first_picture_timing(round(frame * float(packet.time_base) * 1000))
                log.info("camera_first_picture_estimated camera=%s frame_ticks=%d", self.camera, frame)
                return packet, (held,)
            return _joined(held, packet, packet), ()
        if packet.dts == held.dts and picture_start(bytes(packet), hevc) is False:
            return _joined(held, packet, held), ()
        return packet, (held,)

    def _learn_size(self, video: av.video.stream.VideoStream, keyframe: av.Packet) -> tuple[int, int]:
        """The picture size of a connection whose video FFmpeg's probe left without one, from its first keyframe.

        The probe at `av.open` gives up when no video comes before the open timeout (a camera still starting,
        an NVR channel without signal, media held up on the way while RTCP flows): the stream then has no
        size, and the Matroska muxer refuses to start a file without one ("dimensions not set", EINVAL). The
        video that comes later on the same connection is the camera's all the same: its first keyframe is
        decoded once to learn the size, and recording starts there, without another reconnect and gap."""
        size = picture_size(video.codec_context.name, video.codec_context.extradata, bytes(keyframe))
        if size is None:
            raise StreamError("the camera's video came without a picture size (FFmpeg's probe found none at "
                              "connect) and its first keyframe did not decode; reconnecting to probe again")
        self.stats.width, self.stats.height = size
        self.stats.tracks = [dict(track, width=size[0], height=size[1]) if n == video.index else track
                             for n, track in enumerate(self.stats.tracks)]
        log.info("camera_picture_size_from_keyframe camera=%s width=%d height=%d", self.camera, *size)
        return size

    def _check_signing(self, checker: GopChecker, packet: av.Packet, prefixed: bool, seq: int, key: bool) -> None:
        """Feed the packet to the signing checker (before the muxer takes the packet's data). It splits an
        unsigned camera's packets only where that can change something (`GopChecker.feed_unit`); FFmpeg's
        parser flags every IDR/IRAP access unit as a keyframe."""
        checker.feed_unit(packet, prefixed, key, seq)
        if key:
            self.stats.signing = checker.signing
            self._release(force=False)

    def _kept_streams(self, container: av.container.InputContainer) -> list[av.stream.Stream]:
        """Video, audio and data (ONVIF metadata: stored as a text track, see `_SegmentWriter`); other
        streams (subtitles) are named in the stats and the log."""
        kept = [s for s in container.streams if s.type in KEPT_TYPES]
        self._data_indexes = frozenset(s.index for s in kept if s.type == "data")
        for other in container.streams:
            if other.type not in KEPT_TYPES:
                name = other.codec_context.name if other.codec_context is not None else "unknown"
                self.stats.dropped.append(f"{other.index}:{other.type}:{name}")
                log.warning("camera_track_not_recorded camera=%s stream=%d type=%s codec=%s", self.camera,
                            other.index, other.type, name)
        return kept

    def _after_video(self, cuts: _Cuts, at: int) -> None:
        """After each video packet: the audio it has passed is placed, and the segment before the last cut is
        closed once the video is far enough past it (tested first: this runs for every packet)."""
        if cuts.pending:
            self._place_audio(cuts, before=at + 1)
        if cuts.closing is not None:
            self._expire_closing(cuts, at)

    def _expire_closing(self, cuts: _Cuts, video_at: int) -> None:
        if cuts.closing is not None and video_at - cuts.closing[1] > LATE_AUDIO_MS:
            self._finish(*cuts.closing)   # no audio came for it in time: it is complete
            cuts.closing = None

    def _audio(self, cuts: _Cuts, packet: av.Packet, at: int, received: float) -> None:
        """An audio or data packet: held until the video passes its time (`_place_audio`)."""
        if packet.stream_index not in self._data_indexes:
            self.stats.audio_packets += 1
            self.stats.last_audio_ms = int(received)
        cuts.pending.append((at, packet))
        if len(cuts.pending) > PENDING_MAX:   # the video stopped moving: do not hold audio without bound
            self._place_audio(cuts, before=cuts.pending[-1][0])

    def _place_audio(self, cuts: _Cuts, before: int | None) -> None:
        """Write the held audio packets that start before `before` (all when None) into the segment
        their start falls in: the open one, or the one before the last cut."""
        while cuts.pending and (before is None or cuts.pending[0][0] < before):
            at, packet = cuts.pending.popleft()
            if cuts.out is not None and at >= cuts.out.start_ms:
                if cuts.closing is not None:   # audio has passed the cut: the segment before it is complete
                    self._finish(*cuts.closing)
                    cuts.closing = None
                cuts.out.write(packet, False)
            elif cuts.closing is not None and at >= cuts.closing[0].start_ms:
                cuts.closing[0].write(packet, False)
            # else: before the first keyframe of this connection, which no segment holds

    def _check_clock(self, at: int, offset_ms: float) -> tuple[int, float]:
        step = self._clock.step_ms()
        if abs(step) <= CLOCK_STEP_MS:
            return at, offset_ms
        self._clock.rebase()
        self.listener.clock_stepped(self.camera, at, step)
        return at + step, offset_ms + step

    def _open_segment(self, streams: list[av.stream.Stream], video: av.video.stream.VideoStream,
                      start_ms: int) -> _SegmentWriter:
        self.spool.mkdir(parents=True, exist_ok=True)
        if self.min_free_bytes and shutil.disk_usage(self.spool).free < self.min_free_bytes:
            raise DiskFull(f"less than {self.min_free_bytes // 1024**2} MiB free under {self.spool} "
                           "(agent.min_free_mb); recording pauses until space returns: check retention and sync")
        path = self.spool / f"{start_ms}{SEGMENT_SUFFIX}"
        self._segment_seq += 1
        writer = _SegmentWriter(path, streams, video, start_ms, self._segment_seq, self._size)
        self.active_paths = (*self.active_paths, path)
        return writer

    def _finish(self, out: _SegmentWriter, end_ms: int) -> None:
        segment = out.close(self.camera, max(end_ms, out.start_ms))
        if segment is not None:
            # Handed over once the signatures of its GOPs are known: the SEI signing a segment's last GOP
            # comes in the next segment. At most one segment waits (the one before is forced out).
            self._release(force=True)
            self._awaiting.append((segment, out.seq))
            self._release(force=False)
        else:
            self.active_paths = tuple(p for p in self.active_paths if p != out.path)

    def _release(self, force: bool) -> None:
        """Hand the closed segments whose GOPs all have a verdict (all of them when `force`) to the listener,
        in order, with their signing verdict."""
        checker = self._checker
        while self._awaiting:
            segment, seq = self._awaiting[0]
            if checker is not None and checker.pending(seq) and not force:
                return
            self._awaiting.popleft()
            if checker is not None:
                results = checker.results(seq)
                if checker.pending(seq):
                    results.append(GopResult("unverifiable", "its signature did not come before the segment "
                                             "had to be handed over"))
                checker.forget(seq)
                segment = replace(segment, signing=segment_verdict(results, checker.signing))
            self.listener.segment_done(segment)
            # only now: the intake's spool scan must not take it in as a leftover
            self.active_paths = tuple(p for p in self.active_paths if p != segment.path)


@dataclass
class _Cuts:
    """Where packets go in one connection: the open segment, the one before the last cut (still taking
    audio that starts before that cut), and audio held until the video passes its time."""

    out: _SegmentWriter | None = None
    closing: tuple[_SegmentWriter, int] | None = None
    pending: deque[tuple[int, av.Packet]] = field(default_factory=deque)


class _SegmentWriter:
    """One Matroska file being written with every kept track; fsynced at each keyframe and on close.
    Timestamps of all tracks are moved by the same amount: the first video packet is time 0."""

    def __init__(self, path: Path, streams: list[av.stream.Stream], video: av.video.stream.VideoStream,
                 start_ms: int, seq: int = 0, size: tuple[int, int] | None = None):
        self.path = path
        self.start_ms = start_ms
        self.seq = seq   # the recorder's number for this segment (the signing checker's tag)
        self.packets = 0
        self._video = video.index
        self._base_ms: float | None = None
        self._base: dict[int, int] = {}
        self._last_dts: dict[int, int] = {}
        self._outputs: dict[int, tuple[av.stream.Stream, str | None]] = {}
        try:
            # The muxer holds packets until every track has one as late (interleaving); without a bound
            # on that wait, video would stay in memory for 10 s (FFmpeg's default) whenever the audio
            # stops, and a crash would lose it.
            self.container = av.open(str(path), "w", format="matroska",
                                     container_options={"flush_packets": "1",
                                                        "max_interleave_delta": str(INTERLEAVE_MAX_US)})
            for stream in streams:
                if stream.type == "data":
                    # Matroska (FFmpeg's muxer) holds no data track: the payloads go, bytes unchanged, into a
                    # text track (S_TEXT/UTF8, FFmpeg's `subrip`), tagged as data and not shown by default.
                    out = self.container.add_stream_from_template(_text_template())
                    out.time_base = stream.time_base
                    out.metadata[DATA_TAG] = "data"
                    out.metadata["title"] = "camera metadata (RTP payloads)"
                    self._outputs[stream.index] = (out, None)
                    continue
                codec = stream.codec_context.name
                if codec in G711:
                    out = self.container.add_stream("pcm_s16le", rate=stream.codec_context.sample_rate,
                                                    layout=stream.codec_context.layout.name)
                    out.time_base = stream.time_base
                    out.metadata["ORIGINAL_CODEC"] = codec
                    self._outputs[stream.index] = (out, codec)
                else:
                    out = self.container.add_stream_from_template(stream)
                    if stream.index == video.index and size is not None and not out.codec_context.width:
                        # the probe left the camera's video without a size (`RtspRecorder._learn_size`)
                        out.codec_context.width, out.codec_context.height = size
                    self._outputs[stream.index] = (out, None)
        except (av.FFmpegError, OSError) as exc:
            raise _disk_error(exc, path) from exc
        self._fd: int | None = None   # opened once the muxer has created the file (at its first packet)
        self.timing: dict[str, object] | None = None

    def mark_timing(self, timing: dict[str, object]) -> None:
        """Before the first packet: the file says, in a tag, that its first picture's time is estimated
        (`segment_timing` reads it back from a segment cut by a crash)."""
        self.timing = timing
        self.container.metadata[TIMING_TAG] = str(timing["frame_ms"])

    def write(self, packet: av.Packet, key: bool) -> None:
        index = packet.stream_index
        out, g711 = self._outputs[index]
        if g711 is not None:
            pcm = av.Packet(g711_to_s16le(g711, bytes(packet)))
            pcm.pts, pcm.dts, pcm.duration, pcm.time_base = packet.pts, packet.dts, packet.duration, packet.time_base
            packet = pcm
        base = self._base.get(index)
        if base is None:   # this track's first packet in the segment
            if self._base_ms is None:
                if index != self._video:
                    return   # a segment starts with its first video keyframe
                self._base_ms = float(packet.dts * packet.time_base) * 1000
            base = self._base[index] = round(self._base_ms / 1000 / packet.time_base)
        elif key and self._fd is not None:
            os.fsync(self._fd)   # the previous cluster is complete and written: make it durable
        dts = packet.dts
        shifted = dts - base
        last = self._last_dts.get(index)
        if last is not None and shifted < last:
            # The stream's clock jumped back (RTCP resync, encoder restart): continue the file's timeline.
            jump = last + (packet.duration or 1) - shifted
            self._base[index] = base - jump
            shifted += jump
        packet.pts += shifted - dts
        packet.dts = shifted
        self._last_dts[index] = shifted
        packet.stream = out
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
        return Segment(camera, self.path, self.start_ms, end_ms, self.packets, self.path.stat().st_size,
                       timing=self.timing)


_TEXT_TEMPLATE: list[av.stream.Stream] = []


def _text_template() -> av.stream.Stream:
    """A text (SubRip, S_TEXT/UTF8) stream to add tracks from: PyAV makes a stream without an encoder only
    from a template, so one is read from a one-cue SubRip document held in memory, once per process."""
    if not _TEXT_TEMPLATE:
        _TEXT_TEMPLATE.append(av.open(io.BytesIO(b"1\n00:00:00,000 --> 00:00:01,000\n.\n\n"), format="srt")
                              .streams[0])
    return _TEXT_TEMPLATE[0]


def _joined(head: av.Packet, tail: av.Packet, timed: av.Packet) -> av.Packet:
    """One packet of both packets' bytes (head first), with `timed`'s timestamps; a keyframe if either is."""
    joined = av.Packet(bytes(head) + bytes(tail))
    joined.pts, joined.dts, joined.duration = timed.pts, timed.dts, timed.duration
    joined.time_base = timed.time_base
    joined.is_keyframe = head.is_keyframe or tail.is_keyframe
    if tail.stream is not None:   # a demuxed packet's stream (its index picks the segment's track)
        joined.stream = tail.stream
    return joined


def picture_start(data: bytes, hevc: bool) -> bool | None:
    """Whether the first slice in an Annex B packet begins a picture (H.264 `first_mb_in_slice` = 0, H.265
    `first_slice_segment_in_pic_flag` = 1); None when the packet holds no slice."""
    for nal in split_nals(data, False):
        if hevc:
            kind = (nal[0] >> 1) & 0x3F
            if kind < 32 and len(nal) > 2:   # VCL NAL units (slice segments)
                return bool(nal[2] & 0x80)
        else:
            kind = nal[0] & 0x1F
            if 1 <= kind <= 5 and len(nal) > 1:
                return bool(nal[1] & 0x80)   # ue(v) 0 is the single bit 1
    return None


def keyframe_decoder(codec: str, extradata: bytes | None) -> av.CodecContext:
    """A decoder for a camera's keyframes, one at a time (no frame threading: the picture comes out of its own
    packet). Used for the image checks (`KeyframeSampler`) and to learn a picture's size (`picture_size`)."""
    decoder = av.CodecContext.create(codec, "r")
    if extradata:
        decoder.extradata = extradata
    decoder.thread_count = 1
    return decoder


def picture_size(codec: str, extradata: bytes | None, keyframe: bytes) -> tuple[int, int] | None:
    """The (width, height) of a keyframe, decoded; None when it does not decode to a picture."""
    decoder = keyframe_decoder(codec, extradata)
    try:
        frames = decoder.decode(av.Packet(keyframe)) + decoder.decode(None)
    except (av.FFmpegError, ValueError) as exc:
        log.debug("keyframe_undecodable codec=%s error=%s", codec, exc)
        return None
    sizes = [(frame.width, frame.height) for frame in frames if frame.width and frame.height]
    return sizes[0] if sizes else None


def first_picture_timing(frame_ms: int) -> dict[str, object]:
    """What a segment's manifest says (`timing`) when its first picture's time is an estimate."""
    return {"first_picture": "estimated", "frame_ms": frame_ms,
            "detail": "the RTSP demuxer gave the connection's first picture no timestamp; it is placed one "
                      "frame duration before the next picture"}


def segment_timing(path: Path) -> dict[str, object] | None:
    """The `timing` note of a segment file (its tag written by `_SegmentWriter.mark_timing`); None: none."""
    try:
        with av.open(str(path)) as container:
            value = {k.upper(): v for k, v in container.metadata.items()}.get(TIMING_TAG)
    except (av.FFmpegError, OSError) as exc:
        log.warning("segment_unreadable path=%s error=%s", path, exc)
        return None
    return first_picture_timing(int(value)) if value is not None and value.isdigit() else None


def _frame_ticks(video: av.video.stream.VideoStream) -> int:
    """One frame's duration in the stream's time base, from its announced or guessed rate (25 fps if none)."""
    rate = video.average_rate or video.guessed_rate or Fraction(25)
    return max(1, round(1 / (rate * video.time_base)))


def _track(stream: av.stream.Stream) -> dict[str, object]:
    """What health and logs say about one stream of the camera: kind and codec, and size or rate."""
    context = stream.codec_context
    track: dict[str, object] = {"kind": stream.type, "codec": context.name if context is not None else None}
    if stream.type == "video":
        track.update(width=context.width, height=context.height)
    elif stream.type == "audio":
        track.update(sample_rate=context.sample_rate, channels=context.channels)
    return track


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
