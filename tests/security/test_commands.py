"""Platform commands are obeyed only when signed by a platform key, addressed to this agent, numbered above
the last obeyed from that key, fresh and never seen before; everything else is refused, logged and audited,
across restarts and clock steps too."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.clock import now_ms
from edge_agent.config import ConfigError
from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import AgentKey
from edge_agent.sync.commands import load_command_keys
from tests.evidence_support import running_agent
from tests.helpers import agent_config, wait_for
from tests.peers.mosquitto import Mosquitto

AGENT = "ws-test-01"


class Platform:
    """The platform side: signs commands with its Ed25519 key and publishes them with a raw paho client."""

    def __init__(self, port: int, key_dir: Path):
        self.key = AgentKey(Ed25519PrivateKey.generate())
        self.public_path = key_dir / "platform.pem"
        self.public_path.write_text(self.key.public_pem())
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="platform", protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq = 0   # the platform numbers the commands it signs with its key

    def command(self, cmd: str = "resync", *, agent: str = AGENT, ts: int | None = None,
                cmd_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
        self.seq += 1
        return self.key.sign({"cmd": cmd, "id": cmd_id or uuid.uuid4().hex, "ts": now_ms() if ts is None else ts,
                              "seq": self.seq if seq is None else seq, "agent": agent})

    def send(self, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"evidence/v2/{AGENT}/commands", data, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def platform(mosquitto: Mosquitto, tmp_path: Path) -> Iterator[Platform]:
    peer = Platform(mosquitto.port, tmp_path)
    yield peer
    peer.close()


def _config(tmp_path: Path, mosquitto: Mosquitto, keys: Path | None) -> Any:
    mqtt_section = {"host": "127.0.0.1", "port": mosquitto.port, "reconnect_min_s": 0.1, "reconnect_max_s": 1}
    if keys is not None:
        mqtt_section["command_keys"] = str(keys)
    return agent_config(tmp_path, mqtt=mqtt_section)[1]


def _audited(agent: Agent, action: str) -> list[Any]:
    return agent.catalog.query("SELECT subject, reason FROM audit WHERE action = ? ORDER BY seq", (action,))


def _connected_with_inbox(agent: Agent) -> queue.Queue[dict[str, Any]]:
    obeyed: queue.Queue[dict[str, Any]] = queue.Queue()
    agent.uplink.on_command(obeyed.put)
    wait_for(lambda: agent.uplink.stats()["connected"], 15, what="uplink connected")
    wait_for(lambda: agent.catalog.query("SELECT 1 FROM audit WHERE action = 'agent.started'"), 5)
    return obeyed


def test_signed_fresh_command_is_obeyed_and_every_forgery_or_replay_is_refused(
        tmp_path: Path, mosquitto: Mosquitto, platform: Platform) -> None:
    cfg = _config(tmp_path, mosquitto, platform.public_path)
    good = platform.command("resync")
    stranger = AgentKey(Ed25519PrivateKey.generate())
    tampered = {**platform.command("resync"), "cmd": "purge-everything"}
    forged_key_id = {**stranger.sign({"cmd": "resync", "id": "f1", "ts": now_ms(), "seq": 99, "agent": AGENT}),
                     "key_id": platform.key.key_id}
    unsigned = {"cmd": "resync", "id": "u1", "ts": now_ms(), "seq": 99, "agent": AGENT}
    refused = {
        "replay": good,
        "unsigned": unsigned,
        "unknown key": stranger.sign({"cmd": "resync", "id": "s1", "ts": now_ms(), "seq": 99, "agent": AGENT}),
        "tampered": tampered,
        "forged key id": forged_key_id,
        "stale": platform.command(ts=now_ms() - 3_600_000),
        "from the future": platform.command(ts=now_ms() + 3_600_000),
        "other agent": platform.command(agent="ws-other-02"),
        "unnumbered": platform.key.sign({"cmd": "resync", "id": "n1", "ts": now_ms(), "agent": AGENT}),
    }
    with running_agent(cfg) as agent:
        obeyed = _connected_with_inbox(agent)
        platform.send(good)
        assert obeyed.get(timeout=10)["id"] == good["id"]
        for payload in refused.values():
            platform.send(payload)
        wait_for(lambda: len(_audited(agent, "command.refused")) >= len(refused), 10, what="refusals audited")
        reasons = [r["reason"] for r in _audited(agent, "command.refused")]
        assert "replay" in reasons[0]
        assert "not signed by a platform key" in reasons[1] and "not signed by a platform key" in reasons[2]
        assert "bad signature" in reasons[3] and "bad signature" in reasons[4]
        assert "stale or replayed" in reasons[5] and "stale or replayed" in reasons[6]
        assert "not to this one" in reasons[7]
        assert "no seq" in reasons[8]
        # Checked after the refusals were audited: none of them reached any command handler.
        assert obeyed.empty()
        assert [r["subject"] for r in _audited(agent, "command.accepted")] == [good["id"]]
    # A restart forgets nothing: the same signed command replayed within its window is still refused.
    with running_agent(cfg) as agent:
        obeyed = _connected_with_inbox(agent)
        platform.send(good)
        second = platform.command("resync")
        platform.send(second)
        assert obeyed.get(timeout=10)["id"] == second["id"]
        assert "replay" in _audited(agent, "command.refused")[-1]["reason"]
        assert obeyed.empty()


def test_captured_command_replayed_after_the_clock_steps_back_is_refused_by_its_seq(
        tmp_path: Path, mosquitto: Mosquitto, platform: Platform) -> None:
    """The window cannot stop this replay: the clock stepped back brings the captured command's `ts` into it
    again and its id was forgotten long ago (ids are kept for twice the window). Only `seq` refuses it."""
    cfg = _config(tmp_path, mosquitto, platform.public_path)
    hour = 3_600_000
    start = now_ms()
    with running_agent(cfg) as agent:
        obeyed = _connected_with_inbox(agent)
        gate = agent.uplink.command_gate
        captured = platform.command("resync", ts=start)
        platform.send(captured)
        assert obeyed.get(timeout=10)["id"] == captured["id"]
        gate.clock = lambda: start + hour            # an hour on: the captured id leaves the id table
        later = platform.command("resync", ts=start + hour)
        platform.send(later)
        assert obeyed.get(timeout=10)["id"] == later["id"]
        assert not agent.catalog.command_ids.seen(captured["id"])

        gate.clock = lambda: start + 1000            # the clock steps back an hour: `captured` is fresh again
        platform.send(captured)
        wait_for(lambda: _audited(agent, "command.refused"), 10, what="replay refused")
        reason = _audited(agent, "command.refused")[-1]["reason"]
        assert f"seq {captured['seq']} is not above {later['seq']}" in reason and "replay" in reason
        higher = platform.command("resync", ts=start + 1000)
        platform.send(higher)
        assert obeyed.get(timeout=10)["id"] == higher["id"]   # numbered above the last: obeyed
        assert obeyed.empty()
    with running_agent(cfg) as agent:   # the highest seq is in the catalog: a restart keeps refusing
        obeyed = _connected_with_inbox(agent)
        platform.send(captured)   # fresh by the real clock, its id long forgotten
        wait_for(lambda: len(_audited(agent, "command.refused")) >= 2, 10, what="replay refused after restart")
        assert "is not above" in _audited(agent, "command.refused")[-1]["reason"]
        assert obeyed.empty()


def test_malformed_commands_change_nothing_and_without_keys_every_command_is_refused(
        tmp_path: Path, mosquitto: Mosquitto, platform: Platform) -> None:
    cfg = _config(tmp_path, mosquitto, None)
    with running_agent(cfg) as agent:
        obeyed = _connected_with_inbox(agent)
        audit_before = agent.catalog.query("SELECT COUNT(*) FROM audit")[0][0]
        for junk in (b"", b"\xff\xfe", b"[]", b'{"cmd": 1}', b'{"cmd":"resync","id":"x"}', b"{" * 10000):
            platform.send(junk)
        platform.send(platform.command("resync"))   # well-formed and signed, but no key is configured
        wait_for(lambda: _audited(agent, "command.refused"), 30, what="refusal audited")
        assert "no platform command key" in _audited(agent, "command.refused")[0]["reason"]
        # Messages are handled in order, so the junk sent before was handled too: it left no trace but its log
        # line, and the one refusal is the only new audit entry.
        assert obeyed.empty()
        assert agent.catalog.query("SELECT COUNT(*) FROM audit")[0][0] == audit_before + 1


def test_command_keys_that_cannot_be_used_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pem").write_text("not a key")
    for path in (tmp_path / "missing.pem", tmp_path / "empty.pem", tmp_path):
        with pytest.raises(ConfigError) as err:
            load_command_keys(path)
        assert "mqtt.command_keys" in str(err.value)
