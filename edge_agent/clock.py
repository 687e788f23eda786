"""The one clock of records and messages: wall-clock milliseconds since the Unix epoch (integers, never floats,
so signed documents and the wire carry them exactly)."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
