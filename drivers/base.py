"""The interfaces between the agent and its sources.

A dock driver reports recorder volumes as they are docked and undocked; the
agent does the rest. Real drivers and the fakes used in tests implement the
same interface and are chosen by configuration.
"""

from __future__ import annotations

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
    def docked(self, volume: DockedVolume) -> None: ...

    def undocked(self, volume: DockedVolume) -> None: ...


class DockDriver(Protocol):
    """Watches one dock and tells the listener about volumes coming and going."""

    name: str

    def start(self, listener: DockListener) -> None: ...

    def stop(self) -> None: ...
