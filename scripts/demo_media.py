"""Realistic recorder files for the demo and the benchmarks: short H.264 MP4 clips
with a moving scene and a burnt-in timestamp, as a body-worn recorder writes them."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import av
import cv2
import numpy as np

TZ = ZoneInfo("Asia/Shanghai")


def make_clip(path: Path, seconds: float, *, label: str, start: datetime, fps: int = 15,
              size: tuple[int, int] = (320, 240)) -> Path:
    """Encode a clip with PyAV (libx264 ships in its wheels): moving bars and a timestamp overlay."""
    width, height = size
    frames = max(int(seconds * fps), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(frames):
            img = np.full((height, width, 3), 40, np.uint8)
            x = (i * 4) % width
            img[:, x:x + 30] = (30, 160, 230)
            img[height // 2:height // 2 + 20, :] = (90, 90, 90)
            when = start + timedelta(seconds=i / fps)
            cv2.putText(img, when.strftime("%Y-%m-%d %H:%M:%S"), (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (255, 255, 255), 1)
            cv2.putText(img, label, (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_recorder(root: Path, *, device: str, officer: str, serial: str, clips: int, clip_s: float,
                  day: datetime | None = None) -> Path:
    """A ZFY-GA-2016 style volume: DEVICE.INI plus DCIM/100MEDIA/<device>_<officer>_<start>.MP4 clips.

    Built in a hidden folder and renamed into `root`, as a mount appears all at once."""
    day = day or (datetime.now(TZ) - timedelta(hours=3)).replace(second=0, microsecond=0)
    hidden = root / f".{device}.building"
    (hidden / "DCIM" / "100MEDIA").mkdir(parents=True, exist_ok=True)
    (hidden / "DEVICE.INI").write_text(f"DeviceID={device}\nPoliceID={officer}\nSerialNo={serial}\n")
    for n in range(clips):
        start = day + timedelta(minutes=17 * n)
        name = f"{device}_{officer}_{start.strftime('%Y%m%d%H%M%S')}.MP4"
        clip = make_clip(hidden / "DCIM" / "100MEDIA" / name, clip_s, label=f"{device} {officer}", start=start)
        stamp = (start + timedelta(seconds=clip_s)).timestamp()
        os.utime(clip, (stamp, stamp))
    final = root / device
    os.rename(hidden, final)
    return final
