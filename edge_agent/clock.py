"""The one clock of records and messages: wall-clock milliseconds since the Unix epoch (integers, never floats,
so signed documents and the wire carry them exactly)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, tzinfo


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int | None, tz: tzinfo = UTC) -> str | None:
    """Epoch milliseconds as ISO 8601 to the millisecond in `tz` (None stays None): what people read beside
    the integers."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="milliseconds")
