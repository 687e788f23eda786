"""Image health, sampled from keyframes of real RTSP streams: a black and a frozen camera are flagged (a
health field and an alarm each); a normal, moving picture is not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.daemon import build_agent
from tests.helpers import wait_for
from tests.peers.mosquitto import free_port
from tests.peers.rtsp_server import RtspServer
from tests.test_cameras import cameras_config


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, RtspServer]]:
    started = {}
    try:
        for pattern in ("normal", "black", "frozen"):
            started[pattern] = RtspServer(free_port(), pattern, log=tmp_path / f"rtsp-{pattern}.log").start()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_image_checks_flag_black_and_frozen_streams(tmp_path: Path, servers: dict[str, RtspServer]) -> None:
    cameras = [{"name": f"cam-{pattern}", "rtsp": server.url, "segment_s": 10, "image_check_s": 0.5,
                "location": "鼓楼广场", "location_kind": "square"} for pattern, server in servers.items()]
    _, cfg = cameras_config(tmp_path, cameras)
    agent = build_agent(cfg)
    agent.start()
    try:
        def sampled_twice() -> dict[str, dict] | None:
            status = {s["name"]: s for s in agent.cameras.camera_status()}
            # frozen needs two samples to compare; wait for the third check of each camera
            if all(w.health.image_samples >= 3 for w in agent.cameras.workers.values()):
                return status
            return None

        status = wait_for(sampled_twice, timeout=40, what="three image checks per camera")
        alarms = {row["key"] for row in agent.catalog.active_alarms()}
    finally:
        agent.stop()

    checks = {name: s["image_checks"] for name, s in status.items()}
    assert checks["cam-black"]["black"] is True
    assert checks["cam-frozen"]["frozen"] is True and checks["cam-frozen"]["black"] is False
    assert not any(checks["cam-normal"][flag] for flag in ("black", "frozen", "blurred", "covered")), checks
    assert {"camera.cam-black.black", "camera.cam-frozen.frozen"} <= alarms
    assert not any(key.startswith("camera.cam-normal.") for key in alarms)
