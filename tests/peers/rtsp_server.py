"""A real RTSP camera for tests: GStreamer's RTSP server with a generated H.264 stream,
or H.265 (`video="h265"`), and optionally an audio track (`audio="pcmu" | "pcma" | "aac" | "opus"`).

`RtspServer(pattern=..., port=...)` runs this same file with Debian's `/usr/bin/python3` (a venv's Python
cannot see the GStreamer bindings). Patterns: `normal` (moving, sharp colour bars), `black`, `frozen`
(the same bars, still). `credentials=(user, password)` makes it ask for an RTSP login. Tests stop and
start it to make outages.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

GST_PYTHON = "/usr/bin/python3"
MOUNT = "/cam"

# videotestsrc settings per pattern; horizontal-speed scrolls the picture so frames differ.
PATTERNS = {
    "normal": "pattern=smpte horizontal-speed=3",
    "black": "pattern=black",
    "frozen": "pattern=smpte horizontal-speed=0",
}


# An audio track beside the video (a second payloader, pay1): what field cameras send. White noise, so that
# no stretch of samples repeats and a bit-exact comparison cannot match the wrong place.
AUDIO = {
    "none": "",
    "pcmu": "audio/x-raw,rate=8000,channels=1 ! mulawenc ! rtppcmupay name=pay1 pt=0",
    "pcma": "audio/x-raw,rate=8000,channels=1 ! alawenc ! rtppcmapay name=pay1 pt=8",
    "aac": "audio/x-raw,rate=16000,channels=1 ! voaacenc bitrate=32000 ! rtpmp4apay name=pay1 pt=97",
    "opus": "audio/x-raw,rate=48000,channels=1 ! opusenc ! rtpopuspay name=pay1 pt=98",
}


# ONVIF metadata over RTP (ONVIF Streaming Specification, "Metadata streaming"): an `application` stream, one
# XML document per RTP packet (marker bit set on its last packet), 90 kHz clock.
METADATA_PT = 107
METADATA_CAPS = ("application/x-rtp,media=application,clock-rate=90000,encoding-name=VND.ONVIF.METADATA,"
                 f"payload={METADATA_PT}")
METADATA_EVERY_MS = 200


def metadata_document(n: int) -> bytes:
    """The n-th document the metadata stream sends: a scene description with one moving object."""
    return (f'<?xml version="1.0" encoding="UTF-8"?><tt:MetadataStream xmlns:tt="http://www.onvif.org/ver10/schema">'
            f'<tt:VideoAnalytics><tt:Frame UtcTime="2026-12-04T00:00:{n % 60:02d}Z"><tt:Object ObjectId="{n}">'
            f'<tt:Appearance><tt:Shape><tt:BoundingBox left="{n % 100}" top="10" right="{n % 100 + 20}" bottom="40"/>'
            '</tt:Shape><tt:Class><tt:Type Likelihood="0.9">Vehicle</tt:Type></tt:Class></tt:Appearance>'
            '</tt:Object></tt:Frame></tt:VideoAnalytics></tt:MetadataStream>').encode()


def _send_metadata(media: object, name: str) -> None:
    """Push one metadata document every METADATA_EVERY_MS into the media's `appsrc` payloader, as RTP."""
    import itertools
    import time

    from gi.repository import GLib, Gst

    source = media.get_element().get_by_name(name)
    counter = itertools.count()
    start = time.monotonic()

    def push() -> bool:
        n = next(counter)
        stamp = int((time.monotonic() - start) * 90000) & 0xFFFFFFFF
        header = struct.pack(">BBHII", 0x80, 0x80 | METADATA_PT, n & 0xFFFF, stamp, 0x0E7A0001)
        source.emit("push-buffer", Gst.Buffer.new_wrapped(header + metadata_document(n)))
        return True

    GLib.timeout_add(METADATA_EVERY_MS, push)


def replay_line(path: str) -> str:
    """A mount that plays a recording (MP4, H.264 or H.265) once at its own pace, its NAL units as they are
    in the file: what a camera that signs its video sends (ONVIF's signed samples)."""
    video = "h265" if "265" in Path(path).name else "h264"
    return (f"( filesrc location={path} ! qtdemux ! {video}parse ! "
            f"rtp{video}pay name=pay0 pt=96 config-interval=-1 )")


def launch_line(pattern: str, width: int, height: int, fps: int, keyint: int, bitrate_kbps: int,
                audio: str = "none", audio_s: int = 0, video: str = "h264", metadata: bool = False) -> str:
    """`audio_s` > 0: the audio ends after that many seconds while the video goes on (a failed microphone);
    `metadata`: an ONVIF metadata stream too (`metadata_payloader`), after the audio."""
    if video == "h265":
        encoder = (f"x265enc tune=zerolatency speed-preset=ultrafast key-int-max={keyint} bitrate={bitrate_kbps}"
                   " ! rtph265pay name=pay0 pt=96 config-interval=-1")
    else:
        encoder = (f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={keyint} bitrate={bitrate_kbps}"
                   " ! rtph264pay name=pay0 pt=96 config-interval=-1")
    line = (f"videotestsrc is-live=true {PATTERNS[pattern]} ! video/x-raw,width={width},height={height},"
            f"framerate={fps}/1 ! {encoder}")
    if AUDIO[audio]:
        # 160 samples at 8 kHz are 20 ms: 50 buffers a second
        stop = f" samplesperbuffer=160 num-buffers={audio_s * 50} ! audio/x-raw,rate=8000" if audio_s else ""
        line += (f" audiotestsrc is-live=true wave=white-noise volume=0.3{stop} ! audioconvert ! audioresample"
                 f" ! {AUDIO[audio]}")
    if metadata:
        line += (f" appsrc name={metadata_payloader(audio)} is-live=true format=time do-timestamp=true"
                 f' caps="{METADATA_CAPS}"')
    return f"( {line} )"


def metadata_payloader(audio: str) -> str:
    """The name of the metadata stream's payloader (an appsrc of RTP packets): the last stream's."""
    return "pay2" if AUDIO[audio] else "pay1"


class RtspServer:
    """The server as a child process; `url` is where a camera's stream is pulled."""

    def __init__(self, port: int, pattern: str = "normal", *, width: int = 320, height: int = 180, fps: int = 25,
                 keyint: int = 25, bitrate_kbps: int = 400, log: Path | None = None,
                 credentials: tuple[str, str] | None = None, audio: str = "none",
                 audio_s: int = 0, video: str = "h264", replay: Path | None = None, metadata: bool = False):
        """`replay`: serve this recording (`replay_line`) instead of a generated stream; `metadata`: send an
        ONVIF metadata stream too (`metadata_document` every METADATA_EVERY_MS)."""
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(PATTERNS)}")
        if audio not in AUDIO:
            raise ValueError(f"audio must be one of {sorted(AUDIO)}")
        if video not in ("h264", "h265"):
            raise ValueError("video must be h264 or h265")
        self.port = port
        self.pattern = pattern
        self.audio = audio
        self.video = video
        self.args = [str(port), pattern, str(width), str(height), str(fps), str(keyint), str(bitrate_kbps),
                     audio, str(audio_s), video if replay is None else f"replay:{replay}", str(int(metadata)),
                     *(credentials or ())]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{MOUNT}"

    def start(self) -> RtspServer:
        if self.log is None:
            self.proc = subprocess.Popen([GST_PYTHON, str(Path(__file__).resolve()), *self.args],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        else:
            with open(self.log, "ab") as stderr:   # the child keeps its own copy of the descriptor
                self.proc = subprocess.Popen([GST_PYTHON, str(Path(__file__).resolve()), *self.args],
                                             stdout=subprocess.PIPE, stderr=stderr)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()   # READY, or nothing when the child dies
        if b"READY" not in line:
            self.stop()
            raise RuntimeError(f"RTSP server did not start (got {line!r}); is GStreamer installed? "
                               "run scripts/setup.sh")
        return self

    def stop(self) -> None:
        """kill -9: a camera that loses power says goodbye to nobody."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the connection stays open but no packet comes (a hung camera)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _serve(port: str, pattern: str, width: str, height: str, fps: str, keyint: str, bitrate: str, audio: str,
           audio_s: str, video: str, metadata: str, username: str | None = None, password: str | None = None) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    if video.startswith("replay:"):
        factory.set_launch(replay_line(video.removeprefix("replay:")))
    else:
        factory.set_launch(launch_line(pattern, int(width), int(height), int(fps), int(keyint), int(bitrate), audio,
                                       int(audio_s), video, metadata == "1"))
        if metadata == "1":
            factory.connect("media-configure",
                            lambda _factory, media: _send_metadata(media, metadata_payloader(audio)))
    factory.set_shared(True)
    if username is not None:   # RTSP Basic login, as cameras ask for it
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        auth = GstRtspServer.RTSPAuth()
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(username, password or ""), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role("viewer", "media.factory.access", True)
        permissions.add_permission_for_role("viewer", "media.factory.construct", True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(MOUNT, factory)
    if server.attach(None) == 0:
        sys.stderr.write(f"cannot listen on 127.0.0.1:{port}\n")
        sys.exit(1)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    GLib.MainLoop().run()


if __name__ == "__main__":
    _serve(*sys.argv[1:14])
