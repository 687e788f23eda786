"""The reference receiver as a real process against a real mosquitto, driven by a scripted agent."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import AgentKey, canonical_json, read_document
from edge_agent.platform.receiver import KeyRefused, KeyRing
from edge_agent.platform.receiver.service import LEARNED_KEYS
from edge_agent.protocol.wire import ChunkHeader, encode_chunk
from tests.helpers import agent_config, wait_for
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import (
    AGENT_ID,
    ROOT,
    ScriptedAgent,
    random_bytes,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    stored_index,
    subscribed_client,
)


@pytest.fixture
def receiver(tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> Iterator[Path]:
    config = receiver_setup(tmp_path, mosquitto.port, tmp_path / "store", keyed[1], max_chunk_kib=256)
    proc = receiver_proc(tmp_path, config).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    yield tmp_path / "store"
    assert proc.alive, "the receiver died"
    assert proc.stop() == 0


def stored_bytes(store: Path, file_id: str) -> bytes:
    entry = stored_index(store)[file_id]
    return (store / entry["object"]).read_bytes()


def test_crc32_chunks_are_announced_checked_and_stored_beside_sha256_ones(
        receiver: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    """The receiver's acks list the chunk checks it takes; a file whose chunks carry CRC-32 headers, or a mix of
    CRC-32 and SHA-256 (an agent that switched when it heard the first ack), is stored exactly."""
    agent = ScriptedAgent(mosquitto.port, keyed[0], check="crc32")
    content = random_bytes(5 * 65536 + 17)
    doc = agent.send_file(content)
    ack = agent.ack(doc["file_id"], "complete")
    assert ack["chunk_checks"] == ["crc32", "sha256"]
    # and what it queues of this agent's messages before it drops the rest (the agent's window keeps within it)
    assert (ack["max_queued"], ack["max_queued_bytes"]) == (512, 192 * 2**20)
    assert stored_bytes(receiver, doc["file_id"]) == content
    mixed = agent.manifest(content)
    agent.send_manifest(mixed)
    agent.check = "sha256"
    agent.send_chunks(mixed, content, [0, 1, 2])
    agent.check = "crc32"
    agent.send_chunks(mixed, content, [3, 4, 5])
    assert agent.ack(mixed["file_id"], "complete")["sha256"] == hashlib.sha256(content).hexdigest()
    assert stored_bytes(receiver, mixed["file_id"]) == content
    agent.close()


def test_file_is_stored_content_addressed_with_its_manifest(receiver: Path, mosquitto: Mosquitto,
                                                            keyed: tuple[AgentKey, Path]) -> None:
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    content = random_bytes(200_001)
    doc = agent.send_file(content)
    ack = agent.ack(doc["file_id"], "complete")
    assert ack["sha256"] == hashlib.sha256(content).hexdigest()
    assert stored_bytes(receiver, doc["file_id"]) == content
    beside = receiver / "objects" / ack["sha256"][:2] / f"{ack['sha256']}.{AGENT_ID}.{doc['file_id']}.manifest.json"
    assert json.loads(beside.read_bytes()) == doc
    assert not (receiver / "incoming" / AGENT_ID / doc["file_id"]).exists()
    agent.close()


def test_empty_file_completes_on_its_manifest(receiver: Path, mosquitto: Mosquitto,
                                               keyed: tuple[AgentKey, Path]) -> None:
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    doc = agent.send_file(b"")
    assert agent.ack(doc["file_id"], "complete")["sha256"] == hashlib.sha256(b"").hexdigest()
    assert stored_bytes(receiver, doc["file_id"]) == b""
    agent.close()


def test_duplicates_and_replays_store_the_file_once(receiver: Path, mosquitto: Mosquitto,
                                                     keyed: tuple[AgentKey, Path]) -> None:
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    content = random_bytes(300_000)
    doc = agent.manifest(content)
    agent.send_manifest(doc)
    agent.send_manifest(doc)                               # duplicate manifest mid-transfer
    agent.send_chunks(doc, content, [0, 1, 1, 0])          # duplicate chunks
    agent.send_chunks(doc, content)
    agent.ack(doc["file_id"], "complete")
    agent.send_manifest(doc)                               # a replay of the whole transfer
    agent.send_chunks(doc, content)
    assert agent.ack(doc["file_id"], "complete")["sha256"] == doc["sha256"]
    agent.query(doc["file_id"])
    assert agent.ack(doc["file_id"])["state"] == "complete"
    assert list(stored_index(receiver)) == [doc["file_id"]]
    objects = [p for p in (receiver / "objects").rglob("*") if p.is_file() and not p.name.endswith(".json")]
    assert len(objects) == 1
    agent.close()


def test_query_answers_what_the_receiver_has(receiver: Path, mosquitto: Mosquitto,
                                              keyed: tuple[AgentKey, Path]) -> None:
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    content = random_bytes(10 * 65536)
    doc = agent.manifest(content)
    agent.send_manifest(doc)
    agent.send_chunks(doc, content, [0, 1, 2, 5])
    agent.query(doc["file_id"])
    ack = wait_for(lambda: (a := agent.ack(doc["file_id"], "receiving")) and a["have"] == [[0, 2], [5, 5]] and a,
                   20, interval=0, what="have [[0,2],[5,5]]")
    assert ack["reason"] is None
    agent.send_chunks(doc, content, [3, 4, 6, 7, 8, 9])
    agent.ack(doc["file_id"], "complete")
    agent.close()


def test_malformed_messages_get_a_reason_change_nothing_and_never_stop_the_receiver(
        tmp_path: Path, receiver: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    content = random_bytes(3 * 65536)

    def rejected(file_id: str) -> str:
        ack = agent.ack(file_id, "rejected")
        assert ack["reason"], ack
        return ack["reason"]

    # Bad JSON, wrong types, a manifest for another file, a forged signature, an agent nobody enrolled.
    doc = agent.manifest(content)
    agent.publish(doc["file_id"], "manifest", b"{not json")
    assert "not valid UTF-8 JSON" in rejected(doc["file_id"])
    agent.publish(doc["file_id"], "manifest", json.dumps({**doc, "size": "big"}).encode())
    assert "size" in rejected(doc["file_id"])
    other = agent.manifest(content)
    agent.publish(doc["file_id"], "manifest", canonical_json(other))
    assert "published on the topic" in rejected(doc["file_id"])
    forged = {**doc, "officer_id": "someone-else"}
    agent.send_manifest(forged)
    assert "signature" in rejected(doc["file_id"])
    stranger = ScriptedAgent(mosquitto.port, AgentKey.load_or_create(tmp_path / "stranger"), agent_id="ws-unknown")
    sdoc = stranger.manifest(content)
    stranger.send_manifest(sdoc)
    assert "not enrolled" in stranger.ack(sdoc["file_id"], "rejected")["reason"]
    stranger.close()

    # A chunk for a file the receiver never saw a manifest for: dropped, and the agent told to send it.
    lost = agent.manifest(content)
    agent.send_chunks(lost, content, [0])
    assert "no manifest" in agent.ack(lost["file_id"], "receiving")["reason"]

    # Chunks of a file in progress that are malformed (beyond the file, garbage frames, oversized, bytes not
    # matching their header) change nothing (G6): each is refused with a reason, the transfer keeps what it
    # holds, and the genuine chunks then complete the file.
    d = agent.manifest(content)
    agent.send_manifest(d)
    agent.send_chunks(d, content, [0])
    data = content[65536:2 * 65536]

    def refused(payload: bytes, expected: str) -> None:
        agent.publish(d["file_id"], "chunk", payload)
        ack = agent.ack(d["file_id"], "receiving")
        while expected not in (ack.get("reason") or ""):
            ack = agent.ack(d["file_id"], "receiving")
        assert ack["have"] == [[0, 0]], ack   # what it held before, no more, no less
        time.sleep(1.05)  # the receiver answers the same state for one file at most once a second

    refused(encode_chunk(ChunkHeader(7, 7 * 65536, 65536, hashlib.sha256(data).hexdigest()), data),
            "beyond the file")
    refused(struct.pack(">I", 10**6) + b"{}", "header length")
    refused(struct.pack(">I", 2) + b"[]" + data, "chunk-header")
    refused(b"\0" * (300 * 1024 + 8192), "larger than this receiver takes")
    refused(encode_chunk(ChunkHeader(1, 65536, 65536, "0" * 64), data), "do not match the sha256")
    refused(encode_chunk(ChunkHeader(1, 65536, 65536, f"{zlib.crc32(data) ^ 1:08x}"), data), "do not match the crc32")
    head = json.dumps({"seq": 1, "offset": 65536, "size": 65536, "crc32": "0a1b2c3"}).encode()   # 7 digits
    refused(struct.pack(">I", len(head)) + head + data, "crc32")
    agent.send_chunks(d, content, [1, 2])
    assert agent.ack(d["file_id"], "complete")["sha256"] == hashlib.sha256(content).hexdigest()

    # Topics that are not the protocol's: logged and dropped.
    agent.client.publish(f"{ROOT}/{AGENT_ID}/files/not-a-ulid/chunk", b"x", qos=1).wait_for_publish(5)
    agent.client.publish(f"{ROOT}/{AGENT_ID}/files/{d['file_id']}/delete", b"{}", qos=1).wait_for_publish(5)

    # Still serving: a good file goes through, and nothing of the bad messages was stored.
    good = agent.send_file(content)
    agent.ack(good["file_id"], "complete")
    assert sorted(stored_index(receiver)) == sorted([good["file_id"], d["file_id"]])
    wait_for(lambda: receiver_logged(tmp_path, "dropped message"), 10, what="malformed topic logged")
    log = (tmp_path / "receiver-1.log").read_text()
    assert "Traceback" not in log
    agent.close()


@pytest.mark.parametrize("check", ["crc32", "sha256"])
def test_whole_file_hash_mismatch_is_rejected(receiver: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path],
                                              check: str) -> None:
    """Chunks that each match their header but not the sealed file (altered bytes with a forged CRC-32 or
    SHA-256 to match: the header is not signed): the manifest's SHA-256 decides, never `complete`."""
    agent = ScriptedAgent(mosquitto.port, keyed[0], check=check)
    content = random_bytes(2 * 65536)
    doc = agent.manifest(content)
    agent.send_manifest(doc)
    altered = content[:100] + bytes([content[100] ^ 0xFF]) + content[101:]
    agent.send_chunks(doc, altered)
    answers = []
    while not answers or answers[-1]["state"] == "receiving":
        answers.append(agent.ack(doc["file_id"]))
    assert answers[-1]["state"] == "rejected" and "altered" in answers[-1]["reason"], answers
    assert stored_index(receiver) == {}
    # A new manifest is a new attempt (a custodian's retry): the genuine bytes are then accepted.
    agent.send_manifest(doc)
    agent.send_chunks(doc, content)
    agent.ack(doc["file_id"], "complete")
    agent.close()


def test_transfer_state_survives_a_receiver_kill_and_another_receiver_continues_it(
        tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    """Two receivers behind one shared subscription and one store; one is killed mid-file and restarted."""
    store = tmp_path / "store"
    procs = []
    for name in ("receiver-a", "receiver-b"):
        config = receiver_setup(tmp_path, mosquitto.port, store, keyed[1], name=name, shared_subscription=True)
        procs.append(receiver_proc(tmp_path, config, name).start())
    for name in ("receiver-a", "receiver-b"):
        wait_for(lambda n=name: receiver_logged(tmp_path, "mqtt connected", n), 20, what=f"{name} connected")
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    content = random_bytes(40 * 65536)
    doc = agent.manifest(content)
    agent.send_manifest(doc)
    agent.send_chunks(doc, content, list(range(20)))
    agent.query(doc["file_id"])
    wait_for(lambda: (a := agent.ack(doc["file_id"], "receiving")) and a["have"] == [[0, 19]], 20, interval=0,
             what="first half held")
    procs[0].kill9()
    (tmp_path / "receiver-a.log").write_text("")
    procs[0].start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected", "receiver-a"), 20, what="receiver-a back")
    agent.send_chunks(doc, content, list(range(20, 40)))
    agent.ack(doc["file_id"], "complete", timeout=30)
    replay = agent.send_file(content)   # the same bytes again under a new file id: still one copy of them
    agent.ack(replay["file_id"], "complete")
    assert stored_bytes(store, doc["file_id"]) == content
    assert sorted(stored_index(store)) == sorted([doc["file_id"], replay["file_id"]])
    objects = [p for p in (store / "objects").rglob("*") if p.is_file() and not p.name.endswith(".json")]
    assert len(objects) == 1
    agent.close()
    for proc in procs:
        assert proc.stop() == 0


def test_a_receiver_switched_to_the_shared_subscription_takes_only_its_share(
        tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    """A receiver that ran with its own subscription keeps it in its persistent session (same client id). Switched
    to the shared subscription, it must drop it: else it gets every message as well as its share, doing the other
    receivers' work twice over (how `bench_scale.py agents` measured two receivers slower than one). A probe in
    the same share group stands for the second receiver: each query is answered by the receiver or taken by the
    probe, never both."""
    plain = receiver_setup(tmp_path, mosquitto.port, tmp_path / "store", keyed[1], name="receiver-x")
    proc = receiver_proc(tmp_path, plain, "receiver-x").start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected", "receiver-x"), 20, what="receiver up")
    assert proc.stop() == 0
    shared = receiver_setup(tmp_path, mosquitto.port, tmp_path / "store", keyed[1], name="receiver-x",
                            shared_subscription=True)
    probed: list[str] = []
    probe = subscribed_client(mosquitto.port, "receiver-probe", f"$share/receivers/{ROOT}/+/files/#",
                              lambda payload: None)
    probe.on_message = lambda _c, _u, m: probed.append(m.topic.split("/")[-2])
    (tmp_path / "receiver-x.log").write_text("")
    proc = receiver_proc(tmp_path, shared, "receiver-x").start()
    wait_for(lambda: receiver_logged(tmp_path, "session_present=True", "receiver-x"), 20, what="receiver back")
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    queried = [agent.manifest(b"q")["file_id"] for _ in range(40)]
    for file_id in queried:
        agent.query(file_id)
    answered: list[str] = []

    def everything_taken() -> bool:
        while not agent.acks.empty():
            answered.append(agent.acks.get()["file_id"])
        return set(answered) | set(probed) == set(queried)

    wait_for(everything_taken, 20, what="every query answered by the receiver or taken by the probe")
    assert answered and probed, "both members of the group got a share"
    assert not set(answered) & set(probed), "the receiver also took messages of the other member's share"
    agent.close()
    probe.disconnect()
    probe.loop_stop()
    assert proc.stop() == 0


def test_an_agent_that_rotated_its_key_is_checked_against_the_key_each_manifest_names(
        receiver: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path], tmp_path: Path) -> None:
    old_key, keys_dir = keyed
    new_key = AgentKey.load_or_create(tmp_path / "rotated-keys")
    stranger = AgentKey.load_or_create(tmp_path / "stranger-keys")
    # Enrolment after `edge-agent keys rotate`: the new key beside the old one, in one file.
    (keys_dir / f"{AGENT_ID}.pem").write_text(old_key.public_pem() + new_key.public_pem())
    for key in (old_key, new_key):
        agent = ScriptedAgent(mosquitto.port, key)
        doc = agent.send_file(random_bytes(70_000))
        assert agent.ack(doc["file_id"], "complete")["sha256"] == doc["sha256"]
        agent.close()
    forger = ScriptedAgent(mosquitto.port, stranger)
    doc = forger.send_file(random_bytes(1_000))
    assert "signed by" in forger.ack(doc["file_id"], "rejected")["reason"]
    forger.close()


def test_the_receiver_loads_nothing_of_the_agents_pipeline() -> None:
    """The platform side shares only the protocol (and the manifest's checks) with the agent."""
    forbidden = tuple(f"edge_agent.{name}" for name in ("sync", "sources", "ingest", "catalog", "daemon"))
    probe = ("import sys, edge_agent.platform.receiver; "
             f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_orphan_chunks_flooding_from_one_agent_do_not_hold_up_another(
        tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    """Behind a shared subscription a chunk may come before its manifest. 60 such chunks from one agent (today
    each held the receiver's only worker for a second: a minute) while another agent sends three files: the
    files complete within the usual ack wait, and the flooder is still answered (`receiving`, no manifest)."""
    config = receiver_setup(tmp_path, mosquitto.port, tmp_path / "store", keyed[1], shared_subscription=True)
    proc = receiver_proc(tmp_path, config).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    flooder = ScriptedAgent(mosquitto.port, AgentKey.load_or_create(tmp_path / "flood"), agent_id="ws-flood-01")
    orphans = [flooder.manifest(b"x" * 10) for _ in range(60)]
    for doc in orphans:
        flooder.client.publish(f"{ROOT}/ws-flood-01/files/{doc['file_id']}/chunk", b"\0" * 64, qos=1)
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    for _ in range(3):
        content = random_bytes(3 * 65536)
        doc = agent.send_file(content)
        assert agent.ack(doc["file_id"], "complete", timeout=20)["sha256"] == hashlib.sha256(content).hexdigest()
    assert "no manifest" in flooder.ack(orphans[0]["file_id"], "receiving", timeout=30)["reason"]
    flooder.close()
    agent.close()
    assert proc.alive and proc.stop() == 0


def test_a_new_transfer_beyond_an_agents_cap_is_answered_busy_and_taken_later(
        tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    store = tmp_path / "store"
    config = receiver_setup(tmp_path, mosquitto.port, store, keyed[1], max_open_transfers_per_agent=1)
    proc = receiver_proc(tmp_path, config).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = ScriptedAgent(mosquitto.port, keyed[0])
    first, second = random_bytes(2 * 65536), random_bytes(65536)
    doc1, doc2 = agent.manifest(first), agent.manifest(second)
    agent.send_manifest(doc1)
    agent.send_manifest(doc2)
    busy = agent.ack(doc2["file_id"], "receiving")
    assert (busy["reason"], busy["have"]) == ("busy", [])
    assert not (store / "incoming" / AGENT_ID / doc2["file_id"]).exists()
    agent.send_chunks(doc1, first)
    agent.ack(doc1["file_id"], "complete")
    agent.send_manifest(doc2)   # the agent asks again after its ack timeout: there is room now
    agent.send_chunks(doc2, second)
    agent.ack(doc2["file_id"], "complete")
    agent.close()
    assert proc.stop() == 0


def test_manifests_from_an_agent_at_its_cap_are_answered_busy_before_any_verification_and_logged_once(
        tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    """A flood of manifests from an agent at its cap costs the receiver a directory listing each: no schema
    check, no signature check, no lock file, no log line each (`busy` is what a genuine one would get now)."""
    store = tmp_path / "store"
    config = receiver_setup(tmp_path, mosquitto.port, store, keyed[1], max_open_transfers_per_agent=1)
    proc = receiver_proc(tmp_path, config).start()
    try:
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
        at_cap_flood_is_busy(store, tmp_path, mosquitto.port, keyed[0])
    finally:
        assert proc.stop() == 0


def at_cap_flood_is_busy(store: Path, tmp_path: Path, port: int, key: AgentKey) -> None:
    agent = ScriptedAgent(port, key)
    content = random_bytes(65536)
    doc = agent.manifest(content)
    agent.send_manifest(doc)   # open: the agent is at its cap
    flood = [agent.manifest(b"x", sha256="ab" * 32) for _ in range(40)]
    for forged in flood:
        agent.publish(forged["file_id"], "manifest", b'{"unsigned": true}')
    for forged in flood:
        assert agent.ack(forged["file_id"], "receiving")["reason"] == "busy"
    assert sorted(p.stem for p in (store / "locks" / AGENT_ID).iterdir()) == [doc["file_id"]]
    log = (tmp_path / "receiver-1.log").read_text()
    assert log.count("transfer deferred") == 1 and "rejected message" not in log
    agent.send_chunks(doc, content)       # the open transfer is untouched
    agent.ack(doc["file_id"], "complete")
    agent.close()


def test_the_receiver_learns_a_rotated_key_from_the_signed_rotation_document_and_refuses_the_retired_key(
        receiver: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path], tmp_path: Path) -> None:
    """A real agent rotates twice; the operator enrolled only its first key. `KeyRing.learn_rotation` (what
    the chain store calls for a chained key_rotation document) enrols each new key durably in the store, beside
    the operator's untouched file: the running receiver takes manifests signed by the newest key and refuses
    those signed by a retired one, with the reason. Forged or out-of-order rotations change nothing."""
    _, keys_dir = keyed
    (tmp_path / "agent").mkdir()
    _, cfg = agent_config(tmp_path / "agent", agent={"id": AGENT_ID})
    agent = Agent(cfg, dock_drivers=[])
    enrolled = keys_dir / f"{AGENT_ID}.pem"
    enrolled.write_text(agent.key.public_pem())          # the operator enrols the agent's first key
    operator_file = enrolled.read_bytes()
    first = agent.key
    agent.sealer.rotate_key(reason="annual", actor="test", via="test")
    second = agent.key
    agent.sealer.rotate_key(reason="suspected exposure", actor="test", via="test")
    newest = agent.key
    rows = agent.catalog.documents.of_kind("key_rotation")
    rotations = [(read_document(agent.layout.data_dir / r["path"]), r["seq"]) for r in rows]
    agent.stop()

    ring = KeyRing(keys_dir, receiver / LEARNED_KEYS)
    stranger = AgentKey.load_or_create(tmp_path / "stranger-keys")
    forged = stranger.sign({**rotations[0][0], "new_key_id": stranger.key_id,
                            "new_public_key": stranger.public_pem()})
    with pytest.raises(KeyRefused, match="signature|signed by"):
        ring.learn_rotation(AGENT_ID, forged)
    with pytest.raises(KeyRefused, match="key in force here"):
        ring.learn_rotation(AGENT_ID, rotations[1][0])      # the second before the first
    with pytest.raises(KeyRefused, match="not a key_rotation document"):
        ring.learn_rotation("ws-other-02", rotations[0][0])
    assert not (receiver / LEARNED_KEYS / f"{AGENT_ID}.json").exists()

    for doc, seq in rotations:
        assert ring.learn_rotation(AGENT_ID, doc, chain_seq=seq) == doc["new_key_id"]
    assert ring.learn_rotation(AGENT_ID, rotations[0][0]) == second.key_id   # again: nothing changes
    assert enrolled.read_bytes() == operator_file

    for key in (newest, second, first):
        scripted = ScriptedAgent(mosquitto.port, key)
        doc = scripted.send_file(random_bytes(5_000))
        if key is newest:
            assert scripted.ack(doc["file_id"], "complete")["sha256"] == doc["sha256"]
        else:
            reason = scripted.ack(doc["file_id"], "rejected")["reason"]
            assert f"signed by {key.key_id}, retired by the agent's rotation" in reason
        scripted.close()
    # Durable and the same for any receiver on the store (a restart): a document the chain store places
    # before the rotation is still checked against its older key.
    again = KeyRing(keys_dir, receiver / LEARNED_KEYS)
    assert again.retired(AGENT_ID) == {first.key_id, second.key_id}
    assert again.key_for(AGENT_ID, first.key_id, chain_seq=rotations[0][1] - 1) is not None
    with pytest.raises(KeyRefused, match="retired"):
        again.key_for(AGENT_ID, first.key_id, chain_seq=rotations[0][1] + 1)
