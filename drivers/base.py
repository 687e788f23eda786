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
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from drivers.gat947 import Gat947Settings, RecorderHandshake


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
    handshake: RecorderHandshake | None = None   # the recorder's vendor handshake, when its model has one


@dataclass(frozen=True)
class RefusedDevice:
    """A USB mass-storage device a dock refused to read (`unknown_devices = "refuse"`): not a known recorder.
    `label` is the volume folder its serial would name, or the folder of a volume no known device claims."""

    vendor_id: int | None
    product_id: int | None
    serial: str | None
    label: str
    manufacturer: str | None = None
    product: str | None = None


class DockListener(Protocol):
    """Told by a dock driver, from the driver's own thread, about volumes coming and going."""

    def docked(self, volume: DockedVolume) -> None: ...

    def undocked(self, volume: DockedVolume) -> None: ...

    def recorder_clock_read(self, dock: str, usb_serial: str | None, report: RecorderHandshake) -> None:
        """A recorder's clock offset was read, before any correction: record it durably now (the driver sets
        the recorder's clock only once this returns)."""

    def recorder_handshake(self, dock: str, usb_serial: str | None, report: RecorderHandshake) -> None:
        """A recorder's vendor handshake ended (whether or not its volume follows): raise or clear what it shows."""

    def device_refused(self, dock: str, device: RefusedDevice) -> None:
        """A mass-storage device that is not a known recorder was left unread."""


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

    @property
    def gat947(self) -> Gat947Settings | None: ...   # its GA/T 947.4 vendor library, if it has one


def free_slot(present: Iterable[DockedVolume]) -> int:
    """The slot number for a volume docking now: the lowest (from 1) that no present volume holds.

    Every driver numbers its slots this way, so a slot freed by an undock is the next one taken."""
    used = {v.slot for v in present}
    slot = 1
    while slot in used:
        slot += 1
    return slot
