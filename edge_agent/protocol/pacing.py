"""Pacing for the uplink: reconnect backoff and the bandwidth cap.

`Backoff` is exponential with full jitter (each delay uniform in
[0, min(max, min * 2**attempt)]), so 500 agents that lose the broker together
come back spread over the window instead of in one storm. `TokenBucket` caps
the average send rate; a burst is at most `burst` bytes.
"""

from __future__ import annotations

import random
import threading
import time


class Backoff:
    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None):
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class TokenBucket:
    """Average rate `rate_bps` bytes per second. `consume` blocks until the bytes may go,
    or returns False at once if `stop` is set while waiting."""

    def __init__(self, rate_bps: float, burst: int, clock=time.monotonic):
        self.rate = float(rate_bps)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def consume(self, n: int, stop: threading.Event | None = None) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n   # may go negative: the debt is waited out below, so the average holds
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait <= 0:
            return True
        if stop is not None:
            return not stop.wait(wait)
        time.sleep(wait)
        return True
