"""Cameras against a real GStreamer RTSP server and a real ONVIF SOAP service: segments of the configured
length that play, contiguous in time; an outage of N seconds is exactly one gap of about N seconds with
its cause, named in the next segment's manifest and sent as events; the gap ledger answers "was it
recording at ...?"; a kill -9 mid-segment leaves a playable segment and an agent_stopped gap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import av
import jsonschema
import pytest
from typer.testing import CliRunner

from edge_agent.catalog import Catalog
from edge_agent.cli import app
from edge_agent.daemon import build_agent
from edge_agent.ops.health import load_schema
from edge_agent.sources.cameras import spool_dir
from tests.helpers import agent_config, wait_for
from tests.peers.mosquitto import free_port
from tests.peers.onvif_service import OnvifCamera
from tests.peers.rtp_mute import RtpMute
from tests.peers.rtsp_server import RtspServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rtsp(tmp_path: Path) -> Iterator[RtspServer]:
    server = RtspServer(free_port(), log=tmp_path / "rtsp.log").start()
    yield server
    server.stop()


def camera(name: str, *, segment_s: int = 2, **keys: object) -> dict[str, object]:
    return {"name": name, "segment_s": segment_s, "stall_timeout_s": 3, "reconnect_max_s": 1,
            "image_check_s": 1, "location": "鼓楼区中山路口", "location_kind": "intersection", **keys}


def cameras_config(tmp_path: Path, cameras: list[dict[str, object]], **agent: object):
    """agent.toml with these cameras; its uplink points at a port where no broker listens, so camera
    tests never publish into a broker someone else runs on this machine."""
    return agent_config(tmp_path, cameras=cameras, mqtt={"port": free_port()}, agent=agent or None)


def sealed_segments(catalog: Catalog, name: str) -> list:
    return catalog.files(states=["sealed"], where="kind = 'camera' AND original_path LIKE ?", params=(f"{name}/%",),
                         order="recorded_start_ms")


def manifest(data_dir: Path, file_id: str) -> dict:
    return json.loads((data_dir / "manifests" / file_id[-2:] / f"{file_id}.json").read_text())


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_onvif_camera_records_playable_contiguous_segments_of_the_configured_length(
        tmp_path: Path, rtsp: RtspServer) -> None:
    pw = tmp_path / "cam.pass"
    pw.write_text("secret-1\n")
    pw.chmod(0o600)
    onvif_cam = OnvifCamera(free_port(), rtsp.url, password="secret-1", clock_offset_s=-3).start()
    try:
        _, cfg = cameras_config(tmp_path, [camera("gate-east", onvif=onvif_cam.url, username="admin",
                                                  password_file=str(pw))])
        agent = build_agent(cfg)
        agent.start()
        try:
            segments = wait_for(lambda: (s := sealed_segments(agent.catalog, "gate-east")) and len(s) >= 4 and s,
                                timeout=40, what="four sealed segments")
            status = agent.cameras.camera_status()[0]
        finally:
            agent.stop()
    finally:
        onvif_cam.stop()

    data_dir = cfg.agent.data_dir
    serial = "DS-2CD2T47G2-L20231105AACH123456789"
    assert {s.device_id for s in segments} == {serial}
    for s in segments:
        assert s.lane == 2 and s.kind == "camera"
        assert decoded_frames(data_dir / s.store_path) > 0
        doc = manifest(data_dir, s.file_id)
        assert doc["source"]["kind"] == "camera" and doc["source"]["serial"] == serial
        assert doc["camera"]["location"] == "鼓楼区中山路口"
        assert -4500 <= doc["clock_offset_ms"] <= -1500      # the camera's clock runs 3 s behind
        assert json.loads(s.media)["container"] == "mkv"
    # Segments after the first are cut on the first keyframe (one per second) past segment_s: 2 s each.
    for s in segments[1:-1]:
        assert 1900 <= s.recorded_end_ms - s.recorded_start_ms <= 2100
        assert json.loads(s.media)["duration_ms"] == pytest.approx(2000, abs=100)
    # One connection: each segment starts where the one before ended, never before it.
    for before, after in zip(segments, segments[1:], strict=False):
        assert after.recorded_start_ms == before.recorded_end_ms
    assert not list(spool_dir(data_dir, "gate-east").glob("*.mkv"))   # taken in, spool emptied
    assert status["connected"] and status["fps"] > 0 and status["device_id"] == serial
    assert status["segments_today"] >= 4 and -4500 <= status["clock_offset_ms"] <= -1500


def test_server_outage_is_exactly_one_gap_of_its_length_with_its_cause(tmp_path: Path, rtsp: RtspServer) -> None:
    config_path, cfg = cameras_config(tmp_path, [camera("gate-west", rtsp=rtsp.url)])
    agent = build_agent(cfg)
    agent.start()
    outage_s = 4.0
    try:
        wait_for(lambda: sealed_segments(agent.catalog, "gate-west"), timeout=30, what="a first segment")
        rtsp.stop()
        down_ms = int(time.time() * 1000)
        time.sleep(outage_s)   # the outage itself: the camera is off for this long
        rtsp.start()
        up_ms = int(time.time() * 1000)
        gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'gate-west' AND end_ms "
                                                   "IS NOT NULL"), timeout=30, what="the gap to close")[0]
        after = wait_for(lambda: [s for s in sealed_segments(agent.catalog, "gate-west")
                                  if s.recorded_start_ms == gap["end_ms"]], timeout=30, what="segment after gap")[0]
    finally:
        agent.stop()

    catalog = Catalog(cfg.catalog_path)
    rows = catalog.query("SELECT * FROM gaps WHERE camera = 'gate-west'")
    assert len(rows) == 1, [dict(r) for r in rows]
    assert gap["cause"] == "stream_lost"
    assert gap["start_ms"] <= down_ms + 500 and gap["end_ms"] >= up_ms - 500
    assert outage_s - 0.5 <= (gap["end_ms"] - gap["start_ms"]) / 1000 <= outage_s + 4
    doc = manifest(cfg.agent.data_dir, after.file_id)
    assert [g["id"] for g in doc["gaps_before"]] == [gap["id"]] and doc["gaps_before"][0]["cause"] == "stream_lost"
    events = [json.loads(r["payload"]) for r in catalog.query("SELECT payload FROM outbox")]
    gap_events = [e for e in events if e["type"] == "gap"]
    assert [(e["state"], e["kind"], e["gap_id"]) for e in gap_events] == [
        ("open", "stream_lost", gap["id"]), ("closed", "stream_lost", gap["id"])]
    assert gap_events[1]["end_ms"] == gap["end_ms"]

    # The ledger answers the custodian's question both ways.
    runner = CliRunner()
    middle = (gap["start_ms"] + gap["end_ms"]) // 2
    answer = runner.invoke(app, ["--config", str(config_path), "--json", "devices", "gaps", "gate-west", "--at",
                                 _iso(middle)])
    assert answer.exit_code == 1, answer.output
    assert json.loads(answer.output)["gap"]["cause"] == "stream_lost"
    answer = runner.invoke(app, ["--config", str(config_path), "devices", "gaps", "gate-west", "--at",
                                 _iso(after.recorded_start_ms + 500)])
    assert answer.exit_code == 0 and answer.output.startswith("yes"), answer.output
    listing = runner.invoke(app, ["--config", str(config_path), "--json", "devices", "gaps", "gate-west",
                                  "--since", "1h"])
    assert [g["id"] for g in json.loads(listing.output)] == [gap["id"]]


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def test_kill9_mid_segment_leaves_a_playable_segment_and_an_agent_stopped_gap(
        tmp_path: Path, rtsp: RtspServer) -> None:
    config_path, cfg = cameras_config(tmp_path, [camera("yard", rtsp=rtsp.url, segment_s=30)])
    spool = spool_dir(cfg.agent.data_dir, "yard")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config_path), "run"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "wb"))
    try:
        # Three keyframes (three clusters) are in the file: it is well into a 30 s segment.
        cut = wait_for(lambda: next((p for p in spool.glob("*.mkv") if p.stat().st_size > 60_000), None),
                       timeout=40, what="a segment being written")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert decoded_frames(cut) >= 25   # the cut file plays on its own, before the agent touches it again

    agent = build_agent(cfg)
    agent.start()
    try:
        taken = wait_for(lambda: agent.catalog.files(states=["sealed"], where="original_path = ?",
                                                     params=(f"yard/{cut.name}",)), timeout=30,
                         what="the cut segment sealed")[0]
        gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'yard' AND end_ms IS NOT NULL"),
                       timeout=30, what="the downtime gap closed")[0]
    finally:
        agent.stop()
    assert decoded_frames(cfg.agent.data_dir / taken.store_path) >= 25
    assert manifest(cfg.agent.data_dir, taken.file_id)["camera"]["name"] == "yard"
    assert taken.recorded_end_ms > taken.recorded_start_ms + 900
    assert gap["cause"] == "agent_stopped" and gap["start_ms"] == taken.recorded_end_ms
    assert gap["end_ms"] > gap["start_ms"]


def test_forbidden_location_is_refused_and_locations_are_listed_for_announcement(tmp_path: Path) -> None:
    from edge_agent.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        agent_config(tmp_path, cameras=[camera("hall", rtsp="rtsp://127.0.0.1/x", location_kind="changing_room")])
    assert refused.value.problems[0].key == "cameras[0].location_kind"
    assert "R11" in refused.value.problems[0].message

    market = camera("market", rtsp="rtsp://127.0.0.1/b", location="农贸市场北门", location_kind="market")
    config_path, _ = agent_config(tmp_path, cameras=[camera("gate-east", rtsp="rtsp://127.0.0.1/a"), market])
    result = CliRunner().invoke(app, ["--config", str(config_path), "devices", "locations", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["name,location,location_kind", "gate-east,鼓楼区中山路口,intersection",
                                          "market,农贸市场北门,market"]


def test_one_dead_camera_does_not_disturb_another(tmp_path: Path, rtsp: RtspServer) -> None:
    dead = f"rtsp://127.0.0.1:{free_port()}/cam"   # nothing listens there
    _, cfg = cameras_config(tmp_path, [camera("dead", rtsp=dead), camera("alive", rtsp=rtsp.url)])
    agent = build_agent(cfg)
    agent.start()
    try:
        wait_for(lambda: len(sealed_segments(agent.catalog, "alive")) >= 2, timeout=30, what="two live segments")
        snapshot = agent.operations.health.snapshot()
    finally:
        agent.stop()
    jsonschema.validate(snapshot, load_schema())   # the health snapshot carries camera_status() as is
    status = {s["name"]: s for s in snapshot["cameras"]}
    gaps = Catalog(cfg.catalog_path).query("SELECT camera, cause, end_ms FROM gaps")
    assert [(g["camera"], g["cause"], g["end_ms"]) for g in gaps] == [("dead", "stream_lost", None)]
    assert status["alive"]["recording"] and status["alive"]["segments_today"] >= 2
    assert not status["dead"]["connected"] and status["dead"]["gaps_today"] == 1
    assert "refused" in status["dead"]["last_error"].lower()


def test_no_room_on_disk_is_a_disk_full_gap(tmp_path: Path, rtsp: RtspServer) -> None:
    _, cfg = cameras_config(tmp_path, [camera("gate-south", rtsp=rtsp.url)], min_free_mb=1 << 40)
    agent = build_agent(cfg)
    agent.start()
    try:
        gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'gate-south'"), timeout=30,
                       what="a gap")[0]
    finally:
        agent.stop()
    assert gap["cause"] == "disk_full" and "agent.min_free_mb" in gap["detail"]
    assert not list(spool_dir(cfg.agent.data_dir, "gate-south").glob("*.mkv"))


def test_rtsp_login_refused_is_an_auth_failed_gap_and_the_right_password_records(tmp_path: Path) -> None:
    server = RtspServer(free_port(), credentials=("viewer", "Zs-2026"), log=tmp_path / "rtsp.log").start()
    try:
        for name, secret in (("east-wrong", "wrong"), ("east-right", "Zs-2026")):
            pw = tmp_path / f"{name}.pass"
            pw.write_text(secret + "\n")
            pw.chmod(0o600)
        _, cfg = cameras_config(tmp_path, [
            camera(name, rtsp=server.url, username="viewer", password_file=str(tmp_path / f"{name}.pass"))
            for name in ("east-wrong", "east-right")])
        agent = build_agent(cfg)
        agent.start()
        try:
            wait_for(lambda: sealed_segments(agent.catalog, "east-right"), timeout=30, what="a segment with login")
            gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'east-wrong'"),
                           timeout=30, what="the refused camera's gap")[0]
        finally:
            agent.stop()
    finally:
        server.stop()
    assert gap["cause"] == "auth_failed" and "password_file" in gap["detail"] and "viewer:wrong" not in gap["detail"]
    assert not Catalog(cfg.catalog_path).query("SELECT * FROM gaps WHERE camera = 'east-right'")


def test_stalled_stream_is_detected_and_recording_resumes(tmp_path: Path, rtsp: RtspServer) -> None:
    _, cfg = cameras_config(tmp_path, [camera("bridge", rtsp=rtsp.url)])   # stall_timeout_s = 3
    agent = build_agent(cfg)
    agent.start()
    try:
        wait_for(lambda: sealed_segments(agent.catalog, "bridge"), timeout=30, what="a first segment")
        rtsp.freeze()
        try:
            gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'bridge'"), timeout=20,
                           what="the stall noticed")[0]
            assert not agent.cameras.camera_status()[0]["recording"]
        finally:
            rtsp.thaw()
        closed = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'bridge' AND end_ms IS NOT "
                                                      "NULL"), timeout=30, what="recording resumed")[0]
    finally:
        agent.stop()
    assert gap["cause"] == "stream_lost" and closed["id"] == gap["id"]
    assert "stalled" in closed["detail"], closed["detail"]


@pytest.mark.parametrize("watched_by", ["stall watch", "read timeout"])
def test_a_camera_sending_rtcp_but_no_media_is_a_stall(tmp_path: Path, rtsp: RtspServer, watched_by: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder that hangs while the camera's RTP stack lives: the connection never goes quiet (RTCP every
    half second), yet no packet comes. It is a stall all the same (the stall watch: no video packet for
    stall_timeout_s, drivers/stall_watch.py), not something only a silent socket reveals. Where the watch cannot
    find the camera's socket (here: the socket table reads empty, as with /proc/net hidden), the stream is opened
    again under PyAV's read timeout, which catches the same stall."""
    if watched_by == "read timeout":
        from drivers import stall_watch
        monkeypatch.setattr(stall_watch, "tcp_connections", lambda port: set())
    mute = RtpMute(rtsp.port).start()
    _, cfg = cameras_config(tmp_path, [camera("bridge", rtsp=mute.url("/cam"))])   # stall_timeout_s = 3
    agent = build_agent(cfg)
    agent.start()
    try:
        wait_for(lambda: sealed_segments(agent.catalog, "bridge"), timeout=30, what="a first segment")
        mute.mute()
        gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'bridge'"), timeout=20,
                       what="the stall noticed while RTCP still flows")[0]
        rtcp = mute.rtcp_sent_muted
        mute.unmute()
        closed = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'bridge' AND end_ms IS NOT "
                                                      "NULL"), timeout=30, what="recording resumed")[0]
    finally:
        agent.stop()
        mute.close()
    assert rtcp >= 4, f"only {rtcp} RTCP frames reached the agent while muted: the connection went quiet"
    assert gap["cause"] == "stream_lost" and closed["id"] == gap["id"]
    assert "stalled" in closed["detail"], closed["detail"]


def _stall_one_of_two(agent, mute: RtpMute, stalled: str, other: str) -> list:
    """Mute `stalled` until its gap opens, see `other` seal two more segments, unmute: `stalled`'s gaps."""
    def gaps(name: str, closed: bool = False) -> list:
        return agent.catalog.query("SELECT * FROM gaps WHERE camera = ?" + (" AND end_ms IS NOT NULL" if closed else "")
                                   + " ORDER BY id", (name,))

    mute.mute(stalled)
    wait_for(lambda: gaps(stalled), timeout=20, what=f"{stalled}'s stall noticed")
    before = len(sealed_segments(agent.catalog, other))
    wait_for(lambda: len(sealed_segments(agent.catalog, other)) >= before + 2, timeout=30,
             what=f"{other} recording on after {stalled}'s connection was cut")
    mute.unmute()
    wait_for(lambda: gaps(stalled, closed=True), timeout=30, what=f"{stalled} recording again")
    return gaps(stalled)


def test_two_cameras_on_one_address_only_the_stalled_ones_connection_is_cut(tmp_path: Path, rtsp: RtspServer) -> None:
    """Two cameras behind one address and port, recorded by one process (two channels of one NVR): the stall watch
    finds each camera's own connection among the process's sockets, so when one camera's video stops (RTCP still
    flowing), only its connection is cut, and the other records on without a gap. Each camera stalls in turn, so
    a watch that took the same socket for both (the first one open to that address) fails one of the turns."""
    mute = RtpMute(rtsp.port).start()
    _, cfg = cameras_config(tmp_path, [camera("east", rtsp=mute.url("/cam?east")),
                                       camera("west", rtsp=mute.url("/cam?west"))])   # stall_timeout_s = 3
    agent = build_agent(cfg)
    agent.start()
    gaps = {}
    try:
        wait_for(lambda: sealed_segments(agent.catalog, "east") and sealed_segments(agent.catalog, "west"),
                 timeout=30, what="a first segment of each camera")
        for stalled, other in (("east", "west"), ("west", "east")):
            gaps[stalled] = _stall_one_of_two(agent, mute, stalled, other)
    finally:
        agent.stop()
        mute.close()
    for name, found in gaps.items():   # one gap each, its own stall, closed: none while the other one stalled
        assert len(found) == 1, (name, found)
        assert found[0]["cause"] == "stream_lost" and "stalled" in found[0]["detail"], found[0]


def test_a_camera_whose_video_comes_only_after_the_connect_is_recorded_at_its_size_without_a_gap(
        tmp_path: Path, rtsp: RtspServer) -> None:
    """FFmpeg's probe at connect gives up when no video comes before the open timeout (a camera still starting,
    an NVR channel without signal): the stream then has no picture size, and the Matroska muxer refuses to start
    a file without one ("dimensions not set", EINVAL at the first write: a reconnect and a gap, seen in CI). The
    recorder learns the size from the connection's first keyframe and records from there, on that connection."""
    mute = RtpMute(rtsp.port).start()
    mute.mute()   # RTSP answers and RTCP pass; no video until unmuted
    _, cfg = cameras_config(tmp_path, [camera("gate", rtsp=mute.url("/cam"))])   # stall_timeout_s = 3
    agent = build_agent(cfg)
    agent.start()
    stats = agent.cameras.workers["gate"].recorder.stats
    try:
        # connected (the open timed the probe out), not yet cut by the stall watch (3 s without video)
        wait_for(lambda: stats.connected, timeout=30, what="the connection opened while no video came")
        probed = (stats.width, stats.height)
        mute.unmute()
        segment = wait_for(lambda: sealed_segments(agent.catalog, "gate"), timeout=30, what="a first segment")[0]
        gaps = agent.catalog.query("SELECT * FROM gaps WHERE camera = 'gate'")
        learnt = (stats.width, stats.height, [t for t in stats.tracks if t["kind"] == "video"])
    finally:
        agent.stop()
        mute.close()
    assert probed == (0, 0), f"the probe found the size {probed}: this test did not make it give up"
    assert not gaps, [dict(g) for g in gaps]
    assert learnt[:2] == (320, 180) and learnt[2][0]["width"] == 320 and learnt[2][0]["height"] == 180
    stored = cfg.agent.data_dir / segment.store_path
    with av.open(str(stored)) as recorded:
        video = recorded.streams.video[0]
        assert (video.codec_context.width, video.codec_context.height) == (320, 180)
    assert decoded_frames(stored) > 0
    assert {"kind": "video", "codec": "h264", "width": 320, "height": 180}.items() <= \
        json.loads(segment.media)["tracks"][0].items()


@pytest.mark.parametrize(("encoder", "codec"), [("libx264", "h264"), ("libx265", "hevc")])
def test_picture_size_is_read_from_a_keyframe_as_cameras_send_it(encoder: str, codec: str) -> None:
    """`picture_size` (what `RtspRecorder._learn_size` uses): a keyframe in start-code form, parameter sets in
    band as cameras send them before each IDR, gives its size; bytes that are no picture give None."""
    from fractions import Fraction

    import numpy as np

    from drivers.rtsp import picture_size

    context = av.CodecContext.create(encoder, "w")
    context.width, context.height, context.pix_fmt = 352, 198, "yuv420p"
    context.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.full((198, 352, 3), 90, np.uint8), format="rgb24").reformat(
        format="yuv420p")
    frame.pts = 0
    keyframe = b"".join(bytes(p) for p in [*context.encode(frame), *context.encode(None)][:1])
    assert keyframe.startswith((b"\0\0\0\1", b"\0\0\1"))   # start-code form: what the RTSP demuxer gives
    assert picture_size(codec, None, keyframe) == (352, 198)
    assert picture_size(codec, None, bytes(range(256)) * 8) is None


@pytest.mark.parametrize(("frame_bytes", "pace_ms", "expected_sleep_s"),
                         [(5_000, 250, 0.25),          # 1 Mbit/s: the full pace (64 kB would take 0.52 s)
                          (40_000, 250, 0.0655),       # 8 Mbit/s: 64 kB of it, 0.066 s
                          (5_000, 0, None)])           # pacing off: each packet read as it comes
def test_a_camera_that_has_been_read_up_to_date_is_read_again_after_a_pause(
        tmp_path: Path, frame_bytes: int, pace_ms: int, expected_sleep_s: float | None) -> None:
    """`RtspRecorder._batched` paces its reads: once a read had to wait for the camera (all it sent was read),
    the reader sleeps (`read_pace_ms`, less for a fast stream: at most PACE_BYTES wait in the socket), then reads
    what gathered in one go. Simulated camera: a picture every 40 ms; a read returns the next picture once it
    was sent; the reader's sleeps move the clock. Every picture is handed on, in order, stamped when read."""
    from drivers.rtsp import PACE_BYTES, RtspRecorder

    clock = {"now": 0.0}
    sleeps: list[float] = []
    recorder = RtspRecorder("cam", lambda: "rtsp://unused", tmp_path, listener=None, segment_s=10,
                            stall_timeout_s=10, pace_s=pace_ms / 1000)
    recorder._clock.wall0 = recorder._clock.mono0 = 0.0
    recorder._clock.monotonic = lambda: clock["now"]

    def sleep(seconds: float) -> bool:
        sleeps.append((clock["now"], seconds))
        clock["now"] += seconds
        return False

    recorder._stop = SimpleNamespace(wait=sleep)
    sent = [n * 0.040 for n in range(250)]   # 10 s of pictures, a keyframe each second
    wakeups = []

    def camera() -> Iterator[SimpleNamespace]:
        for n, at in enumerate(sent):
            if at > clock["now"]:
                wakeups.append(at)   # nothing had come: the read waits for this picture
                clock["now"] = at
            yield SimpleNamespace(n=n, stream_index=0, is_keyframe=n % 25 == 0, size=frame_bytes)

    got = []
    for packet, received in recorder._batched(camera(), 0):
        got.append((packet.n, received))
        recorder.stats.bytes += packet.size   # as `_remux` counts what it handles

    assert [n for n, _ in got] == list(range(len(sent)))
    assert recorder._pace(5.0, 0) == 0.0   # no video handled yet (no keyframe): no rate, no pause
    slept = [seconds for _, seconds in sleeps]
    longest = max(slept, default=0.0)
    assert all(sent[n] * 1000 <= received <= (sent[n] + longest + 0.040) * 1000 + 1e-6 for n, received in got)
    if expected_sleep_s is None:
        assert not sleeps and len(wakeups) == len(sent) - 1
        return
    assert sleeps and min(at for at, _ in sleeps) >= 2.0   # no rate known before: no pause
    assert longest <= pace_ms / 1000 + 1e-9
    assert slept[-1] == pytest.approx(expected_sleep_s, rel=0.05)
    assert min(slept) >= min(pace_ms / 1000, PACE_BYTES / (frame_bytes * 25)) * 0.95
    if expected_sleep_s >= 0.1:   # paced: one wake-up per pause, not one per picture
        paced = [at for at in wakeups if at >= 3.0]
        assert len(paced) <= (sent[-1] - 3.0) / expected_sleep_s + 1
        assert len(paced) < len([at for at in sent if at >= 3.0]) / 4


def test_fps_and_bitrate_do_not_jump_with_the_moment_they_are_read() -> None:
    """Packets are counted a batch at a time (about a second of video), so health's fps and bitrate are measured
    between batch ends: read at any moment between two batches, a steady 25 fps, 1000 kbit/s camera reads 25 and
    1000 (read against the moment of reading, they swung by a batch: ±10 % over 5 s). A camera whose batches
    stop reads falling rates; a disconnected one reads 0."""
    from drivers.rtsp import RATE_STALE_S, StreamStats

    stats = StreamStats(connected=True)
    for second in range(1, 31):   # a batch a second: 25 pictures, 125 kB
        stats.packets += 25
        stats.bytes += 125_000
        stats.handled(float(second))
    for phase in (0.05, 0.3, 0.6, 0.95, 2.0):
        fps, kbps = stats.rates(now=30 + phase)
        assert (fps, kbps) == (pytest.approx(25), pytest.approx(1000)), phase
    fps, kbps = stats.rates(now=30 + RATE_STALE_S + 3)
    assert fps < 25 * 0.75 and kbps < 1000 * 0.75
    stats.connected = False
    assert stats.rates(now=31) == (0.0, 0.0)


def test_a_wall_clock_step_is_a_clock_step_gap_and_segments_stay_monotonic(tmp_path: Path, rtsp: RtspServer) -> None:
    """NTP stepping the system clock forward: segments are timed from the monotonic clock anchored to the wall
    clock, so the step shows as a difference between the two; it must become a `clock_step` gap, not silence."""
    _, cfg = cameras_config(tmp_path, [camera("gate-north", rtsp=rtsp.url)])
    agent = build_agent(cfg)
    agent.start()
    step_s = 5.0
    try:
        wait_for(lambda: sealed_segments(agent.catalog, "gate-north"), timeout=30, what="a first segment")
        # The system clock jumps ahead by step_s: the recorder's anchor now lags the wall clock by that much.
        agent.cameras.workers["gate-north"].recorder._clock.wall0 -= step_s
        # Under load a stall may open a gap of its own first; the step's gap is the closed clock_step one.
        gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'gate-north' AND cause ="
                                                   " 'clock_step' AND end_ms IS NOT NULL"),
                       timeout=30, what="the clock_step gap")[0]
        after = wait_for(lambda: [s for s in sealed_segments(agent.catalog, "gate-north")
                                  if s.recorded_start_ms >= gap["end_ms"]], timeout=30, what="segment after step")[0]
    finally:
        agent.stop()
    assert gap["cause"] == "clock_step"
    stepped_ms = int(gap["detail"].rsplit("by ", 1)[1].split(" ms")[0])
    assert abs(stepped_ms - step_s * 1000) <= 500, gap["detail"]
    assert step_s - 0.5 <= (gap["end_ms"] - gap["start_ms"]) / 1000 <= step_s + 0.5
    starts = [s.recorded_start_ms for s in sealed_segments(Catalog(cfg.catalog_path), "gate-north")]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert "clock_step" in [g["cause"] for g in manifest(cfg.agent.data_dir, after.file_id)["gaps_before"]]


def test_packets_are_handled_in_batches_each_with_the_time_it_came(tmp_path: Path) -> None:
    """`RtspRecorder._batched`, then `_timed` over each batch (as `_remux` reads a connection): a packet is stamped,
    and counted for the stall watch, as it comes; a batch is handed on at the video packet after a keyframe (which
    lets `_timed` hand the keyframe on: the muxer then writes the GOP before it) or after BATCH_MAX packets; a
    keyframe held by `_timed` takes the time of the packet that ended its hold; a failed read hands on what is
    held before it raises, and `stop()` ends the reading after handing on what is held."""
    from drivers.rtsp import BATCH_MAX, RtspRecorder

    events: list[tuple[str, int]] = []
    recorder = RtspRecorder("cam", lambda: "rtsp://unused", tmp_path, listener=None, segment_s=10, stall_timeout_s=10,
                            pace_s=0)   # reads as packets come: the pauses have a test of their own
    recorder._clock.wall0 = recorder._clock.mono0 = 0.0
    recorder._clock.monotonic = lambda: float(len(events))   # the clock (seconds): how many events so far
    video = SimpleNamespace(index=0, codec_context=SimpleNamespace(name="h264"))

    def camera(kinds: str, fail: bool = False) -> Iterator[SimpleNamespace]:
        """'K' a video keyframe, 'v' another video packet, 'a' an audio packet; each its own picture."""
        for n, kind in enumerate(kinds):
            events.append(("came", n))
            yield SimpleNamespace(n=n, stream_index=1 if kind == "a" else 0, is_keyframe=kind == "K", dts=n)
        if fail:
            raise OSError("connection reset")

    def handle(kinds: str, fail: bool = False) -> list[tuple[int, float]]:
        got = []
        for packet, received in recorder._timed(recorder._batched(camera(kinds, fail), 0), video):
            events.append(("handled", packet.n))
            got.append((packet.n, received))
        return got

    stream = "Kvavav" + "v" * (BATCH_MAX + 3) + "Kvv"
    got = handle(stream)
    handled_at = {n: events.index(("handled", n)) for n in range(len(stream))}
    came_at = {n: events.index(("came", n)) for n in range(len(stream))}
    second_key = stream.index("K", 1)
    # every packet, in order, stamped as it came (not when it was handled); a keyframe when the next video came
    released = {0: 1, second_key: second_key + 1}
    assert got == [(n, (came_at[released.get(n, n)] + 1) * 1000.0) for n in range(len(stream))]
    assert recorder._video_seen == stream.count("K") + stream.count("v")

    def handled_between(packets: range, end: int) -> bool:   # handled once `end` came, before the next came
        return all(came_at[end] < handled_at[n] < came_at[end + 1] for n in packets)

    assert handled_between(range(0, 2), 1)                    # the keyframe, at the video packet after it
    assert handled_between(range(2, 2 + BATCH_MAX), 1 + BATCH_MAX)   # then BATCH_MAX packets
    assert handled_between(range(2 + BATCH_MAX, second_key + 2), second_key + 1)

    events.clear()
    with pytest.raises(OSError):
        handle("Kvvv", fail=True)
    assert [e for e in events if e[0] == "handled"] == [("handled", n) for n in range(4)]

    events.clear()
    with pytest.raises(OSError):
        handle("vvK", fail=True)   # the keyframe held by `_timed` when the read fails is handed on
    assert [e for e in events if e[0] == "handled"] == [("handled", n) for n in range(3)]

    events.clear()
    recorder.stop()
    assert [n for n, _ in handle("Kvvvv")] == [0]   # stopped after the first packet: nothing more is read
    assert ("came", 1) not in events


def test_a_recorder_stopped_while_reading_reports_no_interruption(tmp_path: Path) -> None:
    """The reading stops at a flag (`_stopping`, read as each packet comes); `run` then reports an interruption
    only when the stop event is not set. So `stop()` must set the event first: here the event takes its time to
    be set, and a recorder that stops reading for the flag and fails closing its segment reports nothing."""
    import threading as th

    from drivers.rtsp import RtspRecorder

    class SlowEvent(th.Event):
        def set(self) -> None:
            time.sleep(0.3)   # the other thread runs meanwhile
            super().set()

    interrupted: list[str] = []

    class Recorder(RtspRecorder):
        def _session(self) -> None:
            while not self._stopping:
                time.sleep(0.01)
            raise OSError(22, "Invalid argument")   # e.g. closing the segment as the agent stops

    listener = SimpleNamespace(interrupted=lambda camera, cause, since, detail: interrupted.append(detail))
    recorder = Recorder("cam", lambda: "rtsp://unused", tmp_path, listener, segment_s=10, stall_timeout_s=10)
    recorder._stop = SlowEvent()
    runner = th.Thread(target=recorder.run)
    runner.start()
    recorder.stop()
    runner.join(10)
    assert not runner.is_alive() and interrupted == []
