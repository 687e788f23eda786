"""A dock slot's state as a custodian sees it (`SlotState`, `SlotStatus`).

Its own module because two threads share it: the slot's worker moves it along and the dock driver's
thread marks it undocked. The state therefore has one setter, under a lock, and `undocked` is final: a
worker still winding down after the recorder was pulled cannot bring the slot back into health.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class SlotState(StrEnum):
    IDENTIFYING = "identifying"   # docked; reading who the recorder is
    INGESTING = "ingesting"       # files being copied, hashed and sealed
    PAUSED = "paused"             # the store is full: intake waits, nothing is lost
    DONE = "done"                 # everything on the volume is sealed; it may be undocked
    ERROR = "error"               # the slot stopped (volume unreadable or an internal error)
    UNDOCKED = "undocked"         # the recorder is gone: final, the slot leaves health


# States in which a docked volume needs nothing more from the agent (for `wait_idle`).
SETTLED = frozenset({SlotState.DONE, SlotState.ERROR})


@dataclass
class SlotStatus:
    """What a custodian sees for one dock slot (also published in health).

    The counters and `last_error` are written by the slot's worker thread only; `state` by the worker and
    the driver's thread, through `set_state`. Readers in other threads take a `snapshot()`."""

    dock: str
    slot: int | None
    label: str
    docked_ms: int
    device_id: str | None = None
    model: str | None = None
    serial: str | None = None
    officer_id: str | None = None
    officer_name: str | None = None
    battery_percent: int | None = None        # from the recorder's vendor handshake (GA/T 947.4), if any
    clock_offset_ms: int | None = None        # the recorder's clock minus the agent's at docking, before 校时
    session_id: str | None = None
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_copied: int = 0
    rate_bps: float = 0.0
    last_error: str | None = None
    refused: list[str] = field(default_factory=list)
    _state: SlotState = SlotState.IDENTIFYING
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def state(self) -> SlotState:
        return self._state

    def set_state(self, state: SlotState, *, error: str | None = None) -> bool:
        """Move the slot to `state` (and set `last_error` when `error` is given). Returns False, changing
        nothing, once the slot is undocked: that is where every slot ends."""
        with self._lock:
            if self._state is SlotState.UNDOCKED:
                return False
            self._state = state
            if error is not None:
                self.last_error = error
            return True

    def snapshot(self) -> SlotStatus:
        """A copy for another thread to read, its state and error taken together."""
        with self._lock:
            fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "_lock"}
        fields["refused"] = list(self.refused)
        return SlotStatus(**fields)

    @property
    def files_pending(self) -> int:
        return max(self.files_total - self.files_done, 0)

    def health(self) -> dict[str, Any]:
        """This slot's entry in the health snapshot's `docks` list."""
        return {
            "dock": self.dock, "slot": self.slot, "label": self.label, "state": str(self.state),
            "device_id": self.device_id, "model": self.model, "serial": self.serial, "officer_id": self.officer_id,
            "officer_name": self.officer_name,
            "battery_percent": self.battery_percent, "clock_offset_ms": self.clock_offset_ms,
            "session_id": self.session_id, "docked_ms": self.docked_ms, "files_total": self.files_total,
            "files_pending": self.files_pending, "bytes_total": self.bytes_total, "bytes_copied": self.bytes_copied,
            "rate_bps": round(self.rate_bps, 1), "last_error": self.last_error,
        }
