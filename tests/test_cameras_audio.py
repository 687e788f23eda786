"""Cameras with audio, against the real GStreamer RTSP server: every track the camera sends is in every
sealed segment (checked with ffprobe) and in its manifest; audio is bit-exact with what the server sent
(AAC and Opus packet by packet; G.711 byte by byte, back from the 16-bit PCM it is stored as); the
audio of consecutive segments tiles the stream with no gap and no overlap; a segment cut by kill -9
keeps its audio; a camera whose audio disappears (after a reconnect, or mid-stream) raises an alarm while
its video goes on being recorded and reaching the disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import jsonschema
import pytest

from drivers.rtsp import G711_TABLES, g711_to_s16le, s16le_to_g711
from edge_agent.daemon import build_agent
from edge_agent.protocol.wire import schema
from edge_agent.sources.cameras import spool_dir
from tests.helpers import wait_for
from tests.peers.mosquitto import free_port
from tests.peers.rtsp_server import RtspServer
from tests.test_cameras import ROOT, camera, cameras_config, manifest, sealed_segments

# What the camera sends -> what the segment holds, and the sample rate and channels of the track (Opus over
# RTP is always announced as 48000/2, RFC 7587, whatever the encoder was given).
STORED = {"pcmu": ("pcm_mulaw", "pcm_s16le", 8000, 1), "pcma": ("pcm_alaw", "pcm_s16le", 8000, 1),
          "aac": ("aac", "aac", 16000, 1), "opus": ("opus", "opus", 48000, 2)}


class Listener:
    """A second RTSP client on the same (shared) media: the audio packets the server sent, as sent."""

    def __init__(self, url: str):
        self.url = url
        self.packets: list[bytes] = []
        self.codec: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with av.open(self.url, options={"rtsp_transport": "tcp"}) as container:
            audio = container.streams.audio[0]
            self.codec = audio.codec_context.name
            self._ready.set()
            for packet in container.demux(audio):
                if self._stop.is_set():
                    return
                if packet.size:
                    self.packets.append(bytes(packet))

    def __enter__(self) -> Listener:
        self._thread.start()
        assert self._ready.wait(20), "the listener could not open the stream"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)


def ffprobe_streams(path: Path) -> list[dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["streams"]


def audio_packets(path: Path) -> tuple[list[bytes], Fraction, Fraction]:
    """A segment's audio packets, and the time (s) of the first packet's start and the last one's end."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        first = packets[0].pts * stream.time_base
        end = (packets[-1].pts + packets[-1].duration) * stream.time_base
        return [bytes(p) for p in packets], first, end


def decode_g711(codec: str, payloads: list[bytes]) -> bytes:
    """FFmpeg's own G.711 decoder (not ours), as 16-bit samples."""
    ctx = av.CodecContext.create(codec, "r")
    ctx.sample_rate, ctx.layout = 8000, "mono"
    out = bytearray()
    for payload in payloads:
        for frame in ctx.decode(av.Packet(payload)):
            out += bytes(frame.planes[0])[: frame.samples * 2]
    return bytes(out)


def ffmpeg_g711_codes(codec: str, pcm: bytes) -> bytes:
    """G.711 bytes from 16-bit samples by the inverse of FFmpeg's own decoder (not ours): each sample back to
    the code FFmpeg decodes to it; µ-law's two zeros are told apart as documented (0 is 0xFF, -1 is 0x7F)."""
    samples = decode_g711(codec, [bytes(range(256))])
    code_of = {samples[2 * c:2 * c + 2]: c for c in range(256) if not (codec == "pcm_mulaw" and c == 0x7F)}
    if codec == "pcm_mulaw":
        code_of[(-1).to_bytes(2, "little", signed=True)] = 0x7F
    return bytes(code_of[pcm[i:i + 2]] for i in range(0, len(pcm), 2))


def is_contiguous_part(part: list[bytes], whole: list[bytes]) -> bool:
    n = len(part)
    return any(whole[i:i + n] == part for i in range(len(whole) - n + 1))


# The default run proves G.711 (H.265 + µ-law, the Hikvision/Dahua default) and a compressed track (H.264 + AAC);
# the other codecs take the same paths and run in scripts/test_extended.sh.
DEFAULT_AUDIO = {("h265", "pcmu"), ("h264", "aac")}


@pytest.fixture(params=[pytest.param(p, marks=() if p in DEFAULT_AUDIO else pytest.mark.extended)
                        for p in [("h264", audio) for audio in sorted(STORED)] + [("h265", "pcmu")]],
                ids=lambda p: "+".join(p))
def audio_camera(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RtspServer]:
    video, audio = request.param
    server = RtspServer(free_port(), audio=audio, video=video, log=tmp_path / "rtsp.log").start()
    yield server
    server.stop()


def test_g711_stored_as_16_bit_pcm_gives_back_every_code() -> None:
    codes = bytes(range(256))
    for codec in G711_TABLES:
        pcm = g711_to_s16le(codec, codes)
        assert len({pcm[i:i + 2] for i in range(0, 512, 2)}) == 256, f"{codec}: two codes share a sample"
        assert s16le_to_g711(codec, pcm) == codes == ffmpeg_g711_codes(codec, pcm)
        # The samples FFmpeg decodes to, but for µ-law's negative zero (0x7F): -1 here, 0 there.
        ffmpeg = decode_g711(codec, [codes])
        differ = [c for c in range(256) if pcm[2 * c:2 * c + 2] != ffmpeg[2 * c:2 * c + 2]]
        assert differ == ([0x7F] if codec == "pcm_mulaw" else [])
    with pytest.raises(ValueError, match="no pcm_alaw code"):
        s16le_to_g711("pcm_alaw", b"\x00\x00")


def test_every_track_is_kept_bit_exact_and_audio_tiles_the_segments(tmp_path: Path, audio_camera: RtspServer) -> None:
    sent_codec, stored_codec, rate, channels = STORED[audio_camera.audio]
    video_codec = "hevc" if audio_camera.video == "h265" else "h264"
    _, cfg = cameras_config(tmp_path, [camera("gate-north", rtsp=audio_camera.url)])
    with Listener(audio_camera.url) as heard:
        agent = build_agent(cfg)
        agent.start()
        try:
            segments = wait_for(lambda: (s := sealed_segments(agent.catalog, "gate-north")) and len(s) >= 4 and s,
                                timeout=40, what="four sealed segments")
            status = agent.cameras.camera_status()[0]
        finally:
            agent.stop()
    data_dir = cfg.agent.data_dir
    assert heard.codec == sent_codec
    assert status["audio"] == {"present": True, "codec": sent_codec, "lost": False,
                               "last_packet_ms": status["audio"]["last_packet_ms"]}
    assert [t["kind"] for t in status["tracks"]] == ["video", "audio"]

    # Only a connection's first picture may be timed by estimate (docs/CAMERAS.md "A connection's first
    # picture"): H.265's, when this client's first picture is a keyframe (the listener joined the shared media
    # first, so it may not be); H.264's sliced keyframe is joined to its camera-timed rest, never estimated.
    documents = [manifest(data_dir, s.file_id) for s in segments]
    for document in documents:
        jsonschema.validate(document, schema("manifest"))
    timings = [document.get("timing") for document in documents]
    assert timings[1:] == [None] * (len(segments) - 1)
    assert timings[0] is None or (video_codec == "hevc" and timings[0]["first_picture"] == "estimated")

    stored: list[bytes] = []
    previous_audio_end_ms: float | None = None
    for s in segments:
        path = data_dir / s.store_path
        streams = ffprobe_streams(path)
        kinds = [(p["codec_type"], p["codec_name"]) for p in streams]
        assert kinds == [("video", video_codec), ("audio", stored_codec)]
        tracks = json.loads(s.media)["tracks"]
        assert tracks == manifest(data_dir, s.file_id)["media"]["tracks"]
        assert tracks[0] == {"kind": "video", "codec": video_codec, "width": 320, "height": 180, "fps": "25/1"}
        expected_audio = {"kind": "audio", "codec": stored_codec, "sample_rate": rate, "channels": channels}
        if stored_codec != sent_codec:
            expected_audio["original_codec"] = sent_codec
        assert tracks[1] == expected_audio
        payloads, first, end = audio_packets(path)
        stored += payloads
        first_ms, end_ms = s.recorded_start_ms + float(first) * 1000, s.recorded_start_ms + float(end) * 1000
        # The audio of a segment is the audio between its cut points: within one packet of them.
        assert abs(first_ms - s.recorded_start_ms) <= 130 and abs(end_ms - s.recorded_end_ms) <= 130
        if previous_audio_end_ms is not None:   # no gap, no overlap with the segment before
            assert abs(first_ms - previous_audio_end_ms) <= 1
        previous_audio_end_ms = end_ms
    # Summed durations equal wall time from the first segment's audio to the last one's.
    total_s = sum(float(audio_packets(data_dir / s.store_path)[2] - audio_packets(data_dir / s.store_path)[1])
                  for s in segments)
    span_ms = previous_audio_end_ms - (segments[0].recorded_start_ms
                                       + float(audio_packets(data_dir / segments[0].store_path)[1]) * 1000)
    assert total_s * 1000 == pytest.approx(span_ms, abs=len(segments))

    if stored_codec == sent_codec:   # AAC, Opus: the very packets the server sent, in order, none missing
        assert is_contiguous_part(stored, heard.packets)
    else:                            # G.711: the stored samples give back the very bytes sent
        again = ffmpeg_g711_codes(sent_codec, b"".join(stored))
        assert len(again) > 4 * rate and again in b"".join(heard.packets)


def test_kill9_leaves_a_playable_segment_with_its_audio(tmp_path: Path) -> None:
    server = RtspServer(free_port(), audio="pcmu", log=tmp_path / "rtsp.log").start()
    try:
        config_path, cfg = cameras_config(tmp_path, [camera("yard", rtsp=server.url, segment_s=30)])
        spool = spool_dir(cfg.agent.data_dir, "yard")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(tmp_path / "agent.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config_path), "run"],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            cut = wait_for(lambda: next((p for p in spool.glob("*.mkv") if p.stat().st_size > 60_000), None),
                           timeout=40, what="a segment being written")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        server.stop()
    with av.open(str(cut)) as container:
        video = sum(1 for _ in container.decode(video=0))
    with av.open(str(cut)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    # At least a second of video, and the audio beside it, decodable without the agent: audio is written
    # a packet (128 ms) behind the video, and the muxer interleaves the tracks, so the audio may end two
    # packets before the video does.
    assert video >= 25 and samples >= 8000 * (video / 25 - 0.26)


def test_a_camera_whose_audio_disappears_raises_an_alarm(tmp_path: Path) -> None:
    port = free_port()
    server = RtspServer(port, audio="pcma", log=tmp_path / "rtsp.log").start()
    _, cfg = cameras_config(tmp_path, [camera("gate-south", rtsp=server.url)])
    agent = build_agent(cfg)
    agent.start()
    try:
        wait_for(lambda: agent.cameras.camera_status()[0]["audio"]["present"], timeout=30, what="audio present")
        assert not agent.catalog.query("SELECT * FROM alarms WHERE key = 'camera.gate-south.audio_lost'")
        server.stop()   # the camera comes back without its audio track (reconfigured, microphone failed)
        server = RtspServer(port, audio="none", log=tmp_path / "rtsp.log").start()
        alarm = wait_for(lambda: agent.catalog.query(
            "SELECT * FROM alarms WHERE key = 'camera.gate-south.audio_lost' AND cleared_ms IS NULL"),
            timeout=40, what="the audio_lost alarm")[0]
        status = agent.cameras.camera_status()[0]
        assert status["audio"]["present"] is False and status["audio"]["lost"] is True
        assert status["connected"] and status["recording"]   # the video is still recorded
        assert "audio lost" in alarm["message"]
        server.stop()
        server = RtspServer(port, audio="pcma", log=tmp_path / "rtsp.log").start()
        wait_for(lambda: agent.catalog.query(
            "SELECT * FROM alarms WHERE key = 'camera.gate-south.audio_lost' AND cleared_ms IS NULL") == [],
            timeout=40, what="the audio_lost alarm cleared")
    finally:
        agent.stop()
        server.stop()


def test_audio_that_stops_mid_stream_is_an_alarm_and_the_video_goes_on(tmp_path: Path) -> None:
    server = RtspServer(free_port(), audio="pcmu", audio_s=4, log=tmp_path / "rtsp.log").start()
    _, cfg = cameras_config(tmp_path, [camera("gate-west", rtsp=server.url)])
    agent = build_agent(cfg)
    agent.start()
    try:
        wait_for(lambda: agent.cameras.camera_status()[0]["audio"]["present"], timeout=30, what="audio present")
        alarm = wait_for(lambda: agent.catalog.query(
            "SELECT * FROM alarms WHERE key = 'camera.gate-west.audio_lost' AND cleared_ms IS NULL"),
            timeout=30, what="the audio_lost alarm")[0]
        lost_at = alarm["raised_ms"]
        # Segments go on, with their video, after the audio stopped, on the same connection.
        after = wait_for(lambda: [s for s in sealed_segments(agent.catalog, "gate-west")
                                  if s.recorded_start_ms > lost_at][:2], timeout=30, what="segments after the loss")
        status = agent.cameras.camera_status()[0]
        gaps = agent.catalog.query("SELECT * FROM gaps WHERE camera = 'gate-west'")
    finally:
        agent.stop()
        server.stop()
    assert "no audio packet" in alarm["message"]
    assert not gaps   # one connection throughout: losing the audio is not a recording gap
    assert status["audio"]["present"] is False and status["audio"]["lost"] is True and status["recording"]
    for s in after:
        with av.open(str(cfg.agent.data_dir / s.store_path)) as container:
            assert sum(1 for _ in container.decode(video=0)) >= 45   # about 2 s at 25 fps


def test_video_reaches_the_disk_while_the_audio_is_silent(tmp_path: Path) -> None:
    """The muxer interleaves tracks by waiting for each; a silent audio track must not hold the video in
    memory (FFmpeg would wait 10 s by default), where a crash would lose it."""
    server = RtspServer(free_port(), audio="pcmu", audio_s=2, log=tmp_path / "rtsp.log").start()
    _, cfg = cameras_config(tmp_path, [camera("dock-gate", rtsp=server.url, segment_s=60)])
    spool = spool_dir(cfg.agent.data_dir, "dock-gate")
    agent = build_agent(cfg)
    agent.start()

    def frames_on_disk() -> int:
        path = next(iter(spool.glob("*.mkv")), None)
        if path is None:
            return 0
        with av.open(str(path)) as container:
            return sum(1 for _ in container.demux(video=0) if _.size)

    try:
        wait_for(lambda: agent.catalog.query("SELECT * FROM alarms WHERE key = 'camera.dock-gate.audio_lost'"),
                 timeout=30, what="the audio_lost alarm")   # about 5 s of stream: 2 s of audio, then 3 s silent
        # 7 s of video on disk within 4 s of the alarm: the muxer did not wait for the audio (FFmpeg's default
        # would hold it until 12 s of stream)
        wait_for(lambda: frames_on_disk() >= 7 * 25, timeout=4, interval=0.5, what="7 s of video in the file")
    finally:
        agent.stop()
        server.stop()
