"""The receiver killed (SIGKILL, a real process) at each step of its commit: the restarted receiver finishes the
file, it ends `complete` exactly once, and the store checks out clean (`receiver fsck`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_agent.evidence.manifest import AgentKey
from edge_agent.platform.receiver import check_store
from edge_agent.platform.receiver.store import COMMIT_STEPS, CRASH_AT_ENV
from tests.helpers import wait_for
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import AGENT_ID, ScriptedAgent, random_bytes, receiver_logged, receiver_proc, receiver_setup


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_receiver_killed_at_each_commit_step_stores_the_file_once_after_restart(
        tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    key = AgentKey.load_or_create(tmp_path / "agent-keys")
    keys_dir = tmp_path / "enrolled"
    keys_dir.mkdir()
    (keys_dir / f"{AGENT_ID}.pem").write_text(key.public_pem())
    store = tmp_path / "store"
    config = receiver_setup(tmp_path, mosquitto.port, store, keys_dir)
    monkeypatch.setenv(CRASH_AT_ENV, step)
    proc = receiver_proc(tmp_path, config).start()
    monkeypatch.delenv(CRASH_AT_ENV)
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = ScriptedAgent(mosquitto.port, key)
    content = random_bytes(5 * 65536 + 17)
    doc = agent.send_file(content)
    assert proc.popen is not None
    assert proc.popen.wait(30) == -9, "the receiver did not kill itself at the commit step"
    assert receiver_logged(tmp_path, f"commit step={step}")
    proc.start()   # the same receiver, restarted without the fault
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected") and proc.alive, 20, what="receiver back")
    agent.send_manifest(doc)   # what a real agent does after its ack timeout: manifest + query
    agent.query(doc["file_id"])
    ack = agent.ack(doc["file_id"], "complete", timeout=30)
    assert ack["sha256"] == hashlib.sha256(content).hexdigest()
    agent.query(doc["file_id"])
    assert agent.ack(doc["file_id"])["state"] == "complete"   # and stays so
    agent.close()
    assert proc.stop() == 0
    index = list((store / "index" / AGENT_ID).glob("*.json"))
    assert [p.stem for p in index] == [doc["file_id"]]
    objects = [p for p in (store / "objects").rglob("*") if p.is_file() and not p.name.endswith(".json")]
    assert [p.read_bytes() for p in objects] == [content]
    assert not (store / "incoming" / AGENT_ID / doc["file_id"]).exists()
    assert check_store(store).findings == []
