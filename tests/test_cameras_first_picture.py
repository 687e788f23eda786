"""A connection's first picture is recorded, byte for byte as the server sent it: the recorder reaches the
real GStreamer RTSP server through a tap (tests/peers/rtsp_tap.py) that keeps what the server sent it, and
the first segment's NAL units are exactly those, from the first picture on (H.264 with x264's sliced
threads: the untimed top slice joined to the rest of its picture, camera-timed, and every later sliced
keyframe one packet; H.265: the untimed first keyframe kept, its time an estimate the segment says it
is). The first segment decodes from its first picture: one decoded picture per picture sent."""

from __future__ import annotations

import threading
from pathlib import Path

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
    tap = RtspTap(server.port).start()
    heard = Collector()
    recorder = RtspRecorder("gate", lambda: tap.url(MOUNT), tmp_path / "spool", heard, segment_s=0.5,
                            stall_timeout_s=5)
    thread = threading.Thread(target=recorder.run, daemon=True)
    thread.start()
    try:
        assert heard.done.wait(30), "two segments were not recorded"
    finally:
        recorder.stop()
        thread.join(20)
        tap.close()
        server.stop()
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
