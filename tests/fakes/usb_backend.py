"""An emulated USB bus for pyusb: body-worn recorders plugged and unplugged by tests.

`EmulatedUsbBus` implements `usb.backend.IBackend`, so the agent's real pyusb
code (`usb.core.find`, `usb.util.get_string`) runs unchanged against it. Each
recorder is a USB mass-storage device with one configuration, one bulk-only
interface and two bulk endpoints; it answers GET_DESCRIPTOR for the device
descriptor and for string descriptors (language ids, manufacturer, product,
serial number). Its storage is a directory tree the test creates under the
dock's mount_root, named by the serial, as the udev rule would mount it, or a
real FAT32 image mounted there (`fat_volume`).
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import usb.backend
import usb.core
import usb.util

LANGID_EN_US = 0x0409
STR_MANUFACTURER, STR_PRODUCT, STR_SERIAL = 1, 2, 3


@dataclass
class EmulatedRecorder:
    vendor_id: int
    product_id: int
    serial: str
    manufacturer: str = "Recorder Co."
    product: str = "Body-worn recorder"
    serial_readable: bool = True     # False: the device refuses string requests (permissions, firmware fault)
    bus: int = 1
    address: int = 0
    port: int = 0
    plugged: bool = True

    def strings(self) -> dict[int, str]:
        return {STR_MANUFACTURER: self.manufacturer, STR_PRODUCT: self.product, STR_SERIAL: self.serial}


@dataclass
class _Descriptor:
    """A descriptor as pyusb reads it: plain attributes."""

    fields: dict[str, object] = field(default_factory=dict)

    def __getattr__(self, name: str) -> object:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None


class _Handle:
    def __init__(self, recorder: EmulatedRecorder):
        self.recorder = recorder


class EmulatedUsbBus(usb.backend.IBackend):
    """A USB bus whose devices are the recorders a test plugs in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: list[EmulatedRecorder] = []
        self._addresses = itertools.count(2)
        self.enumerations = 0

    # -- what tests do ------------------------------------------------------------------------------

    def plug(self, vendor_id: int, product_id: int, serial: str, **kwargs: object) -> EmulatedRecorder:
        with self._lock:
            port = len(self._devices) + 1
            recorder = EmulatedRecorder(vendor_id, product_id, serial, address=next(self._addresses), port=port,
                                        **kwargs)  # type: ignore[arg-type]
            self._devices.append(recorder)
        return recorder

    def unplug(self, serial: str) -> None:
        with self._lock:
            for recorder in [d for d in self._devices if d.serial == serial]:
                recorder.plugged = False
                self._devices.remove(recorder)

    # -- IBackend -----------------------------------------------------------------------------------

    def enumerate_devices(self) -> list[EmulatedRecorder]:
        with self._lock:
            self.enumerations += 1
            return list(self._devices)

    def get_device_descriptor(self, dev: EmulatedRecorder) -> _Descriptor:
        return _Descriptor({
            "bLength": 18, "bDescriptorType": usb.util.DESC_TYPE_DEVICE, "bcdUSB": 0x0200,
            "bDeviceClass": 0, "bDeviceSubClass": 0, "bDeviceProtocol": 0, "bMaxPacketSize0": 64,
            "idVendor": dev.vendor_id, "idProduct": dev.product_id, "bcdDevice": 0x0100,
            "iManufacturer": STR_MANUFACTURER, "iProduct": STR_PRODUCT, "iSerialNumber": STR_SERIAL,
            "bNumConfigurations": 1, "bus": dev.bus, "address": dev.address, "port_number": dev.port,
            "port_numbers": (dev.port,), "speed": usb.util.SPEED_HIGH,
        })

    def get_configuration_descriptor(self, dev: EmulatedRecorder, config: int) -> _Descriptor:
        self._only(config == 0, "no such configuration")
        return _Descriptor({
            "bLength": 9, "bDescriptorType": usb.util.DESC_TYPE_CONFIG, "wTotalLength": 32, "bNumInterfaces": 1,
            "bConfigurationValue": 1, "iConfiguration": 0, "bmAttributes": 0x80, "bMaxPower": 250,
            "extra_descriptors": [],
        })

    def get_interface_descriptor(self, dev: EmulatedRecorder, intf: int, alt: int, config: int) -> _Descriptor:
        self._only(intf == 0 and alt == 0 and config == 0, "no such interface")
        return _Descriptor({
            "bLength": 9, "bDescriptorType": usb.util.DESC_TYPE_INTERFACE, "bInterfaceNumber": 0,
            "bAlternateSetting": 0, "bNumEndpoints": 2, "bInterfaceClass": 0x08,  # mass storage
            "bInterfaceSubClass": 0x06, "bInterfaceProtocol": 0x50, "iInterface": 0,  # SCSI, bulk-only
            "extra_descriptors": [],
        })

    def get_endpoint_descriptor(self, dev: EmulatedRecorder, ep: int, intf: int, alt: int,
                                config: int) -> _Descriptor:
        self._only(ep in (0, 1) and intf == 0 and alt == 0 and config == 0, "no such endpoint")
        return _Descriptor({
            "bLength": 7, "bDescriptorType": usb.util.DESC_TYPE_ENDPOINT,
            "bEndpointAddress": 0x81 if ep == 0 else 0x02, "bmAttributes": usb.util.ENDPOINT_TYPE_BULK,
            "wMaxPacketSize": 512, "bInterval": 0, "bRefresh": 0, "bSynchAddress": 0, "extra_descriptors": [],
        })

    def open_device(self, dev: EmulatedRecorder) -> _Handle:
        if not dev.plugged:
            raise usb.core.USBError("No such device (it may have been disconnected)", -4, errno.ENODEV)
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        return None

    def ctrl_transfer(self, dev_handle: _Handle, bmRequestType: int, bRequest: int, wValue: int, wIndex: int,
                      data: array.array, timeout: int) -> int:
        recorder = dev_handle.recorder
        if not recorder.plugged:
            raise usb.core.USBError("No such device (it may have been disconnected)", -4, errno.ENODEV)
        if bmRequestType != 0x80 or bRequest != 0x06:  # only standard device-to-host GET_DESCRIPTOR
            raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
        kind, index = wValue >> 8, wValue & 0xFF
        if kind == usb.util.DESC_TYPE_STRING:
            if not recorder.serial_readable:
                raise usb.core.USBError("Access denied (insufficient permissions)", -3, errno.EACCES)
            if index == 0:
                reply = struct.pack("<BBH", 4, usb.util.DESC_TYPE_STRING, LANGID_EN_US)
            elif index in recorder.strings() and wIndex == LANGID_EN_US:
                text = recorder.strings()[index].encode("utf-16-le")
                reply = bytes([2 + len(text), usb.util.DESC_TYPE_STRING]) + text
            else:
                raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
        elif kind == usb.util.DESC_TYPE_DEVICE:
            d = self.get_device_descriptor(recorder)
            reply = struct.pack("<BBHBBBBHHHBBBB", 18, 1, d.bcdUSB, 0, 0, 0, 64, d.idVendor, d.idProduct,
                                d.bcdDevice, STR_MANUFACTURER, STR_PRODUCT, STR_SERIAL, 1)
        else:
            raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
        n = min(len(reply), len(data))  # data: the wLength-byte buffer pyusb hands in
        data[:n] = array.array("B", reply[:n])
        return n

    @staticmethod
    def _only(condition: bool, message: str) -> None:
        if not condition:
            raise usb.core.USBError(message, -5, errno.ENOENT)


@contextmanager
def fat_volume(image: Path, mount_point: Path, label: str, files: dict[str, bytes]) -> Iterator[Path]:
    """A recorder's storage as a real FAT32 filesystem: an image written with mtools, mounted with fusefat
    at `mount_point` (the kernel here has no vfat module). Unmounted on exit, leaving the empty mount
    point behind as systemd-mount does."""
    subprocess.run(["truncate", "-s", "48M", str(image)], check=True)
    subprocess.run(["mformat", "-i", str(image), "-F", "-v", label[:11], "::"], check=True, capture_output=True)
    folders = sorted({str(PurePosixPath(name).parent) for name in files} - {"."}, key=len)
    made: set[str] = set()
    for folder in folders:
        parts = PurePosixPath(folder).parts
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in made:
                subprocess.run(["mmd", "-i", str(image), f"::/{sub}"], check=True, capture_output=True)
                made.add(sub)
    staging = image.with_suffix(".src")
    staging.mkdir()
    for name, content in files.items():
        local = staging / name.replace("/", "_")
        local.write_bytes(content)
        subprocess.run(["mcopy", "-i", str(image), "-m", str(local), f"::/{name}"], check=True, capture_output=True)
    shutil.rmtree(staging)
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["fusefat", "-o", "rw+", str(image), str(mount_point)], check=True, capture_output=True)
    try:
        yield mount_point
    finally:
        unmount(mount_point)


def unmount(mount_point: Path) -> None:
    if os.path.ismount(mount_point):
        subprocess.run(["fusermount", "-u", "-z", str(mount_point)], check=True)
