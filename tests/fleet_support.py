"""Builders for the fleet monitor's tests and benchmark: lightweight agents that publish what a real agent
publishes (retained status and health, events) from a snapshot a real agent took, the monitor as a process,
and its /metrics."""

from __future__ import annotations

import copy
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.helpers import write_toml
from tests.peers.mosquitto import free_port
from tests.sync_support import Proc

ROOT = "evidence/v1"


def real_snapshot(tmp: Path, cameras: int = 0) -> dict[str, Any]:
    """A health snapshot as a real agent builds it (its HealthMonitor, not a hand-written dict); with `cameras`
    configured (not started: they show as not connected)."""
    from edge_agent.daemon import build_agent
    from tests.helpers import agent_config

    sections: dict[str, Any] = {"health": {"interval_s": 30}}
    if cameras:
        sections["cameras"] = [{"name": f"cam-{i}", "rtsp": f"rtsp://127.0.0.1:9/cam{i}", "location": "路口",
                                "location_kind": "street"}
                               for i in range(cameras)]
    _, cfg = agent_config(tmp, agent={"id": "template"}, **sections)
    agent = build_agent(cfg)
    try:
        return agent.operations.health.snapshot()
    finally:
        agent.catalog.close()


def health_of(template: dict[str, Any], agent_id: str, *, ts_ms: int | None = None, **agent: Any) -> dict[str, Any]:
    """`template` as `agent_id`'s snapshot; keyword arguments replace keys of its `agent` part (`queue` etc.)."""
    snapshot = copy.deepcopy(template)
    snapshot["agent_id"] = agent_id
    if ts_ms is not None:
        snapshot["ts_ms"] = ts_ms
    for key, value in agent.items():
        if isinstance(value, dict) and isinstance(snapshot["agent"].get(key), dict):
            snapshot["agent"][key].update(value)
        else:
            snapshot["agent"][key] = value
    return snapshot


class Publisher:
    """One MQTT connection publishing for any number of simulated agents (QoS 1, waits for each PUBACK)."""

    def __init__(self, port: int, client_id: str = "sim-agents"):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, agent: str, kind: str, payload: dict[str, Any] | bytes, retain: bool = True) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"{ROOT}/{agent}/{kind}", data, qos=1, retain=retain).wait_for_publish(10)

    def online(self, agent: str, ts: int, state: str = "online") -> None:
        self.send(agent, "status", {"state": state, "ts": ts, "version": "0.1.0"})

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def fleet_config(tmp: Path, port: int, **fleet: Any) -> tuple[Path, str]:
    """fleet.toml for a monitor on the broker at `port`; returns (path, its listen address)."""
    listen = f"127.0.0.1:{free_port()}"
    path = write_toml(tmp / "fleet.toml", {
        "mqtt": {"port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 1},
        "fleet": {"db_path": str(tmp / "fleet" / "fleet.sqlite"), "listen": listen, "flush_interval_s": 0.1,
                  **fleet}})
    return path, listen


def fleet_proc(tmp: Path, config: Path) -> Proc:
    return Proc(["fleet", "serve", "--config", str(config)], tmp / "fleet.log")


def scrape(listen: str, *names: str) -> str:
    """/metrics of the monitor (only the metrics `names`, if given), or "" while it does not answer yet."""
    query = ("?" + "&".join(f"name[]={name}" for name in names)) if names else ""
    try:
        with urllib.request.urlopen(f"http://{listen}/metrics{query}", timeout=30) as response:
            return response.read().decode()
    except OSError:
        return ""


SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(exposition: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of every sample of `name` (label values unescaped)."""
    out = {}
    for line in exposition.splitlines():
        m = SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        labels = tuple(sorted((k, v.encode().decode("unicode_escape").encode("latin-1").decode())
                              for k, v in LABEL.findall(m["labels"] or "")))
        out[labels] = float(m["value"])
    return out


def value(exposition: str, name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels`, or None."""
    found = [v for k, v in samples(exposition, name).items() if set(labels.items()) <= set(k)]
    return found[0] if len(found) == 1 else None
