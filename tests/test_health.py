"""Health (DESIGN.md section 6): the snapshot follows its schema, is published retained on a real broker, is
written for `edge-agent status`, and is sent again as soon as something changes."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.clock import now_ms
from edge_agent.daemon import Agent, build_agent
from edge_agent.evidence.manifest import AgentKey
from edge_agent.ops.health import parse_chrony_tracking
from edge_agent.ops.scheduler import daily_summary
from edge_agent.protocol.wire import validate
from tests.evidence_support import offline_agent_config
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.opsdata import confirm, ingest_file
from tests.peers.mosquitto import Mosquitto


def read_health(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def test_health_is_written_on_start_and_again_when_a_recorder_docks(tmp_path: Path) -> None:
    dock = tmp_path / "dock"
    dock.mkdir()
    # The platform unreachable: with this machine's own broker on 1883 the files would start sending.
    cfg_path, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(dock),
                                                           "settle_s": 0, "rescan_s": 0.2}],
                                         health={"interval_s": 3600, "change_check_s": 0.2})
    agent = build_agent(cfg)
    agent.start()
    try:
        health_file = cfg.agent.data_dir / "health.json"
        first = wait_for(lambda: read_health(health_file), 10, what="the first snapshot")
        validate("health", first)
        assert first["docks"] == [] and first["agent_id"] == "ws-test-01"

        make_recorder_volume(dock, "VOL1", {"DCIM/a.mp4": 3000, "DCIM/b.mp4": 5000})
        docked = wait_for(lambda: (h := read_health(health_file)) and h["agent"]["queue"]["by_state"] == {"sealed": 2}
                          and h, 15, what="a snapshot showing the docked recorder's files sealed")
        validate("health", docked)
        slot = docked["docks"][0]
        assert slot["dock"] == "bench" and slot["label"] == "VOL1" and slot["device_id"] == "unknown:VOL1"
        assert docked["agent"]["queue"]["bytes"] == 8000
        assert docked["agent"]["disk"]["store_bytes"] == 8000
        assert any(a["kind"] == "recorder_unidentified" for a in docked["alarms"])

        status = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "status"])
        assert status.exit_code == 0, status.output
        live = json.loads(status.stdout)["daemon"]
        assert live["agent"]["pid"] == agent.pid and live["docks"][0]["label"] == "VOL1"
    finally:
        agent.stop()


def test_status_says_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    cfg_path, cfg = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "c1", {"a.mp4": 100})
    CliRunner().invoke(app, ["--config", str(cfg_path), "import", str(card), "--device", "DSJ-1"])
    stale = {"ts_ms": 1, "agent": {}}
    (cfg.agent.data_dir / "health.json").write_text(json.dumps(stale))

    as_json = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "status"])
    human = CliRunner().invoke(app, ["--config", str(cfg_path), "status"])

    assert json.loads(as_json.stdout)["daemon"] is None
    assert "daemon is not running" in human.output


def test_health_is_published_retained_and_matches_its_schema(tmp_path: Path, mosquitto: Mosquitto) -> None:
    _, cfg = agent_config(tmp_path, mqtt={"host": "127.0.0.1", "port": mosquitto.port},
                          health={"interval_s": 3600, "change_check_s": 0.2})
    agent = build_agent(cfg)
    # Sealed before the uplink can connect: the snapshot taken at connect then counts it (a file sealed after
    # the connect would wait for the next interval, since counts are no change a watcher hears at once).
    ingest_file(agent, tmp_path / "src", "a.mp4", 1234)
    agent.start()
    try:
        # The first tick may run before the uplink connects; connecting is a change, published at once.
        wait_for(lambda: (h := read_health(cfg.agent.data_dir / "health.json")) and h["agent"]["sync"]["connected"],
                 15, what="a snapshot taken once the uplink was connected")
    finally:
        agent.stop()

    # A late subscriber (the platform after a restart) still gets the last snapshot: it is retained.
    received: list[mqtt.MQTTMessage] = []
    got = threading.Event()

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        received.append(message)
        got.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="platform-watch", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe(f"{cfg.mqtt.root}/{cfg.agent.id}/health", qos=1)
    client.loop_start()
    try:
        assert got.wait(10), "no retained health snapshot on the broker"
    finally:
        client.loop_stop()
        client.disconnect()
    message = received[0]
    assert message.retain
    snapshot = json.loads(message.payload)
    validate("health", snapshot)
    assert snapshot["schema_version"] == 1 and snapshot["agent"]["sync"]["connected"]
    assert snapshot["agent"]["queue"]["by_state"]


def test_platform_health_command_gets_a_snapshot_at_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    platform_key = AgentKey(Ed25519PrivateKey.generate())
    (tmp_path / "platform.pem").write_text(platform_key.public_pem())
    _, cfg = agent_config(tmp_path, mqtt={"host": "127.0.0.1", "port": mosquitto.port,
                                          "command_keys": str(tmp_path / "platform.pem")},
                          health={"interval_s": 3600, "change_check_s": 0.2})
    health_file = cfg.agent.data_dir / "health.json"
    agent = build_agent(cfg)
    agent.start()
    platform = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="platform", protocol=mqtt.MQTTv5)
    platform.connect("127.0.0.1", mosquitto.port)
    platform.loop_start()
    try:
        connected = wait_for(lambda: (h := read_health(health_file)) and h["agent"]["sync"]["connected"] and h,
                             15, what="a snapshot once connected")
        command = platform_key.sign({"cmd": "health", "id": "h-1", "ts": now_ms(), "seq": 1,
                                     "agent": cfg.agent.id})
        platform.publish(f"{cfg.mqtt.root}/{cfg.agent.id}/commands", json.dumps(command), qos=1).wait_for_publish(5)
        wait_for(lambda: read_health(health_file)["ts_ms"] > connected["ts_ms"], 10,
                 what="a fresh snapshot after the health command")
    finally:
        platform.loop_stop()
        platform.disconnect()
        agent.stop()


def test_cameras_appear_in_the_snapshot_as_their_service_reports_them(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path, cameras=[{"name": "gate-east", "rtsp": "rtsp://127.0.0.1:9/none",
                                              "location": "鼓楼区中山路口", "location_kind": "street"}])
    agent = build_agent(cfg)

    snapshot = agent.operations.health.snapshot()

    validate("health", snapshot)
    assert [(c["name"], c["connected"], c["location"]) for c in snapshot["cameras"]] == [
        ("gate-east", False, "鼓楼区中山路口")]
    agent.catalog.close()


def test_snapshot_says_when_the_next_one_is_due(tmp_path: Path) -> None:
    """The fleet monitor calls an agent stale after 3 intervals without health: the snapshot carries it."""
    _, cfg = agent_config(tmp_path, health={"interval_s": 12.5})
    agent = build_agent(cfg)

    snapshot = agent.operations.health.snapshot()

    validate("health", snapshot)
    assert snapshot["agent"]["health_interval_s"] == 12.5
    agent.catalog.close()


def test_daily_summary_counts_the_last_24_hours(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path)
    agent = Agent(cfg, dock_drivers=[])
    first = ingest_file(agent, tmp_path / "src", "a.mp4", 1000)
    ingest_file(agent, tmp_path / "src", "b.mp4", 2000)
    confirm(agent, first.file_id)

    summary = daily_summary(agent.catalog, cfg.agent.id)

    assert summary["type"] == "summary"
    validate("event", summary)
    assert summary["ingested"] == {"files": 2, "bytes": 3000}
    assert summary["synced"] == {"files": 1, "bytes": 1000}
    assert summary["files_by_state"] == {"sealed": 1, "synced": 1}


def test_chrony_tracking_is_read_as_offset_and_sync_state() -> None:
    line = "A29FC87B,162.159.200.123,3,1700000000.123,-0.004512,0.000010,0.000050,-12.345,0.001,0.020,0.010,0.001," \
           "64.5,Normal"
    clock = parse_chrony_tracking(line)
    assert clock == {"source": "chrony", "synchronized": True, "offset_ms": -5, "reference": "162.159.200.123"}
