"""An ONVIF camera watched while the agent records it (real agent, real RTSP server, the fake ONVIF camera
with its PullPoint): its clock is read again every clock_check_s without a reconnect, and a step shows in
health and in the clock alarm; its tamper events are alarms that clear when the state goes false, also after
the camera lost the subscription and the agent subscribed again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edge_agent.daemon import Agent, build_agent
from edge_agent.i18n import translations
from edge_agent.ops.health import load_schema
from edge_agent.ui.strings import ADVICE
from tests.helpers import agent_config, wait_for
from tests.peers.mosquitto import free_port
from tests.peers.onvif_service import TAMPER_TOPICS, OnvifCamera
from tests.peers.rtsp_server import RtspServer
from tests.test_cameras import ROOT, camera

SCENE = "tns1:VideoSource/GlobalSceneChange/ImagingService"
TAMPER = "tns1:RuleEngine/TamperDetector/Tamper"


@pytest.fixture
def rtsp(tmp_path: Path) -> Iterator[RtspServer]:
    server = RtspServer(free_port(), log=tmp_path / "rtsp.log").start()
    yield server
    server.stop()


def run_agent(tmp_path: Path, onvif_cam: OnvifCamera, **keys: object) -> Agent:
    pw = tmp_path / "cam.pass"
    pw.write_text("secret-1\n")
    pw.chmod(0o600)
    _, cfg = agent_config(tmp_path, mqtt={"port": free_port()}, health={"clock_offset_alarm_ms": 2000},
                          cameras=[camera("gate-north", onvif=onvif_cam.url, username="admin",
                                          password_file=str(pw), location="北门", **keys)])
    agent = build_agent(cfg)
    agent.start()
    return agent


def status(agent: Agent) -> dict[str, Any]:
    return agent.cameras.camera_status()[0]


def tick(agent: Agent) -> dict[str, Any]:
    """The health job's snapshot now, with the alarms evaluated (what the scheduler runs every interval)."""
    assert agent.operations is not None
    return agent.operations.health.tick()


def active(agent: Agent) -> dict[str, Any]:
    return {row["key"]: row for row in agent.catalog.active_alarms()}


def test_camera_clock_step_shows_in_health_and_the_clock_alarm_without_a_reconnect(
        tmp_path: Path, rtsp: RtspServer) -> None:
    onvif_cam = OnvifCamera(free_port(), rtsp.url, password="secret-1", events=False).start()
    agent = run_agent(tmp_path, onvif_cam, clock_check_s=0.5)
    try:
        wait_for(lambda: status(agent)["recording"], timeout=30, what="the camera recording")
        first = tick(agent)["cameras"][0]
        probes = onvif_cam.calls.count("GetStreamUri")
        assert abs(first["clock_offset_ms"]) <= 1500 and "clock_offset:gate-north" not in active(agent)
        assert first["onvif"]["events"] == "unsupported"     # no event service: its clock is still watched

        onvif_cam.clock_offset_s = 90                          # the camera's clock steps 90 s ahead
        wait_for(lambda: status(agent)["clock_offset_ms"] >= 88_500, timeout=20, what="the new offset")
        stepped = tick(agent)
        alarm = active(agent).get("clock_offset:gate-north")
        assert 88_500 <= stepped["cameras"][0]["clock_offset_ms"] <= 91_500
        assert alarm is not None and alarm["kind"] == "clock_offset" and "gate-north" in alarm["message"]
        # Read by the periodic check, not by a reconnect's probe.
        assert onvif_cam.calls.count("GetStreamUri") == probes and status(agent)["connected"]

        onvif_cam.clock_offset_s = 0                           # fixed on the camera: the alarm clears
        wait_for(lambda: abs(status(agent)["clock_offset_ms"]) <= 1500, timeout=20, what="the offset back")
        tick(agent)
        assert "clock_offset:gate-north" not in active(agent)
    finally:
        agent.stop()
        onvif_cam.stop()


def test_tamper_events_are_alarms_that_clear_and_survive_a_lost_subscription(
        tmp_path: Path, rtsp: RtspServer) -> None:
    onvif_cam = OnvifCamera(free_port(), rtsp.url, password="secret-1").start()
    agent = run_agent(tmp_path, onvif_cam)
    try:
        wait_for(lambda: status(agent)["onvif"]["events"] == "subscribed", timeout=30, what="a subscription")
        assert status(agent)["onvif"]["tamper_topics"] == list(TAMPER_TOPICS)   # as GetEventProperties lists them

        onvif_cam.push_event(SCENE, True)
        scene = wait_for(lambda: active(agent).get("camera.gate-north.scene_changed"), timeout=20,
                         what="the scene-change alarm")
        assert scene["kind"] == "camera_scene_changed" and scene["subject"] == "gate-north"
        assert "北门" in scene["message"] and "moved" in scene["message"] and SCENE in scene["message"]
        snapshot = tick(agent)
        assert snapshot["cameras"][0]["onvif"]["tamper_active"] == ["scene_changed"]
        jsonschema.validate(snapshot, load_schema())

        onvif_cam.push_event(SCENE, False)
        wait_for(lambda: "camera.gate-north.scene_changed" not in active(agent), timeout=20,
                 what="the scene-change alarm cleared")

        onvif_cam.push_event(TAMPER, True, item="IsTamper")
        tamper = wait_for(lambda: active(agent).get("camera.gate-north.tamper"), timeout=20, what="tamper")
        assert tamper["kind"] == "camera_tamper"

        onvif_cam.drop_subscriptions()                         # the camera rebooted: the subscription is gone
        wait_for(lambda: onvif_cam.subscriptions_created >= 2 and status(agent)["onvif"]["events"] == "subscribed",
                 timeout=30, what="a new subscription")
        onvif_cam.push_event(TAMPER, False, item="IsTamper")
        wait_for(lambda: "camera.gate-north.tamper" not in active(agent), timeout=20, what="tamper cleared")
        assert status(agent)["onvif"]["subscriptions"] >= 2
    finally:
        agent.stop()
        onvif_cam.stop()
    assert "Unsubscribe" in onvif_cam.calls                    # a clean stop leaves no subscription behind


def test_events_survive_a_camera_clock_step_that_outdates_the_digest(tmp_path: Path, rtsp: RtspServer) -> None:
    """A camera that refuses digests more than 30 s off its clock steps 90 s ahead: the pulls signed with the
    old offset are refused, the subscription is lost, and the new session (clock measured again) gets the
    events through."""
    onvif_cam = OnvifCamera(free_port(), rtsp.url, password="secret-1", digest_window_s=30).start()
    agent = run_agent(tmp_path, onvif_cam, clock_check_s=0.5)
    try:
        wait_for(lambda: status(agent)["onvif"]["events"] == "subscribed", timeout=30, what="a subscription")
        onvif_cam.clock_offset_s = 90
        onvif_cam.push_event(SCENE, True)       # wakes the pull in flight; the next one is signed 90 s off
        wait_for(lambda: onvif_cam.subscriptions_created >= 2 and status(agent)["onvif"]["events"] == "subscribed",
                 timeout=30, what="a new subscription signed in the camera's new time")
        onvif_cam.push_event(TAMPER, True, item="IsTamper")
        wait_for(lambda: {"camera.gate-north.tamper", "camera.gate-north.scene_changed"} <= set(active(agent)),
                 timeout=20, what="both alarms")
    finally:
        agent.stop()
        onvif_cam.stop()


def test_the_running_daemon_shows_a_tamper_alarm_in_health_until_the_camera_says_it_ended(
        tmp_path: Path, rtsp: RtspServer) -> None:
    onvif_cam = OnvifCamera(free_port(), rtsp.url, password="secret-1").start()
    pw = tmp_path / "cam.pass"
    pw.write_text("secret-1\n")
    pw.chmod(0o600)
    config_path, cfg = agent_config(tmp_path, mqtt={"port": free_port()}, health={"change_check_s": 0.2},
                                    cameras=[camera("gate-north", onvif=onvif_cam.url, username="admin",
                                                    password_file=str(pw), location="北门")])
    health_file = cfg.agent.data_dir / "health.json"

    def health() -> dict[str, Any]:
        try:
            return json.loads(health_file.read_bytes())
        except (OSError, ValueError):
            return {}

    def alarms() -> set[str]:
        return {a["key"] for a in health().get("alarms", [])}

    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config_path), "run"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "agent.log", "wb"))
    try:
        wait_for(lambda: onvif_cam.subscriptions_created >= 1 and "PullMessages" in onvif_cam.calls, timeout=40,
                 what="the daemon subscribed and pulling")
        onvif_cam.push_event(SCENE, True)
        wait_for(lambda: "camera.gate-north.scene_changed" in alarms(), timeout=20, what="the alarm in health")
        camera_health = health()["cameras"][0]
        assert camera_health["onvif"]["events"] == "subscribed"
        assert camera_health["onvif"]["tamper_active"] == ["scene_changed"]
        onvif_cam.push_event(SCENE, False)
        wait_for(lambda: health() and "camera.gate-north.scene_changed" not in alarms(), timeout=20,
                 what="the alarm gone from health")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        onvif_cam.stop()
    assert "Unsubscribe" in onvif_cam.calls


def test_events_can_be_turned_off_per_camera(tmp_path: Path) -> None:
    onvif_cam = OnvifCamera(free_port(), "rtsp://127.0.0.1:9/none", password="secret-1").start()   # no stream
    agent = run_agent(tmp_path, onvif_cam, onvif_events=False, clock_check_s=0.5)
    try:
        wait_for(lambda: status(agent)["onvif"]["clock_read_ms"], timeout=20, what="a clock reading")
        assert status(agent)["onvif"]["events"] == "off"
    finally:
        agent.stop()
        onvif_cam.stop()
    assert "CreatePullPointSubscription" not in onvif_cam.calls and "GetEventProperties" not in onvif_cam.calls


def test_tamper_alarm_kinds_tell_the_custodian_what_to_do_in_chinese() -> None:
    chinese = translations("zh_CN")
    for kind in ("camera_scene_changed", "camera_too_blurry", "camera_too_dark", "camera_too_bright",
                 "camera_tamper"):
        assert chinese.gettext(ADVICE[kind]) != ADVICE[kind], kind
