"""Image health, sampled from keyframes of real RTSP streams: a black and a frozen camera are flagged (a
health field and an alarm each); a normal, moving picture is not. Each check flags its own picture; the
preview JPEG is made only when a screen asks for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from drivers.image_checks import KeyframeSampler, assess, small_picture, thumbnail
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


def _frame(picture: np.ndarray) -> av.VideoFrame:
    """An RGB picture as a camera's decoded frame (yuv420p, as H.264 decodes)."""
    return av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")


def test_each_check_flags_its_picture_and_only_that() -> None:
    """The judged picture is made by swscale at preview size and turned grey by OpenCV (`small_picture`,
    `thumbnail`): the thresholds still tell a black, a covered (uniform) and a blurred picture from a sharp
    one, and none of them from it."""
    rng = np.random.default_rng(7)
    checker = ((np.indices((720, 1280)) // 80).sum(axis=0) % 2 * 200 + 30).astype(np.uint8)   # 80-px squares
    sharp = np.dstack([checker] * 3)
    noise = rng.integers(0, 40, size=(720, 1280, 3), dtype=np.uint8)
    pictures = {
        "sharp": sharp,
        "black": np.full((720, 1280, 3), 8, np.uint8) + noise // 8,
        "covered": np.full((720, 1280, 3), 120, np.uint8) + noise // 20,
        "blurred": cv2.GaussianBlur(sharp, (0, 0), 25),
    }
    flags = {name: assess(thumbnail(small_picture(_frame(p))), None).flags() for name, p in pictures.items()}
    assert not any(flags["sharp"].values()), flags
    for name in ("black", "covered", "blurred"):
        assert [k for k, v in flags[name].items() if v] == [name], flags


def test_the_preview_is_encoded_when_asked_for_once_per_keyframe_judged() -> None:
    sampler = KeyframeSampler(0.0)
    assert sampler.preview is None
    sampler._small = small_picture(_frame(np.full((360, 640, 3), 90, np.uint8)))
    first = sampler.preview
    assert first is not None and cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape == (180, 320, 3)
    assert sampler.preview is first   # not encoded again
    sampler._small = small_picture(_frame(np.full((360, 640, 3), 200, np.uint8)))
    second = sampler.preview
    assert second != first and cv2.imdecode(np.frombuffer(second, np.uint8), cv2.IMREAD_GRAYSCALE).mean() > 150
