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

A recorder whose model has a GA/T 947.4 vendor library (`[models.gat947]`) is talked to when it first
shows on the bus (drivers/gat947.py: identity, officer, battery, clock offset then 校时, switch to mass
storage); the listener records its clock offset before the clock is set and hears the outcome; the report
rides on the docked volume. Whatever the library does, the volume is docked as any other.

With `unknown_devices = "refuse"` (R8) a USB mass-storage device that is not a known recorder, and any
volume no known recorder claims, is never docked: its volume is not opened, the listener is told
(`device_refused`) once per device or volume. With `"ingest"` (the default) such a volume is docked as
unknown after `unknown_after_s`, as above.

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
from zoneinfo import ZoneInfo

import usb.backend
import usb.core
import usb.util
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from drivers import gat947
from drivers.base import DockedVolume, DockListener, RefusedDevice, UsbRecorderModel, free_slot

log = logging.getLogger(__name__)

# udev writes ID_SERIAL_SHORT with whitespace as '_' and anything outside this set as '_' too.
_UDEV_UNSAFE = re.compile(r"[^0-9A-Za-z#+\-.:=@_]")

MASS_STORAGE_CLASS = 0x08
UNKNOWN_DEVICES = ("ingest", "refuse")


def udev_serial(serial: str) -> str:
    """The folder name udev's ID_SERIAL_SHORT gives a device with this USB serial."""
    return _UDEV_UNSAFE.sub("_", re.sub(r"\s", "_", serial.strip()))


def _is_volume(path: Path) -> bool:
    try:
        return os.path.ismount(path) or any(os.scandir(path))
    except OSError:
        return False


def _is_mass_storage(dev: usb.core.Device) -> bool:
    """Whether any interface of the device is USB mass storage; a device that cannot be read counts as one
    (refusing is the safe side)."""
    try:
        return any(intf.bInterfaceClass == MASS_STORAGE_CLASS for cfg in dev for intf in cfg)
    except (usb.core.USBError, ValueError, NotImplementedError):
        return True


@dataclass(frozen=True)
class Recorder:
    """One recorder seen on the bus."""

    serial: str | None
    model: str
    vendor_id: int
    product_id: int
    bus: int | None
    address: int | None
    handshake: gat947.RecorderHandshake | None = None


class UsbDock(FileSystemEventHandler):
    """A `DockDriver` for the recorders on the USB bus of one dock, their volumes under `mount_root`.

    `models` is the recorder model table (`UsbRecorderModel`: name and USB ids), passed in by the daemon."""

    def __init__(self, name: str, mount_root: Path, models: Iterable[UsbRecorderModel], *,
                 backend: usb.backend.IBackend | None = None, poll_s: float = 1.0, unknown_after_s: float = 5.0,
                 unknown_devices: str = "ingest", zone: ZoneInfo = ZoneInfo("Asia/Shanghai")):
        if unknown_devices not in UNKNOWN_DEVICES:
            raise ValueError(f"unknown_devices must be one of {UNKNOWN_DEVICES}, got {unknown_devices!r}")
        self.unknown_devices = unknown_devices
        self.zone = zone            # of the recorders' clocks (they keep local time)
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
        self._handshakes: dict[tuple[int | None, int | None, int, int], gat947.RecorderHandshake] = {}
        self._refused: dict[tuple[int | None, int | None, int, int], RefusedDevice] = {}
        self._refused_volumes: set[str] = set()
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
        refuse = self.unknown_devices == "refuse"
        try:
            devices = list(usb.core.find(find_all=True, backend=self._backend,
                                         custom_match=lambda d: refuse or (d.idVendor, d.idProduct) in self.models))
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
            model = self.models.get((dev.idVendor, dev.idProduct))
            if model is None:
                if key not in self._refused and _is_mass_storage(dev):
                    self._refuse(dev, key)
                usb.util.dispose_resources(dev)
                continue
            if key not in self._serials:
                self._serials[key] = self._read_serial(dev)
                if model.gat947 is not None:
                    self._handshakes[key] = self._handshake(model.gat947, self._serials[key])
            usb.util.dispose_resources(dev)
            serial = self._serials[key]
            if serial is None:
                continue
            found[udev_serial(serial)] = Recorder(serial=serial, model=model.name, vendor_id=dev.idVendor,
                                                  product_id=dev.idProduct, bus=dev.bus, address=dev.address,
                                                  handshake=self._handshakes.get(key))
        for key in set(self._serials) - seen:
            del self._serials[key]
            self._handshakes.pop(key, None)
        for key in set(self._refused) - seen:
            del self._refused[key]
        return found

    def _handshake(self, settings: gat947.Gat947Settings, usb_serial: str | None) -> gat947.RecorderHandshake:
        """The recorder's GA/T 947.4 handshake, the listener told of its clock before 校时 and of the outcome."""
        listener = self._listener
        assert listener is not None
        report = gat947.handshake(settings, self.zone,
                                  lambda before: listener.recorder_clock_read(self.name, usb_serial, before))
        listener.recorder_handshake(self.name, usb_serial, report)
        return report

    def _refuse(self, dev: usb.core.Device, key: tuple[int | None, int | None, int, int]) -> None:
        """A mass-storage device that is no known recorder: remember it (so its volume is never docked) and
        tell the listener once."""
        strings: dict[str, str | None] = {}
        for name in ("serial_number", "manufacturer", "product"):
            try:
                strings[name] = (getattr(dev, name) or "").strip() or None
            except (usb.core.USBError, ValueError):
                strings[name] = None
        serial = strings["serial_number"]
        device = RefusedDevice(vendor_id=dev.idVendor, product_id=dev.idProduct, serial=serial,
                               label=udev_serial(serial) if serial else "", manufacturer=strings["manufacturer"],
                               product=strings["product"])
        self._refused[key] = device
        log.warning("usb device refused dock=%s vendor=%04x product=%04x serial=%s: not a recorder in "
                    "recorders.toml and unknown_devices is refuse; its volume is never read",
                    self.name, dev.idVendor, dev.idProduct, serial)
        assert self._listener is not None
        self._listener.device_refused(self.name, device)

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
                if self.unknown_devices == "refuse":
                    self._refuse_volume(label)
                else:
                    wanted[label] = None
        self._refused_volumes &= volumes
        for label in list(self._unmatched_since):
            if label not in volumes or label in recorders:
                del self._unmatched_since[label]
        for label, volume in list(self._present.items()):
            if label not in wanted or (wanted[label] is not None) != (volume.serial is not None):
                self._undock(label)
        for label, recorder in sorted(wanted.items()):
            if label not in self._present:
                self._dock(label, recorder)

    def _refuse_volume(self, label: str) -> None:
        """A volume no known recorder claims, under `refuse`: never docked; the listener told once (unless it
        is a refused device's own volume, told already)."""
        if label in self._refused_volumes:
            return
        self._refused_volumes.add(label)
        if any(d.label == label for d in self._refused.values()):
            return
        log.warning("volume refused dock=%s label=%s: no known recorder on the bus claims it and unknown_devices "
                    "is refuse; it is not read", self.name, label)
        assert self._listener is not None
        self._listener.device_refused(self.name, RefusedDevice(vendor_id=None, product_id=None, serial=None,
                                                               label=label))

    def _dock(self, label: str, recorder: Recorder | None) -> None:
        slot = free_slot(self._present.values())
        if recorder is None:
            volume = DockedVolume(dock=self.name, path=self.mount_root / label, label=label, slot=slot)
            log.warning("docked without usb match dock=%s label=%s slot=%s: no known recorder on the bus has "
                        "this serial; identified from the volume itself", self.name, label, slot)
        else:
            volume = DockedVolume(dock=self.name, path=self.mount_root / label, label=label, slot=slot,
                                  serial=recorder.serial, model=recorder.model, vendor_id=recorder.vendor_id,
                                  product_id=recorder.product_id, handshake=recorder.handshake)
            log.info("docked dock=%s serial=%s model=%s slot=%s", self.name, recorder.serial, recorder.model, slot)
        self._present[label] = volume
        assert self._listener is not None
        self._listener.docked(volume)

    def _undock(self, label: str) -> None:
        volume = self._present.pop(label)
        log.info("undocked dock=%s label=%s serial=%s", self.name, label, volume.serial)
        assert self._listener is not None
        self._listener.undocked(volume)
