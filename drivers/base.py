"""The interfaces between the agent and its sources.

A dock driver reports recorder volumes as they are docked and undocked; the
agent does the rest. Real drivers and the fakes used in tests implement the
same interface and are chosen by configuration.

Drivers import nothing of `edge_agent` beyond durable/protocol-level utilities:
what a driver needs from the agent comes in through the types here (e.g. a
`UsbRecorderModel`, which `edge_agent.sources.recorders.RecorderModel`
satisfies), passed in by whoever builds the driver.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class DockedVolume:
    """One recorder's storage, mounted and readable at `path`."""

    dock: str
    path: Path
    label: str
    slot: int | None = None
    serial: str | None = None        # USB serial number, when the dock knows the device
    model: str | None = None         # recorder model name from config/recorders.toml
    vendor_id: int | None = None
    product_id: int | None = None


class DockListener(Protocol):
    """Told by a dock driver, from the driver's own thread, about volumes coming and going."""

    def docked(self, volume: DockedVolume) -> None: ...

    def undocked(self, volume: DockedVolume) -> None: ...


class DockDriver(Protocol):
    """Watches one dock and tells the listener about volumes coming and going."""

    name: str

    def start(self, listener: DockListener) -> None: ...

    def stop(self) -> None: ...


class UsbRecorderModel(Protocol):
    """What a USB dock needs to know of a recorder model: its name and the ids it shows on the bus."""

    @property
    def name(self) -> str: ...

    @property
    def vendor_id(self) -> int: ...

    @property
    def product_id(self) -> int: ...


def free_slot(present: Iterable[DockedVolume]) -> int:
    """The slot number for a volume docking now: the lowest (from 1) that no present volume holds.

    Every driver numbers its slots this way, so a slot freed by an undock is the next one taken."""
    used = {v.slot for v in present}
    slot = 1
    while slot in used:
        slot += 1
    return slot
