"""The USB dock against an emulated bus: the real pyusb enumeration runs, recorders are plugged and pulled."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from drivers.base import DockedVolume, RefusedDevice
from drivers.gat947 import RecorderHandshake
from drivers.usb_dock import UsbDock, udev_serial
from edge_agent.catalog import State
from edge_agent.evidence.manifest import read_document, verify_signature
from edge_agent.sources.recorders import load_models
from tests.evidence_support import (
    HK_PRODUCT,
    HK_VENDOR,
    ZFY_PRODUCT,
    ZFY_VENDOR,
    growing_partial,
    large_file,
    offline_agent_config,
    records,
    running_agent,
    sha256_of,
    wait_states,
)
from tests.fakes.usb_backend import EmulatedUsbBus, fat_volume, unmount
from tests.helpers import make_recorder_volume, wait_for

SHANGHAI = ZoneInfo("Asia/Shanghai")


class DockLog:
    """A DockListener that remembers what the driver reported."""

    def __init__(self) -> None:
        self.events: list[tuple[str, DockedVolume]] = []

    def docked(self, volume: DockedVolume) -> None:
        self.events.append(("docked", volume))

    def undocked(self, volume: DockedVolume) -> None:
        self.events.append(("undocked", volume))

    def recorder_clock_read(self, dock: str, usb_serial: str | None, report: RecorderHandshake) -> None:
        self.events.append(("clock_read", DockedVolume(dock=dock, path=Path(), label=usb_serial or "")))

    def recorder_handshake(self, dock: str, usb_serial: str | None, report: RecorderHandshake) -> None:
        self.events.append(("handshake", DockedVolume(dock=dock, path=Path(), label=usb_serial or "")))

    def device_refused(self, dock: str, device: RefusedDevice) -> None:
        self.events.append(("refused", DockedVolume(dock=dock, path=Path(), label=device.label)))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def usb_config(tmp_path: Path, **dock: object):
    mount_root = tmp_path / "media"
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "dock-a", "kind": "usb", "mount_root": str(mount_root),
                                                    **dock}])
    return cfg, mount_root


def test_recorder_is_docked_only_while_both_device_and_volume_are_present(tmp_path: Path) -> None:
    bus, listener = EmulatedUsbBus(), DockLog()
    mount_root = tmp_path / "media"
    dock = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.05)
    dock.start(listener)
    try:
        bus.plug(0x1234, 0x5678, "NOT-A-RECORDER")           # another USB device: never a recorder
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY 0042")       # serial with a space: udev writes ZFY_0042
        wait_for(lambda: bus.enumerations >= 3, what="bus polled")
        assert listener.events == []                         # device without its volume: not docked
        make_recorder_volume(mount_root, udev_serial("ZFY 0042"), {"DCIM/a.MP4": b"x"})
        wait_for(lambda: listener.kinds() == ["docked"], what="docked")
        volume = listener.events[0][1]
        assert (volume.serial, volume.model, volume.vendor_id, volume.product_id) == (
            "ZFY 0042", "ZFY-GA-2016", ZFY_VENDOR, ZFY_PRODUCT)
        assert volume.path == mount_root / "ZFY_0042" and volume.slot == 1 and volume.dock == "dock-a"

        bus.unplug("ZFY 0042")                               # device pulled, volume still listed
        wait_for(lambda: listener.kinds() == ["docked", "undocked"], what="undocked on unplug")
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY 0042")
        wait_for(lambda: listener.kinds() == ["docked", "undocked", "docked"], what="docked again")
        shutil.rmtree(mount_root / "ZFY_0042")               # volume unmounted, device still on the bus,
        (mount_root / "ZFY_0042").mkdir()                    # its empty mount point left behind
        wait_for(lambda: listener.kinds()[-1] == "undocked", what="undocked on unmount")
        assert listener.kinds() == ["docked", "undocked", "docked", "undocked"]
        assert not any(v.serial == "NOT-A-RECORDER" for _, v in listener.events)
    finally:
        dock.stop()


def test_docked_usb_recorders_are_sealed_with_correct_hashes_signatures_and_tags(tmp_path: Path) -> None:
    cfg, mount_root = usb_config(tmp_path)
    bus = EmulatedUsbBus()
    dock = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.05)
    # Officer from the file name (ZFY), from the identity file (ZFY clip without a pattern name), and
    # from the checkout register (HK names carry no officer).
    zfy = make_recorder_volume(mount_root, "ZFY0001", {
        "DCIM/100/A123456_320102123_20261122080102.MP4": 300_000,
        "DCIM/100/A123456_320102123_20261122081500_2.MP4": 5000,
        "DCIM/101/clip0001.MP4": 2000,
    }, identity={"DeviceID": "A123456", "PoliceID": "320102999", "SerialNo": "ZFY0001"})
    hk = make_recorder_volume(mount_root, "HKSER77", {"20261122_093000_HK12345.mp4": 70_000})
    hk_start = int(datetime(2026, 11, 22, 9, 30, tzinfo=SHANGHAI).timestamp() * 1000)
    with running_agent(cfg, [dock]) as agent:
        with agent.catalog.transaction() as conn:
            conn.execute("INSERT INTO checkouts (device_id, officer_id, from_ms, to_ms, actor) VALUES (?,?,?,?,?)",
                         ("HKSER77", "320104555", hk_start - 3_600_000, None, "custodian"))
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0001")
        bus.plug(HK_VENDOR, HK_PRODUCT, "HKSER77")
        sealed = wait_states(agent.catalog, 4)
        wait_for(lambda: len(agent.catalog.query("SELECT 1 FROM sessions WHERE manifest_sha256 IS NOT NULL")) == 2,
                 what="both session manifests signed")
        by_path = {r.original_path: r for r in sealed}
        for record in sealed:
            source = (zfy if record.device_id == "ZFY0001" else hk) / record.original_path
            assert record.sha256 == sha256_of(source) == sha256_of(agent.layout.data_dir / record.store_path)
            assert record.size == source.stat().st_size
            manifest = read_document(agent.layout.manifest_path(record.file_id))
            verify_signature(manifest, agent.key.public)
            assert manifest["sha256"] == record.sha256 and manifest["size"] == record.size
            assert manifest["unit"] == "鼓楼区城管大队" and manifest["source"]["dock"] == "dock-a"
        tagged = by_path["DCIM/100/A123456_320102123_20261122080102.MP4"]
        manifest = read_document(agent.layout.manifest_path(tagged.file_id))
        assert manifest["source"]["serial"] == "ZFY0001" and manifest["source"]["model"] == "ZFY-GA-2016"
        assert manifest["source"]["device_id"] == "ZFY0001" and manifest["officer_id"] == "320102123"
        assert manifest["recorded_start"] == "2026-11-22T08:01:02.000+08:00"
        assert by_path["DCIM/101/clip0001.MP4"].officer_id == "320102999"           # identity file
        hk_record = by_path["20261122_093000_HK12345.mp4"]
        assert (hk_record.device_id, hk_record.officer_id) == ("HKSER77", "320104555")  # checkout register
        assert hk_record.recorded_start_ms == hk_start
        assert "DEVICE.INI" not in by_path                                            # identity file not evidence

        for session in agent.catalog.query("SELECT * FROM sessions"):
            doc = read_document(agent.layout.session_manifest_path(session["session_id"]))
            verify_signature(doc, agent.key.public)
            mine = {r.file_id: r for r in records(agent.catalog, session_id=session["session_id"])}
            assert {f["file_id"]: (f["sha256"], f["size"]) for f in doc["files"]} == {
                i: (r.sha256, r.size) for i, r in mine.items()}
            assert doc["serial"] == session["serial"] and doc["files_not_sealed"] == []
        assert not agent.catalog.active_alarms()


def test_unreadable_serial_is_still_ingested_as_unknown_with_an_alarm(tmp_path: Path) -> None:
    cfg, mount_root = usb_config(tmp_path)
    bus = EmulatedUsbBus()
    dock = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.05, unknown_after_s=0.2)
    bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0009", serial_readable=False)
    make_recorder_volume(mount_root, "sdc1", {"DCIM/video.MP4": 4096})  # udev names it by kernel name
    with running_agent(cfg, [dock]) as agent:
        (record,) = wait_states(agent.catalog, 1)
        assert record.device_id == "unknown:sdc1"
        assert record.sha256 == sha256_of(mount_root / "sdc1" / "DCIM/video.MP4")
        alarms = agent.catalog.active_alarms()
        assert [a["kind"] for a in alarms] == ["recorder_unidentified"]
        assert "sdc1" in alarms[0]["message"] and "recorders.toml" in alarms[0]["message"]


def test_recorder_unplugged_mid_copy_discards_partial_and_resumes_when_back(tmp_path: Path) -> None:
    cfg, mount_root = usb_config(tmp_path)
    bus = EmulatedUsbBus()
    dock = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.02)
    volume = mount_root / "ZFY0100"
    big = large_file(volume / "DCIM/100/A765432_320102123_20261122100000.MP4", 1 << 30)
    make_recorder_volume(mount_root, "ZFY0100", {"DCIM/100/A765432_320102123_20261122090000.MP4": 1000})
    with running_agent(cfg, [dock]) as agent:
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0100")
        growing_partial(agent.layout.staging)
        bus.unplug("ZFY0100")
        wait_for(lambda: agent.catalog.query("SELECT 1 FROM sessions WHERE state = 'undocked'"),
                 what="session closed on unplug")
        (pending,) = agent.catalog.files(states=[State.DISCOVERED])
        assert pending.original_path.endswith("100000.MP4")
        assert list(agent.layout.staging.glob("*.part")) == []                  # partial discarded
        assert list(agent.layout.media.rglob("*.mp4")) == [agent.layout.data_dir / r.store_path
                                                            for r in agent.catalog.files(states=["sealed"])]
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0100")
        sealed = wait_states(agent.catalog, 2, timeout=120)
        resumed = next(r for r in sealed if r.file_id == pending.file_id)
        assert resumed.sha256 == sha256_of(big)
        assert len(agent.catalog.query("SELECT * FROM files")) == 2
        history = [r["action"] for r in agent.catalog.query("SELECT action FROM audit WHERE subject = ?",
                                                                  (pending.file_id,))]
        assert history == ["file.discovered", "file.staged", "file.sealed"]
    assert json.loads((agent.layout.manifest_path(pending.file_id)).read_bytes())["sha256"] == resumed.sha256


def test_fat_recorder_volume_is_ingested_and_undocked_when_unmounted(tmp_path: Path) -> None:
    cfg, mount_root = usb_config(tmp_path, settle_s=0.2)
    bus = EmulatedUsbBus()
    dock = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.05)
    files = {"DCIM/100/A123456_320102123_20261122080102.MP4": os.urandom(2_000_000),
             "DCIM/100/A123456_320102123_20261122081000.MP4": os.urandom(300_000),
             "RECORD/A123456_320102123_20261122082000.WAV": b""}
    with fat_volume(tmp_path / "card.img", mount_root / "ZFY0300", "ZFY0300", files) as volume, \
            running_agent(cfg, [dock]) as agent:
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0300")
        # fusefat shows the FAT volume label as an empty file at the root: every file on a volume is collected.
        sealed = wait_states(agent.catalog, len(files) + 1)
        for record in sealed:
            assert record.sha256 == hashlib.sha256(files.get(record.original_path, b"")).hexdigest()
            assert (record.device_id, record.officer_id) == (
                "ZFY0300", "320102123" if record.original_path in files else None)   # the label names no officer
        unmount(volume)                          # the custodian unmounts it; the device stays on the bus
        wait_for(lambda: agent.catalog.query("SELECT 1 FROM sessions WHERE state = 'undocked'"),
                 what="undocked once the volume is unmounted")
        assert volume.is_dir() and not any(volume.iterdir())


def test_recorders_in_different_slots_are_copied_at_the_same_time(tmp_path: Path) -> None:
    cfg, mount_root = usb_config(tmp_path)
    bus = EmulatedUsbBus()
    dock = UsbDock("dock-a", mount_root, load_models(), backend=bus, poll_s=0.05)
    for serial in ("ZFY0401", "ZFY0402"):
        large_file(mount_root / serial / "DCIM/100/A123456_320102123_20261122080102.MP4", 256 << 20)
    with running_agent(cfg, [dock]) as agent:
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0401")
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "ZFY0402")
        wait_for(lambda: len(list(agent.layout.staging.glob("*.part"))) == 2, interval=0.005,
                 what="both recorders' copies in staging/ at once")
        sealed = wait_states(agent.catalog, 2, timeout=120)
        assert {r.slot for r in sealed} == {1, 2} and {r.device_id for r in sealed} == {"ZFY0401", "ZFY0402"}
