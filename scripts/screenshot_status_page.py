#!/usr/bin/env python3
"""Regenerate the README's screenshot of the status page (docs/status-page.png, and docs/status-page-en.png).

A real agent on a temporary data dir with a directory dock: one recorder fully collected (可取走), one still
collecting (a file still being written holds it back), one recorder that does not say who it is (its bay and
the alarm banner say what to do); the officers' names from the recorders' DEVICE.INI; one camera (the project's
GStreamer RTSP test server) with the last keyframe its image checks decoded.
Debian's chromium, driven by playwright, at the kiosk's 1280x800.

    .venv/bin/python scripts/screenshot_status_page.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from edge_agent.daemon import build_agent  # noqa: E402
from tests.evidence_support import offline_agent_config  # noqa: E402
from tests.helpers import make_recorder_volume, wait_for  # noqa: E402
from tests.peers.mosquitto import free_port  # noqa: E402
from tests.peers.rtsp_server import RtspServer  # noqa: E402

CLIPS = {"DCIM/100MEDIA/FILE0001.MP4": 3 << 20, "DCIM/100MEDIA/FILE0002.MP4": 2 << 20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-agent-screenshot-") as tmp:
        work = Path(tmp)
        for language, name in (("zh_CN", "status-page.png"), ("en", "status-page-en.png")):
            shoot(work / language, language, args.out / name)
            print(f"wrote {args.out / name}")
    return 0


def shoot(work: Path, language: str, out: Path) -> None:
    dock = work / "dock"
    dock.mkdir(parents=True)
    camera = RtspServer(free_port(), "normal", log=work / "rtsp.log").start()
    _, cfg = offline_agent_config(work, docks=[{"name": "dock-a", "kind": "directory", "root": str(dock),
                                                "settle_s": 600, "rescan_s": 0.2}],
                                  cameras=[{"name": "gate-1", "rtsp": camera.url, "segment_s": 10,
                                            "image_check_s": 1, "location": "鼓楼广场", "location_kind": "square"}],
                                  ui={"enabled": True, "listen": "127.0.0.1:0", "language": language})
    agent = build_agent(cfg)
    agent.start()
    try:
        aside = work / "aside"
        make_recorder_volume(aside, "ZFY0501", CLIPS, age_s=3600,
                             identity={"DeviceID": "A123451", "PoliceID": "320102123", "SerialNo": "ZFY0501",
                                       "PoliceName": "王芳"})
        make_recorder_volume(aside, "ZFY0502", CLIPS, age_s=3600,
                             identity={"DeviceID": "A123452", "PoliceID": "320102456", "SerialNo": "ZFY0502",
                                       "PoliceName": "李强"})
        make_recorder_volume(aside, "ZFY0502", {"DCIM/100MEDIA/FILE0003.MP4": 1 << 20}, age_s=0)
        make_recorder_volume(aside, "NO_NAME", {"DCIM/100MEDIA/FILE0001.MP4": 1 << 20}, age_s=3600)
        for volume in sorted(aside.iterdir()):
            volume.rename(dock / volume.name)
        wait_for(lambda: len(agent.catalog.files(states=["sealed"])) >= 5, timeout=60, what="the clips sealed")
        wait_for(lambda: agent.catalog.active_alarms(), timeout=30, what="the unidentified recorder's alarm")
        assert agent.status_page is not None
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(agent.status_page.url)
            page.wait_for_selector("#live:not(:empty)")
            page.locator('[data-state="done"]').first.wait_for()
            page.wait_for_function("() => { const i = document.querySelector('img.thumb'); "
                                   "return i !== null && i.naturalWidth > 0; }", timeout=60_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        agent.stop()
        camera.stop()


if __name__ == "__main__":
    sys.exit(main())
