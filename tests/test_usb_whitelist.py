"""The USB whitelist (R8): with `unknown_devices = "refuse"` a mass-storage device that is not a recorder in
recorders.toml is never read, and an alarm names it; by default it is ingested as unknown with an alarm."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from watchdog.events import FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from drivers.usb_dock import UsbDock
from edge_agent.sources.recorders import load_models
from tests.evidence_support import ZFY_PRODUCT, ZFY_VENDOR, offline_agent_config, running_agent, wait_states
from tests.fakes.usb_backend import EmulatedUsbBus
from tests.helpers import make_recorder_volume, wait_for

STICK_VENDOR, STICK_PRODUCT = 0x0781, 0x5567   # a USB stick: mass storage, not a recorder


class Opened(FileSystemEventHandler):
    """Every file opened under a folder (inotify IN_OPEN), as seen by the kernel."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileOpenedEvent) and not event.is_directory:
            with self._lock:
                self.files.append(str(event.src_path))


@contextmanager
def watch_opens(*folders: Path) -> Iterator[Opened]:
    opened, observer = Opened(), Observer()
    for folder in folders:
        observer.schedule(opened, str(folder), recursive=True)
    observer.start()
    try:
        yield opened
    finally:
        observer.stop()
        observer.join()


def usb_agent(tmp_path: Path, bus: EmulatedUsbBus, **dock: object):
    mount_root = tmp_path / "media"
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "dock-a", "kind": "usb", "mount_root": str(mount_root),
                                                    **dock}])
    (section,) = cfg.docks
    driver = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.05, unknown_after_s=0.2,
                     unknown_devices=section.unknown_devices)
    return cfg, driver, mount_root


def test_refused_usb_device_leaves_its_volume_unread_and_an_alarm_names_it(tmp_path: Path) -> None:
    bus = EmulatedUsbBus()
    cfg, dock, mount_root = usb_agent(tmp_path, bus, unknown_devices="refuse")
    stick = make_recorder_volume(mount_root, "STICK01", {"DCIM/a.MP4": 2000, "notes.txt": b"private"})
    orphan = make_recorder_volume(mount_root, "sdz1", {"DCIM/b.MP4": 1000})    # no device on the bus claims it
    make_recorder_volume(mount_root, "ZFY0001", {"DCIM/100/A123456_320102123_20261122080102.MP4": 3000})
    with watch_opens(stick, orphan) as opened:
        with running_agent(cfg, [dock]) as agent:
            bus.plug(STICK_VENDOR, STICK_PRODUCT, "STICK01", manufacturer="SanDisk", product="Cruzer Blade")
            bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0001")
            (record,) = wait_states(agent.catalog, 1)
            assert record.device_id == "ZFY0001"                          # the known recorder is ingested
            # The orphan volume is refused once unknown_after_s passed for it, and for the stick's volume too.
            alarms = wait_for(lambda: (lambda a: a if len(a) == 2 else None)(
                {a["subject"]: a for a in agent.catalog.active_alarms()}), what="both refusals alarmed")
            assert {a["kind"] for a in alarms.values()} == {"usb_device_refused"}
            message = alarms["STICK01"]["message"]
            assert "vendor 0781 product 5567 serial STICK01" in message and "SanDisk Cruzer Blade" in message
            assert "'sdz1'" in alarms["sdz1"]["message"]
            labels = {row["volume_label"] for row in agent.catalog.query("SELECT volume_label FROM sessions")}
            assert labels == {"ZFY0001"}
            assert {r.device_id for r in agent.catalog.files()} == {"ZFY0001"}
    assert opened.files == []                                              # not one file of theirs opened


def test_unknown_usb_storage_is_ingested_as_unknown_with_an_alarm_by_default(tmp_path: Path) -> None:
    bus = EmulatedUsbBus()
    cfg, dock, mount_root = usb_agent(tmp_path, bus)
    stick = make_recorder_volume(mount_root, "STICK02", {"DCIM/a.MP4": 2000})
    with watch_opens(stick) as opened, running_agent(cfg, [dock]) as agent:
        bus.plug(STICK_VENDOR, STICK_PRODUCT, "STICK02")
        (record,) = wait_states(agent.catalog, 1)
        assert record.device_id == "unknown:STICK02"
        (alarm,) = agent.catalog.active_alarms()
        assert alarm["kind"] == "recorder_unidentified"
        wait_for(lambda: str(stick / "DCIM/a.MP4") in opened.files, what="the watcher saw the copy open the file")
