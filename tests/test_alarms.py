"""Each alarm fires once (row, event, audit) and clears when its condition is gone or a custodian deals with it."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from edge_agent.catalog import State
from edge_agent.cli import app
from edge_agent.clock import now_ms
from edge_agent.daemon import Agent, build_agent
from edge_agent.evidence.scrub import Scrubber
from edge_agent.ops.health import HealthMonitor
from edge_agent.ops.retention import Retention
from edge_agent.protocol.wire import validate
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.opsdata import confirm, ingest_file

KIB = 1024


def alarm_events(agent: Agent, key: str) -> list[str]:
    """The states (raised/cleared) of `key`'s events queued for the events topic, in order."""
    out = []
    for row in agent.catalog.query("SELECT payload FROM outbox WHERE topic = 'events' ORDER BY id"):
        event = json.loads(row["payload"])
        validate("event", event)
        if event.get("type") == "alarm" and event["key"] == key:
            out.append(event["state"])
    return out


def active(agent: Agent) -> dict[str, Any]:
    return {a["key"]: a for a in agent.catalog.active_alarms()}


def monitor(tmp_path: Path, **sections: Any) -> tuple[Path, Agent, HealthMonitor]:
    cfg_path, cfg = agent_config(tmp_path, **sections)
    agent = Agent(cfg, dock_drivers=[])
    return cfg_path, agent, agent.health_monitor(Retention(agent.catalog, agent.layout, cfg))


def test_disk_above_threshold_fires_once_and_clears_after_purge(tmp_path: Path) -> None:
    size = 100 * KIB
    # The store may hold four files; at three it is 75 % full, above the 60 % alarm.
    _, agent, health = monitor(tmp_path, agent={"max_disk_gb": 4 * size / 1024**3},
                               health={"disk_alarm_percent": 60}, retention={"disk_purge_percent": 50})
    files = [ingest_file(agent, tmp_path / "src", f"{i}.MP4", size) for i in range(3)]

    snapshot = health.tick()
    health.tick()

    assert "disk_high" in active(agent)
    assert [a["key"] for a in snapshot["alarms"]] == ["disk_high"]
    assert alarm_events(agent, "disk_high") == ["raised"]
    for record in files:
        confirm(agent, record.file_id)
    Retention(agent.catalog, agent.layout, agent.config).run()
    snapshot = health.tick()
    assert "disk_high" not in active(agent)
    assert snapshot["alarms"] == []
    assert alarm_events(agent, "disk_high") == ["raised", "cleared"]


def test_file_not_synced_24h_after_ingest_fires_and_clears_when_confirmed(tmp_path: Path) -> None:
    _, agent, health = monitor(tmp_path)
    fresh = ingest_file(agent, tmp_path / "src", "fresh.MP4")
    late = ingest_file(agent, tmp_path / "src", "late.MP4")
    health.tick()
    assert "unsynced_overdue" not in active(agent)

    agent.catalog.update(late.file_id, ingested_at_ms=now_ms() - 25 * 3600 * 1000)
    health.tick()
    alarm = active(agent)["unsynced_overdue"]
    assert "1 file(s) not on the platform 24 h" in alarm["message"]

    confirm(agent, late.file_id)
    health.tick()
    assert "unsynced_overdue" not in active(agent)
    assert agent.catalog.get(fresh.file_id).state == State.SEALED
    assert alarm_events(agent, "unsynced_overdue") == ["raised", "cleared"]


def test_clock_offset_above_threshold_fires_and_clears(tmp_path: Path) -> None:
    _, agent, health = monitor(tmp_path, health={"clock_offset_alarm_ms": 2000})
    snapshot = health.snapshot()
    snapshot["agent"]["clock"]["offset_ms"] = -3500
    snapshot["cameras"] = [{"name": "gate-east", "connected": True, "clock_offset_ms": 9000}]

    health.alarms.evaluate(snapshot)

    assert {"clock_offset", "clock_offset:gate-east"} <= set(active(agent))
    assert "-3500 ms" in active(agent)["clock_offset"]["message"]
    snapshot["agent"]["clock"]["offset_ms"] = 12
    snapshot["cameras"][0]["clock_offset_ms"] = -40
    health.alarms.evaluate(snapshot)
    assert not active(agent)
    assert alarm_events(agent, "clock_offset") == ["raised", "cleared"]
    assert alarm_events(agent, "clock_offset:gate-east") == ["raised", "cleared"]


def test_receiver_rejection_alarm_clears_once_the_file_is_resent_and_confirmed(tmp_path: Path) -> None:
    _, agent, health = monitor(tmp_path)
    record = ingest_file(agent, tmp_path / "src", "a.MP4")
    catalog = agent.catalog
    # What the uplink does on a `rejected` ack.
    catalog.transition(record.file_id, State.SENDING, expect=State.SEALED, actor="test")
    catalog.transition(record.file_id, State.REJECTED, expect=State.SENDING, actor="test", reason="bad signature")
    key = f"sync_rejected:{record.file_id}"
    catalog.raise_alarm(key, "sync_rejected", record.file_id, "the platform rejected it")
    health.tick()
    assert key in active(agent), "a rejection stays until the file is confirmed"

    catalog.transition(record.file_id, State.SEALED, expect=State.REJECTED, actor="test", reason="retry")
    confirm(agent, record.file_id)
    health.tick()
    assert key not in active(agent)
    assert alarm_events(agent, key) == ["raised", "cleared"]


def test_tamper_found_by_scrub_fires_once_and_a_custodian_clears_it(tmp_path: Path) -> None:
    cfg_path, agent, _ = monitor(tmp_path)
    good = ingest_file(agent, tmp_path / "src", "good.MP4", 300 * KIB)
    bad = ingest_file(agent, tmp_path / "src", "bad.MP4", 300 * KIB)
    stored = agent.layout.data_dir / str(bad.store_path)
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0x01]))
    scrubber = Scrubber(agent.catalog, agent.layout, agent.config)

    run = scrubber.run_once(force=True)
    scrubber.run_once(force=True)

    assert run.pass_completed and run.files == 2 and run.findings == 1
    key = f"tamper:{bad.file_id}:media"
    assert list(active(agent)) == [key]
    assert active(agent)[key]["kind"] == "tamper"
    assert good.file_id not in json.dumps([dict(a) for a in agent.catalog.active_alarms()])
    tamper_events = [json.loads(r["payload"]) for r in agent.catalog.query("SELECT payload FROM outbox")
                     if json.loads(r["payload"]).get("type") == "tamper"]
    assert [(e["subject"], e["found_by"]) for e in tamper_events] == [(bad.file_id, "scrub")]
    assert alarm_events(agent, key) == ["raised"]

    result = CliRunner().invoke(app, ["--config", str(cfg_path), "alarms", "clear", key, "--reason",
                                      "compared with the platform copy; local disk fault, case 17"])
    assert result.exit_code == 0, result.output
    assert not active(agent)
    assert alarm_events(agent, key) == ["raised", "cleared"]
    entry = agent.catalog.query("SELECT * FROM audit WHERE action = 'alarm.cleared_by_custodian'")[0]
    assert entry["subject"] == bad.file_id and "case 17" in entry["reason"]


def test_unidentified_recorder_alarm_clears_when_a_custodian_assigns_it(tmp_path: Path) -> None:
    dock = tmp_path / "dock"
    dock.mkdir()
    cfg_path, cfg = agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(dock),
                                                   "settle_s": 0, "rescan_s": 0.2}])
    agent = build_agent(cfg)
    agent.start()
    try:
        make_recorder_volume(dock, "NONAME", {"clip0001.mp4": 2048})
        key = "unidentified:bench:NONAME"
        wait_for(lambda: key in active(agent), 20, what="the unidentified-recorder alarm")
        assert active(agent)[key]["subject"] == "unknown:NONAME"

        result = CliRunner().invoke(app, ["--config", str(cfg_path), "assign", "unknown:NONAME", "--officer",
                                          "320102123", "--reason", "labelled by custodian"])
        assert result.exit_code == 0, result.output
        assert key not in active(agent)
        assert alarm_events(agent, key) == ["raised", "cleared"]
    finally:
        agent.stop()


def test_scrub_stops_mid_file_when_the_daemon_stops_and_checks_that_file_again(tmp_path: Path) -> None:
    _, agent, _ = monitor(tmp_path, health={"scrub_mb_s": 1})
    record = ingest_file(agent, tmp_path / "src", "big.MP4", 8 * 1024 * KIB)   # 8 s of scrubbing at 1 MB/s
    stop = threading.Event()
    scrubber = Scrubber(agent.catalog, agent.layout, agent.config, stop=stop)
    runs: list[Any] = []
    worker = threading.Thread(target=lambda: runs.append(scrubber.run_once(force=True)))
    worker.start()
    wait_for(lambda: scrubber._paced_bytes > 0, 10, what="the scrub to start hashing")
    stop.set()
    worker.join(5)
    assert not worker.is_alive(), "the scrub did not stop"
    assert runs[0].findings == 0 and not runs[0].pass_completed
    assert agent.catalog.meta_get("scrub_cursor") < record.file_id   # not counted as checked


def test_scrub_does_not_call_a_file_purged_under_it_tamper_but_does_a_missing_one(tmp_path: Path) -> None:
    _, agent, _ = monitor(tmp_path)
    purged = confirm(agent, ingest_file(agent, tmp_path / "src", "purged.MP4").file_id)
    vanished = ingest_file(agent, tmp_path / "src", "vanished.MP4")
    scrubber = Scrubber(agent.catalog, agent.layout, agent.config)
    Retention(agent.catalog, agent.layout, agent.config).purge(purged.file_id, "test")   # after the batch was read
    os.unlink(agent.layout.data_dir / str(vanished.store_path))

    assert scrubber.check(purged) == []
    assert [f.what for f in scrubber.check(vanished)] == ["media"]
