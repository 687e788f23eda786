"""The real ONVIF client (onvif-zeep-async, WS-Security digest) against a SOAP service that checks digests:
the right serial, profile and stream URI, the camera's clock offset; a wrong password fails clearly and
becomes an auth_failed gap; WS-Discovery finds a camera that answers a probe."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import onvif.client as onvif_library
import pytest
from typer.testing import CliRunner

from drivers import onvif
from edge_agent.cli import app
from edge_agent.daemon import build_agent
from tests.helpers import agent_config, wait_for
from tests.peers.mosquitto import free_port
from tests.peers.onvif_service import OnvifCamera
from tests.test_cameras import cameras_config

STREAM = "rtsp://127.0.0.1:8554/Streaming/Channels/101"


@pytest.fixture
def camera() -> Iterator[OnvifCamera]:
    service = OnvifCamera(free_port(), STREAM, password="Gulou2026", clock_offset_s=30,
                          discovery_port=free_port()).start()
    yield service
    service.stop()


def north_gate(tmp_path: Path, camera: OnvifCamera, password: str, mode: int) -> dict[str, object]:
    """An ONVIF camera entry whose password file holds `password` with permissions `mode`."""
    pw = tmp_path / "cam.pass"
    pw.write_text(password + "\n")
    pw.chmod(mode)
    return {"name": "gate-north", "onvif": camera.url, "username": "admin", "password_file": str(pw),
            "stall_timeout_s": 2, "reconnect_max_s": 1, "location": "北门", "location_kind": "entrance"}


def test_onvif_yields_serial_stream_uri_and_clock_offset(camera: OnvifCamera) -> None:
    identity = onvif.probe(camera.url, "admin", "Gulou2026", profile="subStream")
    assert identity.serial == camera.serial and identity.model == camera.model
    assert identity.profile_token == "Profile_2" and identity.stream_uri == STREAM
    assert 28_500 <= identity.clock_offset_ms <= 31_500          # the camera runs 30 s ahead
    # The authenticated calls really went through the digest check.
    assert {"GetDeviceInformation", "GetProfiles", "GetStreamUri"} <= set(camera.calls)
    assert onvif.probe(camera.url, "admin", "Gulou2026").profile_token == "Profile_1"


def test_wrong_password_fails_clearly_as_auth_failed(camera: OnvifCamera) -> None:
    with pytest.raises(onvif.OnvifAuthFailed) as refused:
        onvif.probe(camera.url, "admin", "wrong-password")
    assert "password_file" in str(refused.value) and camera.url in str(refused.value)
    assert "GetStreamUri" not in camera.calls


def test_camera_with_wrong_password_is_an_auth_failed_gap(tmp_path: Path, camera: OnvifCamera) -> None:
    _, cfg = cameras_config(tmp_path, [north_gate(tmp_path, camera, "not-the-password", 0o600)])
    agent = build_agent(cfg)
    agent.start()
    try:
        gap = wait_for(lambda: agent.catalog.query("SELECT * FROM gaps WHERE camera = 'gate-north'"), timeout=20,
                       what="a gap")[0]
        # The gap's row is written before the worker's status says so: wait for the status too.
        status = wait_for(lambda: (s := agent.cameras.camera_status()[0])["open_gap"] and s, timeout=20,
                          what="the camera's status showing the open gap")
        alarms = {row["key"] for row in agent.catalog.active_alarms()}
    finally:
        agent.stop()
    assert gap["cause"] == "auth_failed" and gap["end_ms"] is None
    assert not status["connected"] and not status["recording"]
    assert status["open_gap"]["cause"] == "auth_failed" and "password_file" in status["last_error"]
    assert "camera.gate-north.offline" in alarms


def test_password_file_readable_by_everyone_is_refused(tmp_path: Path, camera: OnvifCamera) -> None:
    _, cfg = cameras_config(tmp_path, [north_gate(tmp_path, camera, "Gulou2026", 0o644)])
    with pytest.raises(PermissionError, match="chmod o-r"):
        build_agent(cfg)


def test_discover_lists_a_camera_that_answers_the_probe(tmp_path: Path, camera: OnvifCamera) -> None:
    config_path, _ = agent_config(tmp_path)
    result = CliRunner().invoke(app, ["--config", str(config_path), "--json", "devices", "discover", "--timeout",
                                      "1", "--target", f"127.0.0.1:{camera.discovery_port}"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert [(f["xaddrs"], f["name"]) for f in found] == [([camera.url], camera.model)]


def test_wsdl_is_parsed_once_per_process_across_reconnects(tmp_path: Path, camera: OnvifCamera,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A camera whose stream is down reconnects every second for months: each reconnect probes ONVIF again,
    and none of them parses a WSDL file the process has parsed before."""
    parsed: list[str] = []
    real_load = onvif_library.original_load

    def counting_load(document: object, location: str) -> None:
        parsed.append(Path(location).name)
        real_load(document, location)

    monkeypatch.setattr(onvif_library, "_DOCUMENT_CACHE", {})     # as in a freshly started process
    monkeypatch.setattr(onvif_library, "original_load", counting_load)
    _, cfg = cameras_config(tmp_path, [north_gate(tmp_path, camera, "Gulou2026", 0o600)])   # no RTSP server
    agent = build_agent(cfg)
    agent.start()
    try:
        wait_for(lambda: camera.calls.count("GetStreamUri") >= 4, timeout=30, what="four probes (reconnects)")
    finally:
        agent.stop()
    assert sorted(parsed) == sorted(set(parsed)) and {"devicemgmt.wsdl", "media.wsdl"} <= set(parsed)
