"""The agent's own clock (R9): health and every sealed manifest carry the kernel's synchronisation state, read
by adjtimex(2); the test reads the same syscall on its own (raw `syscall`, its own struct offsets) around them."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import read_document, verify_signature
from edge_agent.ops.health import load_schema
from edge_agent.ops.retention import Retention
from edge_agent.protocol.wire import schema
from tests.evidence_support import offline_agent_config, running_agent, wait_states
from tests.helpers import agent_config, make_recorder_volume

SYS_ADJTIMEX = {"x86_64": 159, "aarch64": 171}[platform.machine()]   # the syscall's number, by architecture
TIMEX_SIZE = 208
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class Timex:
    state: int
    status: int
    maxerror_us: int
    esterror_us: int
    time_ms: int

    @property
    def synchronized(self) -> bool:
        return self.state != 5 and not self.status & 0x40


def adjtimex() -> Timex:
    """adjtimex(2) with modes 0 through the raw syscall: modes u32 (+pad), offset, freq, maxerror, esterror
    (longs at 8..40), status int at 40, then constant, precision, tolerance, and struct timeval at 72."""
    buf = ctypes.create_string_buffer(TIMEX_SIZE)
    state = _libc.syscall(SYS_ADJTIMEX, buf)
    assert state >= 0, ctypes.get_errno()
    raw = buf.raw
    maxerror, esterror = struct.unpack_from("<qq", raw, 24)
    (status,) = struct.unpack_from("<i", raw, 40)
    sec, sub = struct.unpack_from("<qq", raw, 72)
    return Timex(state, status, maxerror, esterror, sec * 1000 + sub // (1_000_000 if status & 0x2000 else 1000))


def _between(low: int, value: int, high: int) -> bool:
    return low <= value <= high


def test_health_shows_the_kernels_clock_state_read_by_adjtimex(tmp_path: Path) -> None:
    _, cfg = offline_agent_config(tmp_path, health={"clock_sync_alarm": True, "clock_error_alarm_ms": 500})
    with running_agent(cfg, []) as agent:
        before = adjtimex()
        snapshot = agent.operations.health.tick()
        after = adjtimex()
        jsonschema.validate(snapshot, load_schema())
        clock = snapshot["agent"]["clock"]
        kernel = clock["kernel"]
        # The same read as the test's, taken between the test's two: its time lies between theirs.
        assert _between(before.time_ms, kernel["read_ms"], after.time_ms)
        assert kernel["synchronized"] is before.synchronized is after.synchronized
        assert kernel["status"] == before.status and kernel["state"] == before.state
        assert _between(before.maxerror_us, kernel["maxerror_us"], after.maxerror_us)
        assert kernel["esterror_us"] in (before.esterror_us, after.esterror_us)
        if clock["source"] == "kernel":
            assert clock["synchronized"] is before.synchronized
        # The alarm follows the kernel's verdict: unsynchronised, or a maximum error above 500 ms.
        expected = not before.synchronized or before.maxerror_us > 500_000
        alarms = {a["kind"]: a for a in snapshot["alarms"]}
        assert ("clock_unsynchronized" in alarms) is expected
        if expected:
            assert "chrony" in alarms["clock_unsynchronized"]["message"]


def test_clock_alarm_follows_the_kernels_verdict_and_clears(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path, health={"clock_sync_alarm": True, "clock_error_alarm_ms": 100})
    agent = Agent(cfg, dock_drivers=[])   # not started: only this test evaluates
    try:
        health = agent.health_monitor(Retention(agent.catalog, agent.layout, cfg))
        snapshot = health.snapshot()
        kernel = {"synchronized": False, "maxerror_us": 16_000_000, "esterror_us": 16_000_000, "state": 5,
                  "status": 0x40, "read_ms": snapshot["ts_ms"]}
        clock = snapshot["agent"]["clock"] = {"source": "kernel", "synchronized": False, "offset_ms": None,
                                              "kernel": kernel}
        health.alarms.evaluate(snapshot)
        (alarm,) = agent.catalog.active_alarms()
        assert alarm["kind"] == "clock_unsynchronized" and "not synchronised" in alarm["message"]
        kernel.update(synchronized=True, maxerror_us=40_000, esterror_us=1_000, state=0, status=0)
        clock["synchronized"] = True
        health.alarms.evaluate(snapshot)
        assert agent.catalog.active_alarms() == []
        kernel["maxerror_us"] = 250_000                         # synchronised, but may be off by more than 100 ms
        health.alarms.evaluate(snapshot)
        (alarm,) = agent.catalog.active_alarms()
        assert "up to 250 ms" in alarm["message"]
    finally:
        agent.catalog.close()
        agent.owner.release()


def test_each_sealed_manifest_carries_the_clock_state_at_sealing(tmp_path: Path) -> None:
    root = tmp_path / "dock"
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "dock-a", "kind": "directory", "root": str(root)}])
    make_recorder_volume(root, "ZFY0001", {"DCIM/a.MP4": 1000, "DCIM/b.MP4": 2000})
    with running_agent(cfg) as agent:
        before = adjtimex()
        sealed = wait_states(agent.catalog, 2)
        after = adjtimex()
    for record in sealed:
        manifest = read_document(agent.layout.manifest_path(record.file_id))
        verify_signature(manifest, agent.key.public)
        jsonschema.validate(manifest, schema("manifest"))
        clock = manifest["clock"]
        assert clock["source"] == "kernel" and clock["synchronized"] is before.synchronized is after.synchronized
        assert _between(min(before.maxerror_us, after.maxerror_us), clock["maxerror_us"],
                        max(before.maxerror_us, after.maxerror_us))
        assert clock["esterror_us"] in (before.esterror_us, after.esterror_us)
