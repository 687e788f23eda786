"""The GA/T 947.4 recorder handshake: a stub vendor library (tests/fakes/gat947_recorder.c, compiled here with
gcc) emulates the docked recorder, so the agent's real ctypes calls run; the USB bus is the emulated one."""

from __future__ import annotations

import ctypes
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from drivers.usb_dock import UsbDock
from edge_agent.config import ConfigError
from edge_agent.evidence.manifest import read_document, verify_signature
from edge_agent.ops.health import load_schema
from edge_agent.sources.recorders import load_models
from tests.evidence_support import ZFY_PRODUCT, ZFY_VENDOR, offline_agent_config, running_agent, wait_states
from tests.fakes.usb_backend import EmulatedUsbBus
from tests.helpers import make_recorder_volume, wait_for

STUB_SOURCE = Path(__file__).parent / "fakes" / "gat947_recorder.c"
PASSWORD = "135790"


class StubRecorder:
    """The compiled stub library, loaded by the test (the agent's dlopen of the same file shares its state)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))

    def set(self, key: str, value: str | bytes | int) -> None:
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        self.lib.Stub_Set(key.encode("ascii"), raw)

    def get(self, key: str) -> str:
        buf = ctypes.create_string_buffer(4096)
        assert self.lib.Stub_Get(key.encode("ascii"), buf, len(buf)) >= 0
        return buf.value.decode("utf-8")


@pytest.fixture
def stub(tmp_path: Path) -> StubRecorder:
    library = tmp_path / "libzfy_stub.so"   # one file per test: its own dlopen handle, its own recorder
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wall", "-Werror", "-O2", "-o", str(library), str(STUB_SOURCE)],
                   check=True, capture_output=True)
    recorder = StubRecorder(library)
    for key, value in {"serial": "A123456", "user_no": "320102123", "user_name": "张三".encode("gbk"),
                       "unit_no": "320102", "unit_name": "鼓楼区城管大队".encode("gbk"), "password": PASSWORD,
                       "id_code": "ZFY-GA"}.items():
        recorder.set(key, value)
    return recorder


def recorders_toml(tmp_path: Path, library: Path, password: str = PASSWORD, **extra: object) -> Path:
    text = resources.files("edge_agent").joinpath("data/recorders.toml").read_text(encoding="utf-8")
    head, sep, rest = text.partition('exclude = ["*.bin", "LOG/**/*", "*.idx"]\n')   # the ZFY-GA-2016 entry
    assert sep
    lines = [f'library = "{library}"', f'password = "{password}"',
             *(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in extra.items())]
    path = tmp_path / "recorders.toml"
    path.write_text(head + sep + "\n[models.gat947]\n" + "\n".join(lines) + "\n" + rest, encoding="utf-8")
    return path


def usb_agent(tmp_path: Path, recorders: Path, bus: EmulatedUsbBus):
    mount_root = tmp_path / "media"
    _, cfg = offline_agent_config(tmp_path, agent={"recorders_file": str(recorders)},
                                  docks=[{"name": "dock-a", "kind": "usb", "mount_root": str(mount_root)}])
    dock = UsbDock("dock-a", mount_root, load_models(recorders), backend=bus, poll_s=0.05, zone=cfg.agent.zone)
    return cfg, dock, mount_root


def session_doc(agent, session_id: str) -> dict:
    wait_for(lambda: agent.catalog.sessions.get(session_id)["manifest_sha256"], what="session manifest signed")
    doc = read_document(agent.layout.session_manifest_path(session_id))
    verify_signature(doc, agent.key.public)
    return doc


def test_recorder_identified_by_its_library_clock_offset_recorded_before_it_is_set_and_low_battery_alarm(
        tmp_path: Path, stub: StubRecorder) -> None:
    stub.set("offset_s", -93)       # the recorder runs 93 s slow
    stub.set("battery", 15)         # below the model's 20 %
    bus = EmulatedUsbBus()
    cfg, dock, mount_root = usb_agent(tmp_path, recorders_toml(tmp_path, stub.path, low_battery_percent=20), bus)
    make_recorder_volume(mount_root, "USB0001", {"DCIM/clip0001.MP4": 5000})   # a name that tells no officer
    with running_agent(cfg, [dock]) as agent:
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "USB0001")
        (record,) = wait_states(agent.catalog, 1)
        assert (record.device_id, record.officer_id) == ("A123456", "320102123")   # from the recorder itself
        file_manifest = read_document(agent.layout.manifest_path(record.file_id))
        assert -94_000 <= file_manifest["clock_offset_ms"] <= -92_000               # its clock when docked
        recorder = session_doc(agent, record.session_id)["recorder"]
        assert recorder["serial"] == "A123456" and recorder["usb_serial"] == "USB0001"
        assert (recorder["officer_name"], recorder["unit_id"], recorder["unit_name"]) == (
            "张三", "320102", "鼓楼区城管大队")
        assert recorder["id_code"] == "ZFY-GA" and recorder["battery_percent"] == 15
        # The offset as read before 校时 (the recorder tells whole seconds), then the clock was set.
        assert recorder["clock_offset_ms"] == file_manifest["clock_offset_ms"]
        assert recorder["clock_set"] is True and abs(recorder["clock_offset_after_ms"]) <= 1000
        assert recorder["mass_storage"] is True and recorder["errors"] == []
        assert stub.get("offset_s") == "0" and stub.get("msdc") == "1"
        calls = stub.get("calls").split(",")
        assert calls.index("ReadDeviceTime") < calls.index("SyncDevTime") < calls.index("SetMSDC")
        # Recorded durably (audited) before the correction, with the same offset; the outcome after it.
        entries = {row["action"]: row for row in agent.catalog.query(
            "SELECT seq, action, detail FROM audit WHERE action LIKE 'recorder.%'")}
        assert entries["recorder.clock_read"]["seq"] < entries["recorder.handshake"]["seq"]
        assert f'"clock_offset_ms":{recorder["clock_offset_ms"]}' in entries["recorder.clock_read"]["detail"] \
            .replace(" ", "")
        alarms = {a["kind"]: a for a in agent.catalog.active_alarms()}
        assert set(alarms) == {"recorder_battery_low"}
        assert alarms["recorder_battery_low"]["subject"] == "A123456" and "15%" in alarms["recorder_battery_low"][
            "message"]
        snapshot = agent.operations.health.snapshot()
        jsonschema.validate(snapshot, load_schema())
        (slot,) = snapshot["docks"]
        assert slot["battery_percent"] == 15 and slot["clock_offset_ms"] == recorder["clock_offset_ms"]


def test_wrong_password_refuses_mass_storage_with_an_alarm_and_ingest_goes_on(
        tmp_path: Path, stub: StubRecorder) -> None:
    bus = EmulatedUsbBus()
    cfg, dock, mount_root = usb_agent(tmp_path, recorders_toml(tmp_path, stub.path, password="000000"), bus)
    make_recorder_volume(mount_root, "USB0002", {"DCIM/clip0002.MP4": 3000})
    with running_agent(cfg, [dock]) as agent:
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "USB0002")
        (record,) = wait_states(agent.catalog, 1)
        assert record.device_id == "USB0002"                      # identified by USB instead
        assert stub.get("msdc") == "0" and "SetMSDC" in stub.get("calls")
        (alarm,) = agent.catalog.active_alarms()
        assert alarm["kind"] == "recorder_handshake_failed"
        assert "SetMSDC failed with vendor error 2" in alarm["message"] and "password" in alarm["message"]
        recorder = session_doc(agent, record.session_id)["recorder"]
        assert recorder["mass_storage"] is False and recorder["clock_set"] is False


def test_missing_library_falls_back_to_usb_identification_with_an_alarm(tmp_path: Path) -> None:
    bus = EmulatedUsbBus()
    missing = tmp_path / "no-such-vendor-sdk.so"
    cfg, dock, mount_root = usb_agent(tmp_path, recorders_toml(tmp_path, missing), bus)
    make_recorder_volume(mount_root, "USB0003", {"DCIM/A123456_320102123_20261122080102.MP4": 4000})
    with running_agent(cfg, [dock]) as agent:
        bus.plug(ZFY_VENDOR, ZFY_PRODUCT, "USB0003")
        (record,) = wait_states(agent.catalog, 1)
        assert (record.device_id, record.officer_id) == ("USB0003", "320102123")   # USB serial, file name
        (alarm,) = agent.catalog.active_alarms()
        assert alarm["kind"] == "recorder_handshake_failed" and str(missing) in alarm["message"]
        assert "cannot be loaded" in alarm["message"] and "identified by USB" in alarm["message"]


def test_bad_gat947_table_names_the_key(tmp_path: Path) -> None:
    path = recorders_toml(tmp_path, tmp_path / "x.so", functions='{ initialise = "Init" }', encoding='"klingon"')
    with pytest.raises(ConfigError) as caught:
        load_models(path)
    keys = {p.key for p in caught.value.problems}
    assert keys == {"models[0].gat947.functions.initialise", "models[0].gat947.encoding"}
