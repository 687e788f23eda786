"""The fleet monitor (issue 12): the platform watches every agent through the MQTT health topics.

Real parts: mosquitto, the monitor as an `edge-agent fleet serve` process, a real agent daemon, lightweight agents
publishing snapshots a real agent took, a real Prometheus scraping the monitor and evaluating alerts.yml, promtool.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.clock import now_ms
from edge_agent.config import parse_fleet_config
from edge_agent.platform.fleet.exporter import registry_for
from edge_agent.platform.fleet.model import head_regression
from edge_agent.platform.fleet.monitor import FleetMonitor
from tests.fleet_support import (
    Publisher,
    fleet_config,
    fleet_proc,
    health_of,
    real_snapshot,
    samples,
    scrape,
    value,
)
from tests.helpers import wait_for, write_toml
from tests.peers.mosquitto import Mosquitto
from tests.peers.prometheus import Prometheus, promtool
from tests.sync_support import AGENT_ID, CLI, agent_proc

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "config" / "prometheus"
DAY_S = 24 * 3600
# A real agent's intake with its clock set back (argv: agent.toml, a card directory, seconds back).
BACKDATED_INGEST = """
import sys, time
real_time = time.time
time.time = lambda: real_time() - float(sys.argv[3])
from pathlib import Path
from edge_agent.config import load_config
from edge_agent.daemon import build_agent
from tests.opsdata import ingest_file
agent = build_agent(load_config(sys.argv[1]))
ingest_file(agent, Path(sys.argv[2]), "old.mp4")
agent.catalog.close()
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return real_snapshot(tmp_path_factory.mktemp("template"))


def fleet_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "fleet", *args, "--config", str(config)], capture_output=True, text=True,
                          timeout=60)


def fleet_json(config: Path, *args: str) -> Any:
    result = subprocess.run([*CLI, "--json", "fleet", *args, "--config", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_head_regresses_when_its_sequence_goes_down_or_it_changes_without_growing() -> None:
    assert head_regression("7:aa", "8:bb") is None
    assert head_regression("7:aa", "7:aa") is None
    assert head_regression(None, "3:cc") is None
    assert head_regression("7:aa", "6:aa") == "sequence went down from 7 to 6"
    assert head_regression("7:aa", "7:bb") == "head changed without growing: 7:aa -> 7:bb"
    assert head_regression("7:aa", None) is not None


def test_alert_rules_pass_promtool_checks_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(PROM_DIR / "alerts.yml"))
    assert checked.returncode == 0 and "10 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool("check", "config", str(PROM_DIR / "prometheus.example.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    names = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert names == {"AgentOffline", "AgentStale", "UnsyncedOver24h", "DiskNearlyFull", "CameraDown",
                     "CameraGapToday", "ChainRegressed", "SyncIncompatible", "ComponentStalled", "ClockOffsetHigh"}


def test_fleet_commands_say_what_to_do_without_a_database_or_an_agent(tmp_path: Path,
                                                                     template: dict[str, Any]) -> None:
    config, _ = fleet_config(tmp_path, 1883)
    missing = fleet_cli(config, "status")
    assert missing.returncode == 2 and "is `edge-agent fleet serve` running" in missing.stderr

    cfg = parse_fleet_config({"fleet": {"db_path": str(tmp_path / "fleet" / "fleet.sqlite")}})
    monitor = FleetMonitor(cfg)
    monitor.ingest("evidence/v1/ws-01/health", json.dumps(health_of(template, "ws-01")).encode())
    monitor.flush()
    monitor.store.close()
    unknown = fleet_cli(config, "show", "ws-02")
    assert unknown.returncode == 1 and "`edge-agent fleet status` lists the agents" in unknown.stderr
    assert fleet_json(config, "show", "ws-01")["health"]["agent_id"] == "ws-01"


def test_the_fleet_is_rebuilt_from_retained_state_and_kept_across_a_monitor_restart(
        tmp_path: Path, mosquitto: Mosquitto, template: dict[str, Any]) -> None:
    now = now_ms()
    sims = Publisher(mosquitto.port)
    try:
        sims.online("ws-ok", now)
        sims.send("ws-ok", "health", health_of(template, "ws-ok", audit_head="5:aa", chain_head="2:cc"))
        sims.online("ws-gone", now, state="offline")
        sims.send("ws-gone", "health", health_of(template, "ws-gone"))
        sims.online("ws-late", now)
        late = {"files": 12, "bytes": 9000, "oldest_unsynced_age_s": DAY_S + 3600}
        sims.send("ws-late", "health", health_of(template, "ws-late", queue=late))
        config, listen = fleet_config(tmp_path, mosquitto.port)
        monitor = fleet_proc(tmp_path, config).start()
        try:
            wait_for(lambda: value(scrape(listen), "edge_fleet_agents") == 3, 30, what="3 agents from retained state")
            sims.send("ws-ok", "events", {"type": "dock", "ts": now, "message": "ZFY0001 docked"}, retain=False)
            sims.send("ws-ok", "events", {"type": "alarm", "ts": now, "kind": "disk_high", "message": "disk 91%"},
                      retain=False)
            wait_for(lambda: len(fleet_json(config, "show", "ws-ok")["events"]) == 2, 30, what="2 events kept")

            human = fleet_cli(config, "status")
            assert human.returncode == 0, human.stderr
            lines = human.stdout.splitlines()
            assert lines[0] == "3 agents: 1 offline, 0 stale, 1 over 24h, 0 regressed, 2 with problems"
            assert all(len(line) <= 80 for line in lines), lines
            assert [line.split()[0] for line in lines[2:]] == ["ws-gone", "ws-late", "ws-ok"]   # worst first
            status = fleet_json(config, "status")
            assert status["counts"]["r1_breach"] == 1 and status["fleet"][1]["r1_breach"] is True
        finally:
            assert monitor.stop() == 0

        # While the monitor is down, ws-ok's audit log is rewound (its catalog restored from a backup).
        sims.send("ws-ok", "health", health_of(template, "ws-ok", audit_head="3:a3", chain_head="2:cc"))
        monitor = fleet_proc(tmp_path, config).start()
        try:
            detail = wait_for(lambda: (d := fleet_json(config, "show", "ws-ok"))["regressions"] and d, 30,
                              what="the rewound audit head seen against the head kept before the restart")
            assert detail["regressions"]["audit"]["why"] == "sequence went down from 5 to 3"
            assert "chain" not in detail["regressions"]
            assert detail["regressed"] == {"audit": True}
            assert [e["type"] for e in detail["events"]] == ["fleet_regression", "alarm", "dock"]
            assert value(scrape(listen), "edge_fleet_head_regressed", agent="ws-ok", head="audit") == 1
        finally:
            assert monitor.stop() == 0
    finally:
        sims.close()


def test_malformed_health_is_refused_without_losing_the_other_agents(
        tmp_path: Path, mosquitto: Mosquitto, template: dict[str, Any]) -> None:
    odd = 'ws "東" \\ 01'
    sims = Publisher(mosquitto.port)
    config, listen = fleet_config(tmp_path, mosquitto.port)
    monitor = fleet_proc(tmp_path, config).start()
    try:
        sims.send("ws-good", "health", health_of(template, "ws-good", queue={"files": 7}))
        sims.send(odd, "health", health_of(template, odd))
        wait_for(lambda: value(scrape(listen), "edge_fleet_agents") == 2, 30, what="both agents")

        bad: dict[str, bytes] = {
            "too_large": json.dumps(health_of(template, "ws-good", pad="x" * 300_000)).encode(),
            "too_deep": b"[" * 100_000 + b"]" * 100_000,
            "schema": json.dumps({**health_of(template, "ws-good"), "schema_version": 99}).encode(),
            "not_json": b"\xff\xfe not json",
            "agent_mismatch": json.dumps(health_of(template, "ws-other")).encode(),
        }
        for payload in bad.values():
            sims.send("ws-good", "health", payload)
        sims.send("ws-good", "events", b'{"type": "gap", "ts": "yesterday"}', retain=False)
        sims.send("ws-nested", "status", b'{"a":' * 20_000 + b"1" + b"}" * 20_000)

        def refused(text: str) -> dict[str, float]:
            return {dict(k)["reason"]: v for k, v in samples(text, "edge_fleet_refused_total").items()
                    if dict(k)["topic"] == "health"}
        text = wait_for(lambda: (t := scrape(listen)) and value(t, "edge_fleet_messages_total", topic="status") == 1
                        and sum(refused(t).values()) == 5 and t, 30, what="the bad snapshots and status refused")
        assert refused(text) == dict.fromkeys(bad, 1.0)
        assert value(text, "edge_fleet_refused_total", topic="events", reason="schema") == 1
        assert value(text, "edge_fleet_refused_total", topic="status", reason="too_deep") == 1
        assert monitor.alive
        assert value(text, "edge_fleet_unsynced_files", agent="ws-good") == 7     # its last good snapshot kept
        assert value(text, "edge_fleet_agent_refused_total", agent="ws-good") == 6
        assert value(text, "edge_fleet_unsynced_files", agent=odd) is not None     # the odd id, escaped and back
        lint = promtool("check", "metrics", stdin=text.encode())
        assert lint.returncode == 0, lint.stdout + lint.stderr
        shown = fleet_json(config, "show", "ws-good")
        assert shown["refused"]["last_reason"] == "schema"   # the bad event came last
        assert shown["figures"]["queue_files"] == 7
    finally:
        monitor.stop()
        sims.close()


def test_each_agent_keeps_only_its_newest_events(tmp_path: Path) -> None:
    cfg = parse_fleet_config({"fleet": {"db_path": str(tmp_path / "fleet.sqlite"), "events_per_agent": 3}})
    monitor = FleetMonitor(cfg)
    try:
        for i in range(5):
            for agent in ("ws-a", "ws-b"):
                monitor.ingest(f"evidence/v1/{agent}/events",
                               json.dumps({"type": "dock", "ts": i, "message": f"{agent} {i}"}).encode())
            monitor.flush()
        assert [e["ts"] for _, e in monitor.store.events("ws-a", 10)] == [4, 3, 2]
        assert monitor.store.event_count("ws-b") == 3
    finally:
        monitor.store.close()


def test_the_example_fleet_config_is_valid() -> None:
    from edge_agent.config import load_fleet_config

    cfg = load_fleet_config(PROM_DIR.parent / "fleet.example.toml")
    assert cfg.fleet.listen == "127.0.0.1:9108" and cfg.fleet.db_path == Path("/var/lib/edge-fleet/fleet.sqlite")


def test_500_agents_keep_series_and_memory_bounded(tmp_path: Path, template: dict[str, Any]) -> None:
    cfg = parse_fleet_config({"fleet": {"db_path": str(tmp_path / "fleet.sqlite"), "max_agents": 500}})
    monitor = FleetMonitor(cfg)
    try:
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(500):
            agent = f"ws-{i:04d}"
            monitor.ingest(f"evidence/v1/{agent}/status", json.dumps({"state": "online", "ts": 1,
                                                                      "version": "0.1.0"}).encode())
            snapshot = health_of(template, agent)
            snapshot["alarms"] = [{"key": f"k{j}", "kind": f"made-up-{j}", "subject": "s", "message": "m",
                                   "raised_ms": 1} for j in range(30)]
            monitor.ingest(f"evidence/v1/{agent}/health", json.dumps(snapshot).encode())
        monitor.ingest("evidence/v1/ws-0500/health", json.dumps(health_of(template, "ws-0500")).encode())
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()

        from prometheus_client import generate_latest
        text = generate_latest(registry_for(monitor)).decode()
        per_agent = [line for line in text.splitlines() if 'agent="ws-0007"' in line]
        assert len(monitor.records) == 500
        assert value(text, "edge_fleet_refused_total", topic="health", reason="agent_limit") == 1
        assert len(per_agent) <= 40, per_agent                 # 30 alarm kinds made up: one "other" series
        assert value(text, "edge_fleet_alarms", agent="ws-0007", kind="other") == 30
        assert grown < 500 * 64 * 1024, f"{grown} bytes for 500 agents"
    finally:
        monitor.store.close()


def test_prometheus_sees_a_real_agent_fall_behind_go_stale_and_offline_and_the_alerts_fire(
        tmp_path: Path, mosquitto: Mosquitto, template: dict[str, Any]) -> None:
    # The rules as shipped, with every `for` shortened so the test does not wait minutes.
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    rules_copy = tmp_path / "alerts.yml"
    rules_copy.write_text(yaml.safe_dump(rules))

    data_dir = tmp_path / "agent-data"
    agent_toml = write_toml(tmp_path / "agent.toml", {
        "agent": {"id": AGENT_ID, "site": "nj-gulou", "unit": "鼓楼区城管大队", "data_dir": str(data_dir),
                  "max_disk_gb": 50, "min_free_mb": 0},
        "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.1, "reconnect_max_s": 1},
        "health": {"interval_s": 0.5, "change_check_s": 0.2}})
    # One recording reached this agent 25 h ago: ingested by the real pipeline under a clock set back 25 h.
    subprocess.run([sys.executable, "-c", BACKDATED_INGEST, str(agent_toml), str(tmp_path / "card"), str(DAY_S + 3600)],
                   cwd=ROOT, check=True, timeout=60)
    config, listen = fleet_config(tmp_path, mosquitto.port)
    monitor = fleet_proc(tmp_path, config).start()
    agent = agent_proc(tmp_path, agent_toml).start()
    prometheus = Prometheus(tmp_path / "prometheus", [listen], [rules_copy]).start()
    sims = Publisher(mosquitto.port)
    try:
        sims.online("ws-rewound", now_ms())
        sims.send("ws-rewound", "health", health_of(template, "ws-rewound", audit_head="40:aa"))

        def prom(expr: str) -> float | None:
            result = prometheus.query(expr)
            return float(result[0]["value"][1]) if len(result) == 1 else None

        wait_for(lambda: prom(f'edge_fleet_agent_up{{agent="{AGENT_ID}"}}') == 1
                 and prom(f'edge_fleet_agent_stale{{agent="{AGENT_ID}"}}') == 0, 60,
                 what="the real agent online and fresh in Prometheus")
        assert prom(f'edge_fleet_health_interval_seconds{{agent="{AGENT_ID}",unit="鼓楼区城管大队"}}') == 0.5
        behind = wait_for(lambda: prometheus.firing("UnsyncedOver24h"), 30, what="UnsyncedOver24h firing")
        assert [a["agent"] for a in behind] == [AGENT_ID]
        assert prom(f'edge_fleet_unsynced_oldest_age_seconds{{agent="{AGENT_ID}"}}') >= DAY_S + 3600

        sims.send("ws-rewound", "health", health_of(template, "ws-rewound", audit_head="39:ab"))
        firing = wait_for(lambda: prometheus.firing("ChainRegressed"), 30, what="ChainRegressed firing")
        assert [(a["agent"], a["head"]) for a in firing] == [("ws-rewound", "audit")]

        agent.popen.send_signal(signal.SIGSTOP)       # paused: connected (no will) but silent
        try:
            stale = wait_for(lambda: prometheus.firing("AgentStale"), 30, what="AgentStale firing for the paused agent")
            assert [a["agent"] for a in stale] == [AGENT_ID]
            assert prom(f'edge_fleet_agent_up{{agent="{AGENT_ID}"}}') == 1
        finally:
            agent.popen.send_signal(signal.SIGCONT)
        wait_for(lambda: prom(f'edge_fleet_agent_stale{{agent="{AGENT_ID}"}}') == 0, 30, what="fresh again")

        agent.kill9()                                 # the broker publishes its will: offline
        offline = wait_for(lambda: prometheus.firing("AgentOffline"), 30, what="AgentOffline firing after SIGKILL")
        assert [a["agent"] for a in offline] == [AGENT_ID] and offline[0]["severity"] == "critical"
        assert fleet_json(config, "show", AGENT_ID)["online"] is False
        assert not any(a["agent"] == AGENT_ID for a in prometheus.firing("AgentStale"))   # offline, not stale
    finally:
        sims.close()
        agent.kill9()
        prometheus.stop()
        monitor.stop()

