"""A connection's first picture is recorded, byte for byte as the server sent it: the recorder reaches the
real GStreamer RTSP server through a tap (tests/peers/rtsp_tap.py) that keeps what the server sent it, and
the first segment's NAL units are exactly those, from the first picture on (H.264 with x264's sliced
threads: the untimed top slice joined to the rest of its picture, camera-timed, and every later sliced
keyframe one packet; H.265: the untimed first keyframe kept, its time an estimate the segment says it
is). The first segment decodes from its first picture: one decoded picture per picture sent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import pytest

from drivers.media_signing import length_prefixed, split_nals
from drivers.rtsp import RtspRecorder, Segment, segment_timing
from tests.peers.mosquitto import free_port
from tests.peers.rtsp_server import MOUNT, RtspServer
from tests.peers.rtsp_tap import RtspTap


def nal_type(nal: bytes, video: str) -> int:
    return (nal[0] >> 1) & 0x3F if video == "h265" else nal[0] & 0x1F


class Collector:
    """A RecorderListener keeping the finished segments; `done` is set at the `wanted`-th one."""

    def __init__(self, wanted: int = 2) -> None:
        self.segments: list[Segment] = []
        self.wanted = wanted
        self.done = threading.Event()

    def connected(self, camera: str, url: str) -> None: ...

    def resumed(self, camera: str, at_ms: int) -> None: ...

    def interrupted(self, camera: str, cause: str, since_ms: int, detail: str) -> None: ...

    def clock_stepped(self, camera: str, at_ms: int, step_ms: int) -> None: ...

    def packet(self, camera: str, packet: av.Packet, stream: object, key: bool) -> None: ...

    def segment_done(self, segment: Segment) -> None:
        self.segments.append(segment)
        if len(self.segments) >= self.wanted:
            self.done.set()


@contextmanager
def recording_through_tap(server: RtspServer, tmp_path: Path, wanted: int = 2) -> Iterator[tuple[RtspTap,
                                                                                                  Collector,
                                                                                                  RtspRecorder]]:
    """A recorder of `server`'s stream through a tap that keeps what the server sent; waits for `wanted`
    segments before the body runs, and stops recorder, tap and server after it."""
    tap = RtspTap(server.port).start()
    heard = Collector(wanted=wanted)
    recorder = RtspRecorder("gate", lambda: tap.url(MOUNT), tmp_path / "spool", heard, segment_s=0.5,
                            stall_timeout_s=5)
    thread = threading.Thread(target=recorder.run, daemon=True)
    thread.start()
    try:
        assert heard.done.wait(30), f"{wanted} segments were not recorded"
        yield tap, heard, recorder
    finally:
        recorder.stop()
        thread.join(20)
        tap.close()
        server.stop()


def segment_nals(path: Path) -> tuple[list[bytes], int]:
    """The video NAL units of a segment, in order, and how many pictures decode from it (errors raise)."""
    nals: list[bytes] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        prefixed = length_prefixed(stream.codec_context.extradata)
        for packet in container.demux(stream):
            if packet.size:
                nals += split_nals(bytes(packet), prefixed)
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.options = {"err_detect": "explode"}
        decoded = sum(1 for _ in container.decode(video=0))
    return nals, decoded


# The default run proves H.264 (the sliced keyframe joined, every keyframe of the segment one picture); H.265
# (the untimed keyframe kept, its time estimated) runs in scripts/test_extended.sh.
@pytest.mark.parametrize("video", ["h264", pytest.param("h265", marks=pytest.mark.extended)])
def test_the_first_picture_of_a_connection_is_recorded_as_sent(tmp_path: Path, video: str) -> None:
    server = RtspServer(free_port(), video=video, keyint=10, log=tmp_path / "rtsp.log").start()
    with recording_through_tap(server, tmp_path) as (tap, heard, _):
        pass
    first = heard.segments[0]
    recorded, decoded = segment_nals(first.path)

    pictures = tap.pictures(video)
    sent = [nal for picture in pictures for nal in picture]
    # From the first picture the server sent this client on, every NAL unit, byte for byte, in order,
    # none left out (the segment ends at a picture boundary).
    assert len(recorded) > 20 and recorded == sent[:len(recorded)]
    in_segment = 0
    while sum(len(p) for p in pictures[:in_segment]) < len(recorded):
        in_segment += 1
    assert sum(len(p) for p in pictures[:in_segment]) == len(recorded)
    # It decodes from that first picture, a keyframe: one picture out per picture the server sent into it.
    keyframe = {5} if video == "h264" else set(range(16, 22))
    assert any(nal_type(n, video) in keyframe for n in pictures[0])
    assert decoded == in_segment
    if video == "h264":   # the top slice joined to the rest of its picture: the camera's own time
        assert first.timing is None and segment_timing(first.path) is None
    else:                 # a whole untimed keyframe: its time is an estimate, and the segment says so
        assert first.timing is not None and first.timing["first_picture"] == "estimated"
        assert segment_timing(first.path) == first.timing


# The same rules on packets made here (no server): what `_timed` gives the recorder's loop.
AUD, SPS, PPS = b"\x00\x00\x00\x01\x09\x10", b"\x00\x00\x00\x01\x67\x42", b"\x00\x00\x00\x01\x68\xce"
IDR_TOP, IDR_REST = b"\x00\x00\x00\x01\x65\x88\x84", b"\x00\x00\x00\x01\x65\x03\xc8"   # first_mb 0 / > 0
P_TOP = b"\x00\x00\x00\x01\x41\x9a\x22"
IRAP, TRAIL = b"\x00\x00\x00\x01\x28\x01\xac", b"\x00\x00\x00\x01\x02\x01\xd0"   # H.265, first slice


class Video:
    """What `_timed` reads of the video stream."""

    index = 0
    time_base = Fraction(1, 90000)
    average_rate = Fraction(25)
    guessed_rate = None

    def __init__(self, codec: str):
        self.codec_context = SimpleNamespace(name=codec)


def packet(data: bytes, dts: int | None, key: bool) -> av.Packet:
    p = av.Packet(data)
    p.pts = p.dts = dts
    p.time_base, p.duration, p.is_keyframe = Fraction(1, 90000), 3600, key
    return p


def timed(codec: str, packets: list[av.Packet], fail: bool = False) -> tuple[list[tuple[bytes, int]], object]:
    def source() -> Iterator[tuple[av.Packet, float]]:   # each with its receive time, as `_batched` gives them
        yield from ((p, float(n)) for n, p in enumerate(packets))
        if fail:
            raise av.ExitError(-1, "stream ended")   # what the demuxer raises when the camera goes away

    recorder = RtspRecorder("gate", lambda: "", Path("/nonexistent"), Collector(), segment_s=1, stall_timeout_s=1)
    out: list[tuple[bytes, int]] = []
    try:
        for p, _ in recorder._timed(source(), Video(codec)):
            out.append((bytes(p), p.dts))
    except av.ExitError:
        out.append((b"raised", -1))
    return out, recorder._estimated


def test_the_untimed_top_slice_and_each_sliced_keyframe_become_one_camera_timed_picture() -> None:
    out, estimated = timed("h264", [
        packet(AUD + SPS + PPS + IDR_TOP, None, True), packet(SPS + PPS + IDR_REST, 0, True),
        packet(AUD + P_TOP, 3600, False),
        packet(AUD + SPS + PPS + IDR_TOP, 7200, True), packet(SPS + PPS + IDR_REST, 7200, True),
        packet(AUD + P_TOP, 10800, False)])
    assert out == [(AUD + SPS + PPS + IDR_TOP + SPS + PPS + IDR_REST, 0), (AUD + P_TOP, 3600),
                   (AUD + SPS + PPS + IDR_TOP + SPS + PPS + IDR_REST, 7200), (AUD + P_TOP, 10800)]
    assert estimated is None


def test_an_untimed_whole_keyframe_is_kept_with_an_estimated_time() -> None:
    out, estimated = timed("hevc", [packet(IRAP, None, True), packet(TRAIL, 5857, False),
                                    packet(TRAIL, 9457, False)])
    assert out == [(IRAP, 5857 - 3600), (TRAIL, 5857), (TRAIL, 9457)]
    assert estimated is not None and estimated["first_picture"] == "estimated" and estimated["frame_ms"] == 40


def test_a_keyframe_held_when_the_connection_fails_is_still_written() -> None:
    out, _ = timed("h264", [packet(P_TOP, 0, False), packet(AUD + SPS + PPS + IDR_TOP, 3600, True)], fail=True)
    assert out == [(P_TOP, 0), (AUD + SPS + PPS + IDR_TOP, 3600), (b"raised", -1)]


def test_untimed_parameter_sets_alone_are_joined_to_the_picture_that_follows() -> None:
    out, estimated = timed("h264", [packet(SPS + PPS, None, False), packet(AUD + SPS + PPS + IDR_TOP, 0, True),
                                    packet(AUD + P_TOP, 3600, False)])
    assert out == [(SPS + PPS + AUD + SPS + PPS + IDR_TOP, 0), (AUD + P_TOP, 3600)] and estimated is None
