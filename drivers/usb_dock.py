"""The `usb` dock: body-worn recorders found on the USB bus, matched to their mounted volumes.

pyusb lists the devices whose vendor/product ids are in the recorder model table
and reads each one's serial number. The udev rule (`systemd/99-edge-agent-dock.rules`)
mounts each recorder's volume at `{mount_root}/{ID_SERIAL_SHORT}`, so the folder
named by a serial is that device's volume. A recorder is docked while both its
device and its volume are present and undocked as soon as either goes.

pyusb has no hotplug: the bus is polled (every `poll_s`); a watchdog observer on
`mount_root` wakes the poll as soon as a volume appears or leaves. A volume whose
device cannot be matched (serial unreadable, model not in the table) is still
docked after `unknown_after_s`, without a serial, so its files are ingested as
whatever identification finds (identity file, file names, else `unknown:<label>`
with an alarm), never skipped.

The pyusb backend is injected (`backend=`); by default libusb-1.0 as shipped by
the `libusb-package` wheel.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import usb.backend
import usb.core
import usb.util
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from drivers.base import DockedVolume, DockListener, UsbRecorderModel, free_slot

log = logging.getLogger(__name__)

# udev writes ID_SERIAL_SHORT with whitespace as '_' and anything outside this set as '_' too.
_UDEV_UNSAFE = re.compile(r"[^0-9A-Za-z#+\-.:=@_]")


def udev_serial(serial: str) -> str:
    """The folder name udev's ID_SERIAL_SHORT gives a device with this USB serial."""
    return _UDEV_UNSAFE.sub("_", re.sub(r"\s", "_", serial.strip()))


def _is_volume(path: Path) -> bool:
    try:
        return os.path.ismount(path) or any(os.scandir(path))
    except OSError:
        return False


@dataclass(frozen=True)
class Recorder:
    """One recorder seen on the bus."""

    serial: str | None
    model: str
    vendor_id: int
    product_id: int
    bus: int | None
    address: int | None


class UsbDock(FileSystemEventHandler):
    """A `DockDriver` for the recorders on the USB bus of one dock, their volumes under `mount_root`.

    `models` is the recorder model table (`UsbRecorderModel`: name and USB ids), passed in by the daemon."""

    def __init__(self, name: str, mount_root: Path, models: Iterable[UsbRecorderModel], *,
                 backend: usb.backend.IBackend | None = None, poll_s: float = 1.0, unknown_after_s: float = 5.0):
        self.name = name
        self.mount_root = Path(mount_root)
        self.models = {(m.vendor_id, m.product_id): m for m in models}
        self.poll_s = poll_s
        self.unknown_after_s = unknown_after_s
        self._backend = backend
        self._listener: DockListener | None = None
        self._observer: Observer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._present: dict[str, DockedVolume] = {}       # by volume folder name
        self._serials: dict[tuple[int | None, int | None, int, int], str | None] = {}
        self._unmatched_since: dict[str, float] = {}
        self._bus_error: str | None = None

    # -- DockDriver -------------------------------------------------------------------------------

    def start(self, listener: DockListener) -> None:
        self._listener = listener
        if self._backend is None:
            import libusb_package

            self._backend = libusb_package.get_libusb1_backend()
            if self._backend is None:
                raise RuntimeError(f"dock {self.name}: no libusb-1.0 found; install the libusb-package wheel "
                                   "or apt-get install libusb-1.0-0")
        self.mount_root.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(self, str(self.mount_root), recursive=False)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name=f"usb-dock-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._wake.set()

    # -- the poll ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reconcile()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def scan_bus(self) -> dict[str, Recorder] | None:
        """Known recorders on the bus by volume folder name, or None if the bus cannot be read."""
        found: dict[str, Recorder] = {}
        seen: set[tuple[int | None, int | None, int, int]] = set()
        try:
            devices = list(usb.core.find(find_all=True, backend=self._backend,
                                         custom_match=lambda d: (d.idVendor, d.idProduct) in self.models))
        except usb.core.USBError as exc:
            if self._bus_error != str(exc):
                log.error("usb bus unreadable dock=%s error=%s; docked recorders are kept until it recovers",
                          self.name, exc)
            self._bus_error = str(exc)
            return None
        self._bus_error = None
        for dev in devices:
            key = (dev.bus, dev.address, dev.idVendor, dev.idProduct)
            seen.add(key)
            if key not in self._serials:
                self._serials[key] = self._read_serial(dev)
            usb.util.dispose_resources(dev)
            serial = self._serials[key]
            if serial is None:
                continue
            model = self.models[(dev.idVendor, dev.idProduct)]
            found[udev_serial(serial)] = Recorder(serial=serial, model=model.name, vendor_id=dev.idVendor,
                                                  product_id=dev.idProduct, bus=dev.bus, address=dev.address)
        for key in set(self._serials) - seen:
            del self._serials[key]
        return found

    def _read_serial(self, dev: usb.core.Device) -> str | None:
        try:
            serial = usb.util.get_string(dev, dev.iSerialNumber) if dev.iSerialNumber else None
        except (usb.core.USBError, ValueError) as exc:
            log.warning("usb serial unreadable dock=%s vendor=%04x product=%04x bus=%s address=%s error=%s; "
                        "its volume is docked without a serial (check udev permissions on /dev/bus/usb)",
                        self.name, dev.idVendor, dev.idProduct, dev.bus, dev.address, exc)
            return None
        serial = (serial or "").strip()
        if not serial:
            log.warning("usb recorder without serial dock=%s vendor=%04x product=%04x bus=%s address=%s",
                        self.name, dev.idVendor, dev.idProduct, dev.bus, dev.address)
            return None
        return serial

    def volumes(self) -> set[str]:
        """Folder names under mount_root that are recorder volumes: mounted, or holding files.

        No symlinks, no hidden entries, and no empty folder: systemd-mount leaves the mount point
        behind after an unmount, and an unmount sends no watchdog event, so the poll catches it here.
        """
        try:
            entries = list(os.scandir(self.mount_root))
        except OSError as exc:
            log.error("mount root unreadable dock=%s path=%s error=%s", self.name, self.mount_root, exc.strerror)
            return set()
        return {e.name for e in entries
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False) and _is_volume(Path(e.path))}

    def reconcile(self) -> None:
        """Dock what has both device and volume, undock what lost either."""
        recorders = self.scan_bus()
        if recorders is None:
            return
        volumes = self.volumes()
        now = time.monotonic()
        wanted: dict[str, Recorder | None] = {label: recorders[label] for label in volumes & recorders.keys()}
        for label in volumes - recorders.keys():
            since = self._unmatched_since.setdefault(label, now)
            if now - since >= self.unknown_after_s:
                wanted[label] = None
        for label in list(self._unmatched_since):
            if label not in volumes or label in recorders:
                del self._unmatched_since[label]
        for label, volume in list(self._present.items()):
            if label not in wanted or (wanted[label] is not None) != (volume.serial is not None):
                self._undock(label)
        for label, recorder in sorted(wanted.items()):
            if label not in self._present:
                self._dock(label, recorder)

    def _dock(self, label: str, recorder: Recorder | None) -> None:
        slot = free_slot(self._present.values())
        if recorder is None:
            volume = DockedVolume(dock=self.name, path=self.mount_root / label, label=label, slot=slot)
            log.warning("docked without usb match dock=%s label=%s slot=%s: no known recorder on the bus has "
                        "this serial; identified from the volume itself", self.name, label, slot)
        else:
            volume = DockedVolume(dock=self.name, path=self.mount_root / label, label=label, slot=slot,
                                  serial=recorder.serial, model=recorder.model, vendor_id=recorder.vendor_id,
                                  product_id=recorder.product_id)
            log.info("docked dock=%s serial=%s model=%s slot=%s", self.name, recorder.serial, recorder.model, slot)
        self._present[label] = volume
        assert self._listener is not None
        self._listener.docked(volume)

    def _undock(self, label: str) -> None:
        volume = self._present.pop(label)
        log.info("undocked dock=%s label=%s serial=%s", self.name, label, volume.serial)
        assert self._listener is not None
        self._listener.undocked(volume)
