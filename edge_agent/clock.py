"""The one clock of records and messages: wall-clock milliseconds since the Unix epoch (integers, never floats,
so signed documents and the wire carry them exactly)."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int | None, tz: tzinfo = UTC) -> str | None:
    """Epoch milliseconds as ISO 8601 to the millisecond in `tz` (None stays None): what people read beside
    the integers."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="milliseconds")


# -- the kernel's own view of its clock (R9) ------------------------------------------------------------------
# adjtimex(2) with modes = 0 only reads: what NTP (chrony, timesyncd, ntpd) last told the kernel. systemd's
# `NTPSynchronized` is this same read. The struct is glibc's `struct timex` on 64-bit Linux.

TIME_ERROR = 5          # adjtimex's return: the clock is not synchronised
STA_UNSYNC = 0x0040     # status bit: the clock is not synchronised
STA_NANO = 0x2000       # status bit: timex.time's second field counts nanoseconds, not microseconds


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time", _Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long),
                ("shift", ctypes.c_int), ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long),
                ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long),
                ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11)]


@dataclass(frozen=True)
class KernelClock:
    """One adjtimex read. `maxerror_us`/`esterror_us`: the kernel's maximum and estimated error of the clock
    (microseconds; the maximum grows by 500 ppm while no NTP update comes, up to 16 s). `read_ms`: the
    kernel's time of the read."""

    state: int
    status: int
    maxerror_us: int
    esterror_us: int
    read_ms: int

    @property
    def synchronized(self) -> bool:
        return self.state != TIME_ERROR and not self.status & STA_UNSYNC

    def as_dict(self) -> dict[str, int | bool]:
        """Integers and booleans only: it goes into signed documents."""
        return {"synchronized": self.synchronized, "maxerror_us": self.maxerror_us,
                "esterror_us": self.esterror_us, "state": self.state, "status": self.status,
                "read_ms": self.read_ms}


_libc: ctypes.CDLL | None = None


def read_kernel_clock() -> KernelClock | None:
    """The kernel's clock synchronisation state (read-only adjtimex), None where there is no adjtimex."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    call = getattr(_libc, "adjtimex", None) or getattr(_libc, "ntp_adjtime", None)
    if call is None:
        return None
    timex = _Timex()   # modes = 0: read only
    state = call(ctypes.byref(timex))
    if state < 0:
        return None
    sub_ms = timex.time.tv_usec // (1_000_000 if timex.status & STA_NANO else 1000)
    return KernelClock(state=state, status=timex.status, maxerror_us=timex.maxerror, esterror_us=timex.esterror,
                       read_ms=timex.time.tv_sec * 1000 + sub_ms)
