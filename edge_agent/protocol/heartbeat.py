"""Progress reports of long-lived loops: `Heartbeat` (a loop's pulse) and `Vital` (what a supervisor needs).

A thread that is alive is not necessarily doing its job: it may wait forever on a lock, a dead peer or a
callback that never comes. So every long-lived loop (paho's network loop and its supervisor, the sync
sender, each dock worker, each camera's recorder, the scheduler) holds a `Heartbeat` and calls `beat()`
each time round, or `idle()` before a wait that is legitimately open-ended (nothing to do until a volume
changes, a camera reconnecting). `ops.liveness.Liveness` reads them.

Here, not in `ops`, because every layer that runs a loop (protocol's connection, sync, sources, ops) must
be able to report, and they may not import each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class Heartbeat:
    """The pulse of one loop. `beat()` and `idle()` are cheap and safe from any thread."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._idle = False
        self.beats = 0

    def beat(self) -> None:
        """The loop made progress (went round once, copied a block, got a packet)."""
        with self._lock:
            self._last = time.monotonic()
            self._idle = False
            self.beats += 1

    def idle(self) -> None:
        """The loop waits for something outside it, for as long as that takes: no beats are due until the
        next `beat()`."""
        with self._lock:
            self._last = time.monotonic()
            self._idle = True

    def silent_s(self, now: float | None = None) -> float:
        """Seconds since the last beat; 0 while idle."""
        with self._lock:
            if self._idle:
                return 0.0
            return (time.monotonic() if now is None else now) - self._last


def _always_alive() -> bool:
    return True


@dataclass(frozen=True)
class Vital:
    """One supervised component: its pulse, whether its thread still runs, and how to bring it back.

    `alive()` False means the component died (its thread ended while it should run); `restart()` starts it
    again (None: it cannot be restarted in process, only the daemon's restart by systemd helps). A component
    silent longer than the supervisor's `liveness.stall_s` while not idle is stuck."""

    name: str
    heartbeat: Heartbeat
    alive: Callable[[], bool] = field(default=_always_alive)
    restart: Callable[[], None] | None = None
