"""Liveness, not just aliveness (issue 14, defects 1 and 2): no message kills the uplink; a component that
dies comes back, with a `component_stalled` alarm that fires and clears; systemd's watchdog is fed only
while everything is live; a receiver written from docs/PROTOCOL.md that omits null fields is understood,
and one that answers garbage raises `sync_incompatible` instead of an endless silent retry. Real mosquitto,
real agent and receivers."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_agent.config import LivenessSection, load_config
from edge_agent.daemon import build_agent, watchdog_ping
from edge_agent.ops.liveness import Liveness
from edge_agent.protocol.heartbeat import Heartbeat, Vital
from edge_agent.protocol.wire import Ack
from tests import sync_support as rig
from tests.helpers import agent_config, make_recorder_volume, wait_for, write_toml
from tests.peers.minimal_receiver import MinimalReceiver
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import AGENT_ID, ROOT, catalog_rows, states
from tests.test_sync_e2e import start_pair

SETTLED = ("synced", "source_cleared")
# What killed paho's network thread on main: nesting deeper than the JSON parser's recursion limit.
POISON = [b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe\xfd not utf-8", b"[" + b" " * (3 * 1024 * 1024) + b"]"]


def settled(data_dir: Path) -> int:
    return sum(states(data_dir).get(s, 0) for s in SETTLED)


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish each (suffix under the agent, payload) at QoS 1 and wait for the broker to take it."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile-platform", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for suffix, payload in messages:
            client.publish(f"{ROOT}/{AGENT_ID}/{suffix}", payload, qos=1).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def alarm_history(data_dir: Path, like: str) -> list[tuple[Any, ...]]:
    return catalog_rows(data_dir, "SELECT key, raised_ms, cleared_ms, message FROM alarms WHERE key LIKE ?", (like,))


def agent_connected(tmp_path: Path) -> bool:
    return rig.receiver_logged(tmp_path, "mqtt connected", name="agent")


# -- callbacks cannot kill threads ---------------------------------------------------------------------


def sync_after(tmp_path: Path, port: int, messages: list[bytes]) -> str:
    """Start the agent and the reference receiver, publish each of `messages` on the agent's acks and
    commands topics, then dock one file: it must sync through the same agent process. Returns its log."""
    dock = tmp_path / "dock"
    dock.mkdir()
    _toml, data_dir, _store, agent, receiver = start_pair(tmp_path, port, dock)
    try:
        wait_for(lambda: agent_connected(tmp_path), 30, what="agent connected")
        log = tmp_path / "agent.log"

        def subscribed() -> bool:   # "connected" comes before the broker grants the subscription
            publish_all(port, [("commands", b"probe")])
            return "command dropped" in log.read_text(errors="replace")

        wait_for(subscribed, 30, what="the agent subscribed to its commands")
        start = len(log.read_text(errors="replace"))
        publish_all(port, [(suffix, p) for p in messages for suffix in ("acks", "commands")])
        make_recorder_volume(dock, "VOL1", {"DCIM/AFTER.MP4": 200_000})   # docked after the messages
        wait_for(lambda: settled(data_dir) == 1, 60, what="the file docked afterwards synced")
        assert agent.alive
    finally:
        agent.stop()
        receiver.stop()
    return log.read_text(errors="replace")[start:]   # what the agent logged from the messages on


def test_poison_on_acks_and_commands_does_not_stop_sync(tmp_path: Path, mosquitto: Mosquitto) -> None:
    log = sync_after(tmp_path, mosquitto.port, POISON)
    assert log.count("ack dropped") >= len(POISON) and log.count("command dropped") >= len(POISON)
    assert "nested too deep" in log and "larger than the" in log
    assert "mqtt callback failed" not in log   # the parser refused them; the fault barrier was not needed


# -- dead components come back, alarms fire and clear ---------------------------------------------------


@pytest.fixture
def live_agent(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Any]:
    """An agent built in this process (so faults can be injected into its threads) with a fast supervisor,
    a directory dock, and the reference receiver as a process."""
    dock = tmp_path / "dock"
    dock.mkdir()
    agent_toml, _data_dir = rig.agent_setup(tmp_path, mosquitto.port, dock_root=dock)
    doc = tomllib.loads(agent_toml.read_text(encoding="utf-8"))
    write_toml(agent_toml, {**doc, "liveness": {"check_s": 0.2, "stall_s": 60}})
    rig.enrol(agent_toml, tmp_path / "enrolled")
    receiver = rig.receiver_proc(tmp_path, rig.receiver_setup(tmp_path, mosquitto.port, tmp_path / "store",
                                                      tmp_path / "enrolled")).start()
    wait_for(lambda: rig.receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = build_agent(load_config(agent_toml))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        receiver.stop()


def once_then(real: Any, fault: BaseException) -> Any:
    """`real`, except that its first call raises `fault`."""
    calls: list[int] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise fault
        return real(*args, **kwargs)
    call.calls = calls  # type: ignore[attr-defined]
    return call


# The paho thread is killed on purpose: its traceback is the injected fault, not a finding.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_network_thread_and_a_dead_dock_worker_come_back_and_their_alarms_clear(
        tmp_path: Path, mosquitto: Mosquitto, live_agent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, data_dir = live_agent, tmp_path / "agent-data"
    uplink = agent.uplink
    wait_for(uplink.connection.connected.is_set, 30, what="agent connected")

    # paho's network thread dies of a fault no callback guard sees (raised inside paho's own thread).
    uplink.client.on_message = once_then(uplink.client.on_message, RuntimeError("injected: paho's thread dies"))
    publish_all(mosquitto.port, [("commands", b"{}")])
    connection = "component_stalled:sync-connection"
    wait_for(lambda: any(r[2] is not None for r in alarm_history(data_dir, connection)), 30,
             what="the connection's component_stalled alarm raised and cleared")
    assert agent.operations.liveness.restarts.get("sync-connection", 0) >= 1

    # A dock worker dies of an exception its own barrier does not expect (not an IngestError).
    ingest = once_then(agent.ingestor.ingest_batch, RuntimeError("injected: the dock worker dies"))
    monkeypatch.setattr(agent.ingestor, "ingest_batch", ingest)
    make_recorder_volume(tmp_path / "dock", "VOL1", {"DCIM/REC0001.MP4": 300_000, "DCIM/REC0002.MP4": 5})
    wait_for(lambda: any(r[2] is not None for r in alarm_history(data_dir, "component_stalled:dock-bench-%")), 30,
             what="the dock worker's component_stalled alarm raised and cleared")
    wait_for(lambda: settled(data_dir) == 2, 60, what=f"both files synced after the restarts, {states(data_dir)}")
    assert len(ingest.calls) >= 2                       # the failed call, then the re-docked worker's batch
    assert agent.operations.liveness.live()
    messages = [r[3] for r in alarm_history(data_dir, "component_stalled:%")]
    assert any("sync-connection" in m and "restarted" in m for m in messages)
    assert not [r for r in alarm_history(data_dir, "component_stalled:%") if r[2] is None]   # none still active


def test_the_watchdog_is_fed_only_while_every_component_is_live(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path)
    agent = build_agent(cfg)
    stuck = Heartbeat("stuck-loop")
    liveness = Liveness(agent.catalog, LivenessSection(check_s=0.05, stall_s=0.1), [lambda: [Vital("stuck-loop",
                                                                                                   stuck)]])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(5)
    monkey = pytest.MonkeyPatch()
    monkey.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    ping = watchdog_ping(agent.catalog, liveness)
    try:
        liveness.start()
        wait_for(liveness.live, 5, what="liveness up")
        ping()
        assert server.recv(4096) == b"WATCHDOG=1"
        wait_for(lambda: not liveness.live(), 5, what="the silent loop judged stuck")
        ping()
        assert server.recv(4096).startswith(b"STATUS=stalled: stuck-loop (no progress for")
        assert agent.catalog.alarms.find_active("component_stalled:stuck-loop") is not None
        beating = threading.Event()

        def beat() -> None:
            while not beating.wait(0.02):
                stuck.beat()
        threading.Thread(target=beat, daemon=True).start()
        wait_for(liveness.live, 5, what="the loop live again")
        ping()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert agent.catalog.alarms.find_active("component_stalled:stuck-loop") is None
        beating.set()
    finally:
        liveness.stop()
        monkey.undo()
        server.close()
        agent.catalog.close()


# -- a tolerant reader, loud on incompatibility -----------------------------------------------------------


def minimal_pair(tmp_path: Path, port: int, **receiver: Any) -> tuple[Path, Path, Any, MinimalReceiver]:
    dock = tmp_path / "dock"
    dock.mkdir()
    agent_toml, data_dir = rig.agent_setup(tmp_path, port, dock_root=dock)
    peer = MinimalReceiver(port, ROOT, pin_to=rig.pinned_dir(tmp_path), **receiver)
    agent = rig.agent_proc(tmp_path, agent_toml).start()
    make_recorder_volume(dock, "VOL1", {"DCIM/REC0001.MP4": 1_500_000, "DCIM/REC0002.MP4": 0,
                                        "DCIM/REC0003.MP4": 7})
    return agent_toml, data_dir, agent, peer


def test_a_receiver_written_from_the_document_that_omits_null_fields_gets_every_file(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    _toml, data_dir, agent, peer = minimal_pair(tmp_path, mosquitto.port)
    try:
        wait_for(lambda: settled(data_dir) == 3, 60, what="3 files synced with the minimal receiver")
    finally:
        agent.stop()
        peer.close()
    assert len(peer.stored) == 3
    assert "sync_incompatible" not in (tmp_path / "agent.log").read_text(errors="replace")


def test_a_receiver_that_answers_garbage_raises_sync_incompatible_in_health_status_and_events(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    def garbage(file_id: str) -> bytes:
        return json.dumps({"file_id": file_id, "state": "stored-ok", "have": "all"}).encode()

    agent_toml, data_dir, agent, peer = minimal_pair(tmp_path, mosquitto.port, answer=garbage)
    try:
        rows = wait_for(lambda: alarm_history(data_dir, "sync_incompatible:%"), 90,
                        what="sync_incompatible raised")
        status = json.loads(subprocess.run([*rig.CLI, "--config", str(agent_toml), "--json", "status"],
                                           check=True, capture_output=True, text=True).stdout)
    finally:
        agent.stop()
        peer.close()
    key, _raised, cleared, message = rows[0]
    assert cleared is None
    assert "stored-ok" in message and "docs/PROTOCOL.md" in message and "ack:" in message   # excerpt + reason
    assert key.split(":")[1] in [a["subject"] for a in status["alarms"] if a["kind"] == "sync_incompatible"]
    events = [json.loads(r[0]) for r in catalog_rows(data_dir, "SELECT payload FROM outbox")]
    assert any(e.get("kind") == "sync_incompatible" and e.get("state") == "raised" for e in events)
    assert states(data_dir).get("synced", 0) == 0 and "rejected" not in states(data_dir)   # nothing settled wrongly


def test_a_database_error_in_the_command_check_is_caught_counted_and_the_loop_lives_on(
        tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cfg = agent_config(tmp_path, agent={"id": AGENT_ID}, mqtt={"port": mosquitto.port})
    agent = build_agent(cfg)
    uplink = agent.uplink

    def full_disk(_command: dict[str, Any]) -> bool:
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(uplink.command_gate, "admit", full_disk)
    uplink.start()
    try:
        wait_for(uplink.connection.connected.is_set, 30, what="uplink connected")
        command = json.dumps({"cmd": "resync", "id": "c-1", "ts": 1}).encode()
        publish_all(mosquitto.port, [("commands", command), ("acks", b"not json")])
        wait_for(lambda: uplink.incompatible.dropped == 1, 30, what="the ack after the fault handled")
        assert uplink.connection.faults.counts == {"on_message": 1}
        assert uplink.connection.alive() and uplink.stats()["callback_faults"] == 1
    finally:
        uplink.stop()
        agent.catalog.close()


def test_acks_that_name_no_file_raise_sync_incompatible_once_and_a_usable_ack_clears_it(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path, agent={"id": AGENT_ID}, mqtt={"incompatible_acks": 3})
    agent = build_agent(cfg)
    uplink = agent.uplink
    try:
        for _ in range(4):
            uplink._on_ack(b"\x00garbage")
        uplink.incompatible.raise_pending()
        assert agent.catalog.alarms.find_active("sync_incompatible") is not None
        assert len([a for a in agent.catalog.active_alarms() if a["kind"] == "sync_incompatible"]) == 1
        uplink._handle_ack(Ack("01M8S59DRAPF60WNZD2ETQF4WQ", "receiving", []))
        assert agent.catalog.alarms.find_active("sync_incompatible") is None
    finally:
        agent.catalog.close()


def test_a_supervisor_whose_first_check_is_slow_is_not_stalled_until_that_check_is_overdue(tmp_path: Path) -> None:
    """At start the watchdog pinger may ask before the supervisor's first check is done (a slow start under load):
    not yet checked is not stalled while that check is still due; once three intervals pass without it, it is."""
    _, cfg = agent_config(tmp_path)
    agent = build_agent(cfg)
    release = threading.Event()

    def slow_vitals() -> list[Vital]:
        release.wait(10)   # the first check hangs here
        return []

    liveness = Liveness(agent.catalog, LivenessSection(check_s=0.2, stall_s=1), [slow_vitals])
    try:
        liveness.start()
        assert liveness.not_live() == {}   # started, first check still due: live
        overdue = wait_for(lambda: liveness.not_live().get("liveness"), 5, what="the first check overdue")
        assert "has not checked" in overdue
        release.set()
        wait_for(liveness.live, 5, what="live once the first check is done")
    finally:
        release.set()
        liveness.stop()
        agent.catalog.close()
