"""Signed receipts: a recorder is cleared only when the platform provably holds a byte-identical copy.

An attacker who can read `{root}/{agent}/files/+/manifest` (the SHA-256 is in it) and publish on
`{root}/{agent}/acks` must not be able to mark a file synced, let alone delete the recorder's original:
forged, replayed, cross-agent, wrong-key and tampered `complete` acks change nothing and raise
`ack_unverified`; a real receiver's receipt syncs and clears. Clearing re-checks the stored receipt against
the pinned keys just before it deletes.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog
from edge_agent.catalog.docking import DockingRecords
from edge_agent.cli import app
from edge_agent.config import ConfigError, DirectoryDockSection
from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import AgentKey, canonical_json
from edge_agent.evidence.receipts import Expected, PinnedKeys, receipt_body
from edge_agent.layout import StoreLayout
from edge_agent.platform.receiver.receipts import PUB_FILE, ReceiverKey
from edge_agent.protocol.wire import Ack
from edge_agent.sources.docks.clearing import Clearing, ReceiptCheck
from edge_agent.sync.receipts import COPIES_DURABLE, ReceiptGate, judge, restore_copies, seal_copies
from edge_agent.sync.transfer import MarkRejected, MarkSynced, Unverified
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.opsdata import confirm, ingest_file, receiver_key_dir, signed_receipt
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import (
    AGENT_ID,
    ROOT,
    ScriptedAgent,
    agent_proc,
    agent_setup,
    catalog_rows,
    enrol,
    enrolled_agent_key,
    pin_receiver_key,
    pinned_dir,
    random_bytes,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    states,
    subscribed_client,
)

FILE_ID = "01J0000000000000000000000A"
OTHER_FILE = "01J0000000000000000000000B"
SHA, MANIFEST_SHA = "ab" * 32, "cd" * 32


# -- the pure check ------------------------------------------------------------------------------------------


@pytest.fixture
def pinned(tmp_path: Path) -> tuple[AgentKey, PinnedKeys]:
    key = ReceiverKey.load_or_create(tmp_path / "receiver")
    return key, PinnedKeys(tmp_path / "receiver" / PUB_FILE)


def _receipt(key: AgentKey, **override: Any) -> dict[str, Any]:
    body = receipt_body("complete", agent_id=AGENT_ID, file_id=FILE_ID, sha256=SHA, size=10,
                        manifest_sha256=MANIFEST_SHA, ts_ms=1)
    return key.sign({**body, **override})


def _complete(receipt: dict[str, Any] | None) -> Ack:
    return Ack(FILE_ID, "complete", [], SHA, None, receipt)


EXPECTED = Expected(AGENT_ID, FILE_ID, SHA, 10, MANIFEST_SHA)


def test_a_receipt_signed_by_a_pinned_key_and_binding_this_file_syncs_it(pinned) -> None:
    key, keys = pinned
    assert isinstance(judge(_complete(_receipt(key)), EXPECTED, keys), MarkSynced)


@pytest.mark.parametrize("attack", ["no receipt", "another file", "another agent", "another manifest",
                                    "another size", "unpinned key", "tampered", "verdict rejected"])
def test_a_complete_ack_whose_receipt_does_not_bind_this_file_proves_nothing(pinned, tmp_path: Path,
                                                                            attack: str) -> None:
    key, keys = pinned
    stranger = ReceiverKey.load_or_create(tmp_path / "stranger")
    receipt = {
        "no receipt": None,
        "another file": _receipt(key, file_id=OTHER_FILE),
        "another agent": _receipt(key, agent_id="ws-other-02"),
        "another manifest": _receipt(key, manifest_sha256="ef" * 32),
        "another size": _receipt(key, size=11),
        "unpinned key": _receipt(stranger),
        "tampered": {**_receipt(key, size=11), "size": 10},
        "verdict rejected": _receipt(key, verdict="rejected"),
    }[attack]
    assert isinstance(judge(_complete(receipt), EXPECTED, keys), Unverified)


def test_a_rejection_counts_only_signed_and_a_signed_other_sha256_is_a_rejection(pinned) -> None:
    key, keys = pinned
    unsigned = Ack(FILE_ID, "rejected", [], None, "forged reason")
    assert isinstance(judge(unsigned, EXPECTED, keys), Unverified)
    signed = key.sign(receipt_body("rejected", agent_id=AGENT_ID, file_id=FILE_ID, sha256=None, size=None,
                                   manifest_sha256=None, ts_ms=1, reason="signature does not verify"))
    assert judge(Ack(FILE_ID, "rejected", [], None, "x", signed), EXPECTED, keys) == \
        MarkRejected("signature does not verify")
    other = judge(_complete(_receipt(key, sha256="ee" * 32)), EXPECTED, keys)
    assert isinstance(other, MarkRejected) and "ee" * 32 in other.reason


def test_no_pinned_key_means_no_ack_is_complete(pinned, tmp_path: Path) -> None:
    key, _ = pinned
    (tmp_path / "empty").mkdir()
    for keys in (PinnedKeys(None), PinnedKeys(tmp_path / "empty")):
        result = judge(_complete(_receipt(key)), EXPECTED, keys)
        assert isinstance(result, Unverified) and "receiver_keys" in result.reason


# -- a real agent, a real broker, an attacker on the broker ---------------------------------------------------


class Forger:
    """A broker client with read access to manifests and write access to acks: what the issue's attacker had."""

    def __init__(self, port: int):
        self.manifests: queue.Queue[bytes] = queue.Queue()
        self.client = subscribed_client(port, "forger", f"{ROOT}/{AGENT_ID}/files/+/manifest", self.manifests.put)

    def ack(self, file_id: str, sha256: str, receipt: dict[str, Any] | None) -> None:
        body = {"file_id": file_id, "state": "complete", "have": [], "sha256": sha256, "reason": None}
        if receipt is not None:
            body["receipt"] = receipt
        self.client.publish(f"{ROOT}/{AGENT_ID}/acks", json.dumps(body), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _forgeries(pinned_key: AgentKey, stranger: AgentKey, doc: dict[str, Any], manifest: bytes,
               replayed: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Five forged receipts for the file of `doc` (the attacker read its manifest from the broker)."""
    body = receipt_body("complete", agent_id=AGENT_ID, file_id=doc["file_id"], sha256=doc["sha256"],
                        size=doc["size"], manifest_sha256=hashlib.sha256(manifest).hexdigest(), ts_ms=1)
    genuine = pinned_key.sign(body)
    return [
        None,                                                   # the forged ack: no receipt at all
        replayed,                                               # a genuine receipt of another file, replayed
        pinned_key.sign({**body, "agent_id": "ws-other-02"}),   # a genuine receipt of another agent's file
        stranger.sign(body),                                    # signed by a key the agent does not pin
        {**genuine, "stored_ms": 2},                            # genuine, then altered
    ]


@pytest.mark.slow
def test_forged_replayed_cross_agent_wrong_key_and_tampered_acks_clear_nothing_and_a_real_receipt_clears(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    dock = tmp_path / "dock"
    names = [f"DCIM/REC{i}.MP4" for i in range(5)]
    volume = make_recorder_volume(dock, "VOL1", dict.fromkeys(names, 70_000))
    agent_toml, data_dir = agent_setup(tmp_path, mosquitto.port, dock_root=dock)
    # The platform's receiver key is pinned, as in production; its private half signs the "replayed" receipt.
    store = tmp_path / "store"
    pin_receiver_key(store / "keys", pinned_dir(tmp_path), "receiver-1")
    receiver_key = ReceiverKey.load_or_create(store / "keys")
    stranger = ReceiverKey.load_or_create(tmp_path / "stranger")
    replayed = receiver_key.sign(receipt_body("complete", agent_id=AGENT_ID, file_id="01J00000000000000000000OLD",
                                              sha256="ab" * 32, size=1, manifest_sha256="cd" * 32, ts_ms=1))
    forger = Forger(mosquitto.port)
    agent = agent_proc(tmp_path, agent_toml).start()
    try:
        forged: dict[str, int] = {}

        def forge_next() -> bool:
            manifest = forger.manifests.get(timeout=30)
            doc = json.loads(manifest)
            if doc["file_id"] not in forged:
                forged[doc["file_id"]] = len(forged)
                receipt = _forgeries(receiver_key, stranger, doc, manifest, replayed)[forged[doc["file_id"]]]
                forger.ack(doc["file_id"], doc["sha256"], receipt)
            return len(forged) == len(names)
        wait_for(forge_next, 60, interval=0, what="a forged ack for each of the five files")
        wait_for(lambda: len(catalog_rows(data_dir, "SELECT key FROM alarms WHERE kind = 'ack_unverified'")) == 5,
                 30, what="ack_unverified raised for each forged ack")
        assert states(data_dir) == {"sending": 5}, "a forged ack changed a file's state"
        assert all((volume / name).exists() for name in names), "a forged ack cleared a recorder's original"
        assert catalog_rows(data_dir, "SELECT COUNT(*) FROM receipts") == [(0,)]
        events = catalog_rows(data_dir, "SELECT payload FROM outbox")
        assert sum('"ack_unverified"' in row[0] for row in events) == 5

        # The real receiver's receipts: synced and cleared, each receipt kept in the catalog and beside the manifest.
        enrol(agent_toml, tmp_path / "enrolled")
        receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, mosquitto.port, store, tmp_path / "enrolled"))
        receiver.start()
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
        wait_for(lambda: states(data_dir) == {"source_cleared": 5}, 90, what=f"all cleared, have {states(data_dir)}")
        assert not any((volume / name).exists() for name in names)
        kept = catalog_rows(data_dir, "SELECT file_id, receiver_key_id, receipt FROM receipts")
        assert len(kept) == 5
        for file_id, key_id, receipt in kept:
            assert key_id == receiver_key.key_id
            copy = data_dir / "receipts" / file_id[-2:] / f"{file_id}.json"
            assert copy.read_bytes() == canonical_json(json.loads(receipt))
        assert receiver.stop() == 0
    finally:
        forger.close()
        assert agent.stop() == 0


# -- clearing re-checks the receipt just before it deletes ---------------------------------------------------


def _clearing_case(tmp_path: Path) -> tuple[Agent, Path, Clearing, Any]:
    """A file synced with a genuine receipt (pinned key dir), its original still on a docked volume."""
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    _, cfg = agent_config(tmp_path, mqtt={"receiver_keys": str(pinned)})
    agent = Agent(cfg, dock_drivers=[])
    src = tmp_path / "volume"
    record = confirm(agent, ingest_file(agent, src, "REC0.MP4", 5000).file_id)
    (pinned / "platform.pem").write_bytes((receiver_key_dir(agent) / PUB_FILE).read_bytes())
    dock = DirectoryDockSection(name="bench", kind="directory", root=tmp_path, clear_after_sync=True)
    clearing = Clearing(agent.catalog, DockingRecords(agent.catalog), DockedVolume("bench", src, "volume", slot=1),
                        dock, receipts=ReceiptCheck(agent.catalog, cfg.agent.id, PinnedKeys(pinned)))
    return agent, src / "REC0.MP4", clearing, agent.catalog.get(record.file_id)


def _refused(agent: Agent) -> list[str]:
    return [row["message"] for row in agent.catalog.active_alarms() if row["kind"] == "clear_refused"]


def test_clearing_refuses_when_the_receivers_key_was_unpinned_since_the_sync(tmp_path: Path) -> None:
    agent, original, clearing, record = _clearing_case(tmp_path)
    (tmp_path / "pinned" / "platform.pem").unlink()     # the platform withdrew that key (compromised)
    clearing.clear_one(record)
    assert original.exists()
    assert agent.catalog.get(record.file_id).state == "synced"
    assert any("no verified receipt" in message for message in _refused(agent))


def test_clearing_refuses_a_receipt_altered_in_the_catalog_and_clears_with_the_genuine_one(tmp_path: Path) -> None:
    agent, original, clearing, record = _clearing_case(tmp_path)
    genuine = agent.catalog.receipts.get(record.file_id)
    agent.catalog.receipts.put(record.file_id, signed_receipt(agent, record, file_id="01J00000000000000000000OLD"))
    clearing.clear_one(record)
    assert original.exists() and _refused(agent)
    agent.catalog.receipts.put(record.file_id, genuine)
    clearing.clear_one(record)
    assert not original.exists()
    assert agent.catalog.get(record.file_id).state == "source_cleared"


def test_a_receiver_keys_path_that_does_not_exist_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path, mqtt={"receiver_keys": str(tmp_path / "no-such-dir")})
    catalog = Catalog(cfg.catalog_path)
    try:
        with pytest.raises(ConfigError) as err:
            ReceiptGate(catalog, StoreLayout(cfg.agent.data_dir), cfg.agent.id, cfg.mqtt.receiver_keys)
        assert "mqtt.receiver_keys" in str(err.value) and "no-such-dir" in str(err.value)
    finally:
        catalog.close()


# -- the receiver signs what it acks --------------------------------------------------------------------------


def test_a_real_receiver_signs_complete_and_rejected_acks_binding_the_manifest_bytes_it_verified(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    agent_key = enrolled_agent_key(tmp_path)
    store = tmp_path / "store"
    receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, mosquitto.port, store, tmp_path / "enrolled"))
    receiver.start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = ScriptedAgent(mosquitto.port, agent_key)
    try:
        content = random_bytes(150_000)
        doc = agent.send_file(content)
        ack = agent.ack(doc["file_id"], "complete")
        record = Expected(AGENT_ID, doc["file_id"], doc["sha256"], len(content),
                          hashlib.sha256(canonical_json(doc)).hexdigest())
        keys = PinnedKeys(pinned_dir(tmp_path))
        assert isinstance(judge(Ack.from_json(ack), record, keys), MarkSynced)
        agent.query(doc["file_id"])   # asked again: the same receipt, byte for byte
        assert agent.ack(doc["file_id"], "complete")["receipt"] == ack["receipt"]

        forged = {**agent.manifest(b"x" * 10), "size": 11}   # signature no longer matches
        agent.send_manifest(forged)
        rejected = agent.ack(forged["file_id"], "rejected")
        verdict = judge(Ack.from_json(rejected), Expected(AGENT_ID, forged["file_id"], None, None, None), keys)
        assert isinstance(verdict, MarkRejected) and "signature" in verdict.reason
    finally:
        agent.close()
        assert receiver.stop() == 0


# -- files show, verify ------------------------------------------------------------------------------------


def test_files_show_prints_the_receipt_and_verify_checks_every_synced_files_receipt(tmp_path: Path) -> None:
    agent, _original, _clearing, record = _clearing_case(tmp_path)
    config = str(tmp_path / "agent.toml")
    runner = CliRunner()
    shown = json.loads(runner.invoke(app, ["--config", config, "--json", "files", "show", record.file_id]).stdout)
    assert shown["receipt"]["file_id"] == record.file_id and shown["receipt_verifies"] is True
    assert runner.invoke(app, ["--config", config, "verify", "--all"]).exit_code == 0

    agent.layout.receipt_path(record.file_id).unlink()   # the copy beside the manifest removed
    missing = runner.invoke(app, ["--config", config, "--json", "verify", "--all"])
    assert missing.exit_code == 1 and "receipt" in missing.stdout
    (tmp_path / "pinned" / "platform.pem").unlink()        # and the key that signed it unpinned
    shown = json.loads(runner.invoke(app, ["--config", config, "--json", "files", "show", record.file_id]).stdout)
    assert shown["receipt_verifies"] is False and "no receiver public key" in shown["receipt_problem"]


def test_a_receipt_copy_lost_or_torn_by_a_crash_is_restored_from_the_catalog_at_start(tmp_path: Path) -> None:
    """The copy beside the manifest is written after the catalog's commit and not fsynced on the sender thread;
    what a power cut takes of it (gone, or cut short) the next start rewrites from the catalog's row."""
    agent, _original, _clearing, record = _clearing_case(tmp_path)
    config, runner = str(tmp_path / "agent.toml"), CliRunner()
    path = agent.layout.receipt_path(record.file_id)
    genuine = path.read_bytes()
    assert restore_copies(agent.catalog, agent.layout) == 0   # intact: nothing rewritten, the mark moves on

    path.unlink()
    assert runner.invoke(app, ["--config", config, "verify", "--all"]).exit_code == 1
    agent.catalog.meta.set(COPIES_DURABLE, "0")   # as after a crash: nothing sealed since the receipt came
    assert restore_copies(agent.catalog, agent.layout) == 1
    assert path.read_bytes() == genuine
    assert runner.invoke(app, ["--config", config, "verify", "--all"]).exit_code == 0

    os.chmod(path, 0o644)
    path.write_bytes(genuine[:10])   # torn
    agent.catalog.meta.set(COPIES_DURABLE, "0")
    assert restore_copies(agent.catalog, agent.layout) == 1 and path.read_bytes() == genuine

    seal_copies(agent.catalog, agent.layout)   # a clean stop: what came before is not read again
    path.unlink()
    assert restore_copies(agent.catalog, agent.layout) == 0 and not path.exists()


def test_an_agent_killed_between_deleting_an_original_and_recording_it_records_the_clearing_after_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, original, clearing, record = _clearing_case(tmp_path)

    def killed(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt("kill -9 after the unlink")

    monkeypatch.setattr(clearing.records, "cleared", killed)
    with pytest.raises(KeyboardInterrupt):
        clearing.clear_one(record)
    monkeypatch.undo()
    assert not original.exists() and agent.catalog.get(record.file_id).state == "synced"
    clearing.clear_one(agent.catalog.get(record.file_id))   # the next pass, after the restart
    assert agent.catalog.get(record.file_id).state == "source_cleared"
