"""Image health of a camera, sampled cheaply (opencv-python-headless).

`KeyframeSampler` decodes one keyframe every `every_s` seconds (never every frame: the recorder only
remuxes) and `assess` judges the picture: black, frozen (no part of the picture changed since the
previous sample, beyond compression noise), blurred
(variance of the Laplacian), covered (a uniform picture: lens blocked, camera turned to a wall or
sprayed). Thresholds are on a 160-pixel-wide grey thumbnail, so they do not depend on resolution.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import av
import cv2
import numpy as np

from drivers.rtsp import keyframe_decoder

log = logging.getLogger(__name__)

# The pictures judged here are small (a 160-px thumbnail, a 320-px preview), once per camera every few seconds:
# OpenCV's thread pool would wake a worker per call that then spins (sched_yield) waiting for more, costing
# more than the work. This is the only OpenCV user in the agent's process.
cv2.setNumThreads(1)

THUMB_WIDTH = 160
PREVIEW_WIDTH = 320        # the status page's picture of the last keyframe checked (a small colour JPEG)
PREVIEW_QUALITY = 70
BLACK_MEAN = 20.0          # mean luma (0-255) below this: black
FROZEN_LEVELS = 40         # a pixel "moved" when it differs from the previous sample by more than this...
FROZEN_FRACTION = 0.005    # ...and the picture is frozen when fewer than this share of pixels moved
BLURRED_LAPLACIAN = 40.0   # variance of the Laplacian below this (and not uniform): blurred
COVERED_STDDEV = 6.0       # luma standard deviation below this (and not black): covered

CHECKS = ("black", "frozen", "blurred", "covered")


@dataclass(frozen=True)
class ImageHealth:
    black: bool
    frozen: bool
    blurred: bool
    covered: bool
    mean: float
    stddev: float
    sharpness: float
    checked_ms: int

    def flags(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in CHECKS}

    def as_dict(self) -> dict[str, object]:
        return {**self.flags(), "mean": round(self.mean, 1), "stddev": round(self.stddev, 1),
                "sharpness": round(self.sharpness, 1), "checked_ms": self.checked_ms}


def small_picture(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame PREVIEW_WIDTH wide in colour (BGR), scaled and converted by swscale in one pass: far
    cheaper than converting the whole picture first, and what both the checks and the preview start from."""
    height = max(1, round(frame.height * PREVIEW_WIDTH / max(1, frame.width)))
    # One thread: swscale's default (0: one per core) starts and ends a pool of threads at every call.
    return frame.reformat(width=PREVIEW_WIDTH, height=height, format="bgr24", interpolation="AREA",
                          threads=1).to_ndarray()


def thumbnail(small: np.ndarray) -> np.ndarray:
    """A small grey picture (THUMB_WIDTH wide) of a `small_picture`, what the checks judge."""
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    height = max(1, round(grey.shape[0] * THUMB_WIDTH / max(1, grey.shape[1])))
    small = cv2.resize(grey, (THUMB_WIDTH, height), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(small, (3, 3), 0)   # compression noise between two encodings of a still scene


def preview_jpeg(small: np.ndarray) -> bytes | None:
    """A `small_picture` as a JPEG for a screen, None if it cannot be encoded."""
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_QUALITY])
    return encoded.tobytes() if ok else None


def assess(thumb: np.ndarray, previous: np.ndarray | None) -> ImageHealth:
    mean_arr, stddev_arr = cv2.meanStdDev(thumb)
    mean, stddev = float(mean_arr[0][0]), float(stddev_arr[0][0])
    sharpness = float(cv2.Laplacian(thumb, cv2.CV_64F).var())
    black = mean < BLACK_MEAN
    covered = not black and stddev < COVERED_STDDEV
    frozen = (previous is not None and previous.shape == thumb.shape
              and float((cv2.absdiff(thumb, previous) > FROZEN_LEVELS).mean()) < FROZEN_FRACTION)
    blurred = not black and not covered and sharpness < BLURRED_LAPLACIAN
    return ImageHealth(black, frozen, blurred, covered, mean, stddev, sharpness, int(time.time() * 1000))


class KeyframeSampler:
    """Decodes one keyframe per `every_s` of one camera's stream and judges it.

    A camera may send one picture as several packets (slices) with the same timestamp; the sampler
    joins them into one before decoding, and decodes nothing else until the next sample is due."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._next = 0.0
        self._decoder: av.CodecContext | None = None
        self._decoder_for: object = None
        self._previous: np.ndarray | None = None
        self._target: int | None = None   # pts of the keyframe being gathered
        self._chunks: list[bytes] = []
        self._small: np.ndarray | None = None   # the last keyframe judged, PREVIEW_WIDTH wide (small_picture)
        self._jpeg: tuple[np.ndarray, bytes | None] | None = None   # its JPEG, once asked for

    def offer(self, packet: av.Packet, stream: av.video.stream.VideoStream, key: bool) -> ImageHealth | None:
        """Look at one packet; returns a judgement once a sampled keyframe is whole and decoded."""
        if self._target is not None and packet.pts == self._target:
            self._chunks.append(bytes(packet))
            return None
        health = self._judge() if self._target is not None else None
        if key and health is None and time.monotonic() >= self._next:
            self._start(packet, stream)
        return health

    @property
    def preview(self) -> bytes | None:
        """The last keyframe judged, as a small JPEG; None before the first. Encoded when asked for (by a
        screen), at most once per keyframe judged: most of the time nobody looks. Any thread may ask."""
        small, cached = self._small, self._jpeg
        if small is None:
            return None
        if cached is None or cached[0] is not small:
            cached = self._jpeg = (small, preview_jpeg(small))
        return cached[1]

    def _start(self, packet: av.Packet, stream: av.video.stream.VideoStream) -> None:
        if self._decoder is None or self._decoder_for is not stream:
            self._decoder = keyframe_decoder(stream.codec_context.name, stream.codec_context.extradata)
            self._decoder_for = stream
        self._target = packet.pts
        self._chunks = [bytes(packet)]

    def _judge(self) -> ImageHealth | None:
        assert self._decoder is not None
        whole = av.Packet(b"".join(self._chunks))
        whole.pts = whole.dts = self._target
        self._target, self._chunks = None, []
        try:
            frames = self._decoder.decode(whole)
        except (av.FFmpegError, ValueError) as exc:
            log.debug("keyframe_undecodable error=%s", exc)
            return None
        if not frames:
            return None   # the next keyframe is tried
        self._next = time.monotonic() + self.every_s
        self._small = small_picture(frames[-1])
        thumb = thumbnail(self._small)
        health = assess(thumb, self._previous)
        self._previous = thumb
        return health
