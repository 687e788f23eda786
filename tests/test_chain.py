"""The whole chain leaves the box (docs/PROTOCOL.md section 10): every signed document reaches a real receiver's
chain in order and is receipted; forks and rewinds are refused as platform events; a gap waits and fills;
hostile chain messages are dropped and counted; and the truncation of the newest history fails `verify` and
`audit verify`, naming the receipted checkpoint. Real mosquitto, real receiver and agent processes."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.catalog import Catalog
from edge_agent.config import ConfigError
from edge_agent.evidence.manifest import GENESIS_PREV, AgentKey, canonical_json
from edge_agent.evidence.receipts import PinnedKeys, verify_chain_receipt
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import (
    AGENT_ID,
    CLI,
    ROOT,
    ScriptedAgent,
    agent_proc,
    agent_setup,
    catalog_rows,
    enrol,
    pinned_dir,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    subscribed_client,
)

KINDS = {"file", "session", "annotation", "key_rotation", "checkpoint"}


# -- checkpoints, in process -------------------------------------------------------------------------------


def test_a_checkpoint_binds_both_heads_is_chained_and_is_not_repeated_while_nothing_moved(tmp_path: Path) -> None:
    _, config = agent_config(tmp_path)
    layout = StoreLayout(config.agent.data_dir).open()
    catalog = Catalog(config.catalog_path)
    try:
        sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, config)
        catalog.audit("something", subject="x", reason="before the checkpoint")
        audit_seq, audit_hash = catalog.meta.get("audit_head").split(":")
        doc = sealer.checkpoint("periodic")
        assert doc is not None and doc["type"] == "checkpoint" and doc["prev"] == GENESIS_PREV
        assert doc["audit_head"] == {"seq": int(audit_seq), "hash": audit_hash}
        assert doc["chain_head"] == {"seq": 0, "sha256": GENESIS_PREV}
        assert catalog.documents.head() == (1, sha(doc))
        assert catalog.audit_log.entries(doc["checkpoint_id"])[0]["action"] == "checkpoint"
        assert sealer.checkpoint("periodic") is None, "nothing moved: no new checkpoint"
        catalog.audit("something else", subject="y")
        second = sealer.checkpoint("before clearing")
        assert second is not None and second["chain_head"] == {"seq": 1, "sha256": sha(doc)}
        assert second["prev"] == sha(doc)
    finally:
        catalog.close()


@pytest.mark.parametrize("value", [0, -5, 86401, "soon"])
def test_checkpoint_interval_is_validated_naming_the_key(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        agent_config(tmp_path, evidence={"checkpoint_s": value})
    assert "evidence.checkpoint_s" in str(err.value)


# -- the receiver's chain store after a power cut -------------------------------------------------------------


def test_a_head_that_outlived_its_documents_rename_steps_back_and_a_lost_file_index_is_written_again(
        tmp_path: Path) -> None:
    """Document, file index and head are made durable as one group; a power cut may keep the head's rename and
    lose the document's. The next process to lock the chain steps the head back to the last document held
    (the agent sends the lost one again and it is accepted), and restores a file index that was lost."""
    from edge_agent.platform.receiver.chain import ChainStore
    docs, prev = [], GENESIS_PREV
    for n in range(1, 4):
        doc = {"v": 1, "type": "file" if n == 3 else "annotation", "agent_id": AGENT_ID, "prev": prev,
               "file_id": "01JD5Q7M6X2V9TNEXRVZ3K0003", "n": n}
        docs.append(doc)
        prev = sha(doc)
    store = ChainStore(tmp_path / "store")
    with store.locked(AGENT_ID):
        for seq, doc in enumerate(docs, 1):
            store.append(AGENT_ID, seq, canonical_json(doc), doc)
    assert store.head(AGENT_ID) == (3, sha(docs[2]))   # staged: the head this process answers from
    assert store.file_entry(AGENT_ID, "01JD5Q7M6X2V9TNEXRVZ3K0003") is None   # not held before the flush
    assert not (tmp_path / "store" / "chains" / AGENT_ID / "head").exists()
    store.sync()
    assert store.head(AGENT_ID) == (3, sha(docs[2]))
    assert store.file_entry(AGENT_ID, "01JD5Q7M6X2V9TNEXRVZ3K0003") == (3, sha(docs[2]))

    store.doc_path(AGENT_ID, 3).unlink()   # the power cut kept the head's rename, not the document's
    after = ChainStore(tmp_path / "store")   # the receiver's next process
    with after.locked(AGENT_ID):
        assert after.head(AGENT_ID) == (2, sha(docs[1]))
        assert after.file_entry(AGENT_ID, "01JD5Q7M6X2V9TNEXRVZ3K0003") is None
        after.append(AGENT_ID, 3, canonical_json(docs[2]), docs[2])   # sent again by the agent
    after.sync()

    index = tmp_path / "store" / "chains" / AGENT_ID / "files" / "01JD5Q7M6X2V9TNEXRVZ3K0003"
    index.unlink()   # the document and head survived, the index entry did not
    again = ChainStore(tmp_path / "store")
    with again.locked(AGENT_ID):
        assert again.head(AGENT_ID) == (3, sha(docs[2]))
        assert again.file_entry(AGENT_ID, "01JD5Q7M6X2V9TNEXRVZ3K0003") == (3, sha(docs[2]))


def test_two_receivers_that_each_keep_a_chain_lock_the_other_wants_both_go_on(tmp_path: Path) -> None:
    """An append keeps its agent's chain lock until the burst's flush. Two receivers on one store, each
    holding one agent's staged document and then wanting the other's agent, would wait for each other for
    ever; `locked` flushes what it keeps before it waits, so both finish and both chains hold both documents."""
    import threading

    from edge_agent.platform.receiver.chain import ChainStore
    first, second = "ws-first", "ws-second"
    docs = {agent: [{"v": 1, "type": "annotation", "agent_id": agent, "n": n} for n in (1, 2)]
            for agent in (first, second)}
    stores = [ChainStore(tmp_path / "store"), ChainStore(tmp_path / "store")]   # two processes' views
    both_staged = threading.Barrier(2, timeout=30)
    finished: list[str] = []

    def receiver(store: ChainStore, mine: str, theirs: str) -> None:
        with store.locked(mine):
            store.append(mine, 1, canonical_json(docs[mine][0]), docs[mine][0])
        both_staged.wait()           # each now keeps the lock of `mine`
        with store.locked(theirs):   # held by the other one
            seq = store.head(theirs)[0] + 1
            store.append(theirs, seq, canonical_json(docs[theirs][1]), docs[theirs][1])
        store.sync()
        finished.append(mine)

    threads = [threading.Thread(target=receiver, args=(stores[0], first, second), daemon=True),
               threading.Thread(target=receiver, args=(stores[1], second, first), daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(finished) == [first, second], "the two receivers waited for each other's lock"
    after = ChainStore(tmp_path / "store")
    for agent in (first, second):
        assert after.head(agent)[0] == 2
        held = [json.loads(after.doc_path(agent, seq).read_bytes())["n"] for seq in (1, 2)]
        assert held == [1, 2]


# -- a scripted agent on the chain stream -------------------------------------------------------------------


class ChainClient:
    """Speaks the chain stream by hand with a real key; collects chain acks and platform events."""

    def __init__(self, port: int, key: AgentKey, agent_id: str = AGENT_ID):
        self.key, self.agent_id = key, agent_id
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = subscribed_client(port, f"chain-{agent_id}", f"{ROOT}/{agent_id}/chain_acks",
                                        lambda payload: self.answers.put(json.loads(payload)))
        self.watch = subscribed_client(port, "platform-watch", f"{ROOT}/_platform/events",
                                       lambda payload: self.events.put(json.loads(payload)))

    def close(self) -> None:
        for client in (self.client, self.watch):
            client.disconnect()
            client.loop_stop()

    def doc(self, prev: str, n: int, **extra: Any) -> dict[str, Any]:
        return self.key.sign({"v": 1, "type": "annotation", "agent_id": self.agent_id, "annotation_id": f"a{n}",
                              "prev": prev, **extra})

    def send(self, seq: int, doc: dict[str, Any] | None = None, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else canonical_json({"seq": seq, "doc": doc})
        self.client.publish(f"{ROOT}/{self.agent_id}/chain/doc", payload, qos=1).wait_for_publish(10)

    def query(self, head: tuple[int, str] | None) -> None:
        body = {"head": None if head is None else {"seq": head[0], "sha256": head[1]}}
        self.client.publish(f"{ROOT}/{self.agent_id}/chain/query", canonical_json(body), qos=1).wait_for_publish(10)

    def answer(self, timeout: float = 20) -> dict[str, Any]:
        return self.answers.get(timeout=timeout)

    def event(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        def match() -> dict[str, Any] | None:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                return None
            return event if event["type"] == kind else None
        return wait_for(match, timeout, interval=0, what=f"platform event {kind}")


def sha(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc)).hexdigest()


@pytest.fixture
def receiver(tmp_path: Path, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> Iterator[Path]:
    config = receiver_setup(tmp_path, mosquitto.port, tmp_path / "store", keyed[1])
    proc = receiver_proc(tmp_path, config).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    yield tmp_path / "store"
    assert proc.alive, "the receiver died"
    assert proc.stop() == 0


@pytest.fixture
def chain(mosquitto: Mosquitto, keyed: tuple[AgentKey, Path], receiver: Path) -> Iterator[ChainClient]:
    client = ChainClient(mosquitto.port, keyed[0])
    # The receiver's subscription may lag its "connected" line: ask until it answers.
    wait_for(lambda: client.query(None) or _poll(client), 20, interval=0, what="the receiver answers chain queries")
    yield client
    client.close()


def _poll(client: ChainClient) -> dict[str, Any] | None:
    try:
        return client.answers.get(timeout=0.5)
    except queue.Empty:
        return None


# -- the receiver's rules --------------------------------------------------------------------------------


def test_a_gap_waits_for_the_missing_document_then_fills(chain: ChainClient, receiver: Path,
                                                         tmp_path: Path) -> None:
    d1 = chain.doc(GENESIS_PREV, 1)
    d2 = chain.doc(sha(d1), 2)
    d3 = chain.doc(sha(d2), 3)
    chain.send(1, d1)
    first = chain.answer()
    assert (first["state"], first["seq"], first["sha256"]) == ("held", 1, sha(d1))
    receipt = verify_chain_receipt(first["receipt"], PinnedKeys(pinned_dir(tmp_path)), AGENT_ID)
    assert (receipt["seq"], receipt["sha256"]) == (1, sha(d1))
    chain.send(3, d3)                                   # 2 is missing: not held, the head is named
    gap = chain.answer()
    assert (gap["state"], gap["seq"]) == ("gap", 1)
    assert not (receiver / "chains" / AGENT_ID / "docs" / f"{3:012d}.json").exists()
    chain.send(2, d2)
    assert chain.answer()["seq"] == 2
    chain.send(3, d3)
    last = chain.answer()
    assert (last["state"], last["seq"], last["sha256"]) == ("held", 3, sha(d3))
    held = (receiver / "chains" / AGENT_ID / "docs" / f"{3:012d}.json").read_bytes()
    assert held == canonical_json(d3)


def test_a_fork_and_a_rewind_are_refused_and_published_as_platform_events(chain: ChainClient, receiver: Path,
                                                                          keyed: tuple[AgentKey, Path]) -> None:
    d1 = chain.doc(GENESIS_PREV, 1)
    d2 = chain.doc(sha(d1), 2)
    chain.send(1, d1)
    chain.send(2, d2)
    assert chain.answer()["seq"] == 1
    assert chain.answer()["seq"] == 2
    other = chain.doc(sha(d1), 99)                      # another document after the same prev: a fork
    chain.send(2, other)
    refused = chain.answer()
    assert (refused["state"], refused["refusal"], refused["seq"]) == ("refused", "fork", 2)
    fork = chain.event("chain_fork")
    assert (fork["agent_id"], fork["offered_seq"], fork["held_sha256"]) == (AGENT_ID, 2, sha(d2))
    assert (receiver / "chains" / AGENT_ID / "docs" / f"{2:012d}.json").read_bytes() == canonical_json(d2)
    assert list((receiver / "chains" / AGENT_ID / "refused").iterdir()), "the refused document is kept"
    chain.query((1, sha(d1)))                           # the agent comes back with a shorter chain: a rewind
    rewind = chain.answer()
    assert (rewind["state"], rewind["refusal"], rewind["seq"]) == ("refused", "rewind", 2)
    assert "platform holds its chain up to 2" in chain.event("chain_rewind")["reason"]
    chain.query((2, sha(d2)))                           # the honest head is answered as before
    assert (chain.answer()["state"]) == "held"


def test_a_file_manifest_that_is_not_the_chained_one_is_rejected_on_the_file_lane(
        chain: ChainClient, mosquitto: Mosquitto, keyed: tuple[AgentKey, Path]) -> None:
    files = ScriptedAgent(mosquitto.port, keyed[0])
    try:
        chained = files.manifest(b"evidence")
        chain.send(1, chained)
        assert chain.answer()["seq"] == 1
        other = files.manifest(b"other bytes", file_id=chained["file_id"])   # same file id, not the chained one
        files.send_manifest(other)
        ack = files.ack(chained["file_id"], "rejected")
        assert "not the one in the agent's chain at seq 1" in ack["reason"]
        files.send_manifest(chained)
        files.send_chunks(chained, b"evidence", [0])
        assert files.ack(chained["file_id"], "complete")["sha256"] == chained["sha256"]
    finally:
        files.close()


def test_hostile_chain_messages_are_dropped_and_counted_and_the_receiver_stays_live(
        chain: ChainClient, receiver: Path, tmp_path: Path) -> None:
    d1 = chain.doc(GENESIS_PREV, 1)
    chain.send(1, d1)
    assert chain.answer()["seq"] == 1
    stranger = AgentKey.load_or_create(tmp_path / "stranger-keys")
    forged = stranger.sign({k: v for k, v in chain.doc(sha(d1), 2).items() if k not in ("key_id", "sig")})
    hostile = [b"not json", b"[]", b"{" * 5000 + b"}" * 5000, b'{"seq":2}', json.dumps({"seq": -1, "doc": {}}).encode(),
               b'{"seq":2,"doc":' + b'"' + b"x" * (5 * 1024**2) + b'"}',
               canonical_json({"seq": 2, "doc": chain.doc(sha(d1), 2, agent_id="ws-other")}),
               canonical_json({"seq": 2, "doc": forged}),
               canonical_json({"seq": 2, "doc": {**chain.doc(sha(d1), 2), "annotation_id": "edited"}})]
    for payload in hostile:
        chain.send(2, raw=payload)
    chain.client.publish(f"{ROOT}/{AGENT_ID}/chain/delete", b"{}", qos=1).wait_for_publish(10)
    chain.send(1, d1)                                   # a replay: changes nothing, answered with the head
    replay = chain.answer()
    assert (replay["state"], replay["seq"]) == ("held", 1)
    assert chain.answers.empty(), "hostile messages got no answer"
    d2 = chain.doc(sha(d1), 2)
    chain.send(2, d2)
    assert (chain.answer()["seq"]) == 2, "the receiver still takes the genuine next document"
    log = (tmp_path / "receiver-1.log").read_text(errors="replace")
    assert "chain message dropped" in log and f"dropped={len(hostile)}" in log
    assert "dropped chain message topic=" in log
    assert sorted(p.name for p in (receiver / "chains" / AGENT_ID / "docs").iterdir()) == [
        f"{1:012d}.json", f"{2:012d}.json"]


# -- a real agent -------------------------------------------------------------------------------------------


def run_cli(agent_toml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--config", str(agent_toml), *args], capture_output=True, text=True, timeout=120)


def local_chain(data_dir: Path) -> list[tuple[int, str, str]]:
    return catalog_rows(data_dir, "SELECT seq, kind, sha256 FROM documents ORDER BY seq")


def receipted(data_dir: Path) -> tuple[int, int | None] | None:
    rows = catalog_rows(data_dir, "SELECT seq, checkpoint_seq FROM chain_receipt")
    return (rows[0][0], rows[0][1]) if rows else None


def held_chain(store: Path) -> dict[int, dict[str, Any]]:
    folder = store / "chains" / AGENT_ID / "docs"
    return {int(p.stem): json.loads(p.read_bytes()) for p in folder.glob("*.json")} if folder.exists() else {}


def start_agent_and_receiver(tmp_path: Path, port: int) -> tuple[Path, Path, Path, Any, Any, Path]:
    dock = tmp_path / "dock"
    dock.mkdir()
    agent_toml, data_dir = agent_setup(tmp_path, port, dock_root=dock, evidence={"checkpoint_s": 1})
    enrol(agent_toml, tmp_path / "enrolled")
    store = tmp_path / "store"
    receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, port, store, tmp_path / "enrolled")).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = agent_proc(tmp_path, agent_toml).start()
    return agent_toml, data_dir, store, agent, receiver, dock


def dock_and_clear(dock: Path, data_dir: Path, label: str, files: dict[str, bytes | int]) -> None:
    prepared = make_recorder_volume(dock / f".prep-{label}", label, files)
    os.rename(prepared, dock / label)
    wait_for(lambda: len([r for r in catalog_rows(data_dir) if r[1] == "source_cleared"
                          and r[2] in files]) == len(files), 60, what=f"{label} synced and cleared")


def chain_settled(data_dir: Path, store: Path) -> bool:
    """The receiver holds the agent's whole chain and the agent keeps the receipt of its head."""
    local = local_chain(data_dir)
    held = held_chain(store)
    return bool(local) and len(held) == len(local) and receipted(data_dir) == (
        local[-1][0], max(seq for seq, kind, _ in local if kind == "checkpoint"))


@pytest.mark.slow
def test_every_signed_document_reaches_the_receivers_chain_in_order_and_is_receipted(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    agent_toml, data_dir, store, agent, receiver, dock = start_agent_and_receiver(tmp_path, mosquitto.port)
    try:
        dock_and_clear(dock, data_dir, "VOL1", {"DCIM/100/REC0001.MP4": 300_000, "DCIM/100/REC0002.MP4": 1000})
        file_id = catalog_rows(data_dir)[0][0]
        agent.stop()
        tagged = run_cli(agent_toml, "tag", file_id, "--case", "2026-0117", "--reason", "complaint")
        assert tagged.returncode == 0, tagged.stderr
        rotated = run_cli(agent_toml, "keys", "rotate", "--reason", "annual")
        assert rotated.returncode == 0, rotated.stderr
        agent.start()   # nobody enrols the new key: the receiver learns it from the rotation in the chain

        def checkpointed_after_rotation() -> bool:   # the checkpoint job's runs (late on a busy machine)
            kinds = [kind for _, kind, _ in local_chain(data_dir)]
            return "key_rotation" in kinds and "checkpoint" in kinds[kinds.index("key_rotation"):]

        wait_for(lambda: checkpointed_after_rotation() and chain_settled(data_dir, store), 60,
                 what="the whole chain, with a checkpoint signed after the restart, held and receipted")
        local = local_chain(data_dir)
        held = held_chain(store)
        assert {kind for _, kind, _ in local} == KINDS
        assert any(doc["type"] == "checkpoint" and doc["reason"].startswith("before clearing")
                   for doc in held.values()), "a checkpoint was signed before the recorder was cleared"
        for seq, kind, digest in local:
            assert held[seq]["type"] == kind
            assert hashlib.sha256(canonical_json(held[seq])).hexdigest() == digest
        prev = GENESIS_PREV
        for seq in sorted(held):                            # one unbroken sequence, in chain order
            assert held[seq]["prev"] == prev
            prev = hashlib.sha256(canonical_json(held[seq])).hexdigest()
        learned = json.loads((store / "keys" / "learned" / f"{AGENT_ID}.json").read_text())
        assert json.dumps(learned).count("ed25519:") >= 2, "the rotation was learned from the chain"

        def status_says_receipted_to_the_head() -> bool:   # checkpoints every second: read both, until they agree
            chain = json.loads(run_cli(agent_toml, "--json", "status").stdout)["chain"]
            now = local_chain(data_dir)
            return (chain["receipted_seq"] == chain["head_seq"] == now[-1][0]
                    and chain["checkpoint_seq"] == max(seq for seq, kind, _ in now if kind == "checkpoint"))

        wait_for(status_says_receipted_to_the_head, 60, what="status reporting the chain receipted up to its head")
        assert "the platform holds it up to" in run_cli(agent_toml, "status").stdout.replace("\n", " ")
    finally:
        agent.stop()
        assert receiver.stop() == 0


@pytest.mark.slow
def test_removing_the_newest_history_fails_verify_and_audit_verify_naming_the_checkpoint(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    agent_toml, data_dir, store, agent, receiver, dock = start_agent_and_receiver(tmp_path, mosquitto.port)
    try:
        dock_and_clear(dock, data_dir, "VOL1", {"DCIM/100/REC0001.MP4": 5000, "DCIM/100/REC0002.MP4": 7000})
        wait_for(lambda: chain_settled(data_dir, store), 60, what="the whole chain held and receipted")
    finally:
        assert agent.stop() == 0
        assert receiver.stop() == 0
    verified = run_cli(agent_toml, "verify", "--all", "--reason", "before")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checkpoint_id = catalog_rows(data_dir, "SELECT doc_id FROM documents WHERE seq = ?",
                                 (receipted(data_dir)[1],))[0][0]
    truncate_newest_file(data_dir)
    verified = run_cli(agent_toml, "--json", "verify", "--all", "--reason", "after")
    assert verified.returncode != 0
    assert f"checkpoint {checkpoint_id}" in verified.stdout + verified.stderr
    assert "were removed after the platform received them" in verified.stdout + verified.stderr
    audited = run_cli(agent_toml, "--json", "audit", "verify")
    assert audited.returncode != 0
    assert f"checkpoint {checkpoint_id}" in audited.stdout + audited.stderr
    assert "were removed after the checkpoint was signed" in audited.stdout + audited.stderr
    receiver.start()                                    # the platform sees the shorter chain: a rewind
    agent.start()
    try:
        wait_for(lambda: catalog_rows(data_dir, "SELECT message FROM alarms WHERE kind = 'chain_refused'"
                                                " AND cleared_ms IS NULL"), 60, what="the chain_refused alarm")
        assert receiver_logged(tmp_path, "event=chain_rewind")
        assert "rewind" in catalog_rows(data_dir, "SELECT message FROM alarms WHERE kind = 'chain_refused'")[0][0]
    finally:
        assert agent.stop() == 0
        assert receiver.stop() == 0


def truncate_newest_file(data_dir: Path) -> None:
    """The attack of issue 10, as root on the workstation would do it (no key needed): the newest file's row, its
    audit entries and chain document (and everything after them), its store, manifest and receipt files go, and
    both heads in `meta` are rewound to what is left."""
    conn = sqlite3.connect(data_dir / "catalog.sqlite")
    try:
        seq, file_id, path = conn.execute("SELECT seq, doc_id, path FROM documents WHERE kind = 'file'"
                                          " ORDER BY seq DESC LIMIT 1").fetchone()
        store_path = conn.execute("SELECT store_path FROM files WHERE file_id = ?", (file_id,)).fetchone()[0]
        first_audit = conn.execute("SELECT MIN(seq) FROM audit WHERE subject = ?", (file_id,)).fetchone()[0]
        with conn:
            conn.execute("DELETE FROM documents WHERE seq >= ?", (seq,))
            conn.execute("DELETE FROM audit WHERE seq >= ?", (first_audit,))
            conn.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
            conn.execute("DELETE FROM receipts WHERE file_id = ?", (file_id,))
            head_seq, head_sha = conn.execute("SELECT seq, sha256 FROM documents ORDER BY seq DESC LIMIT 1").fetchone()
            audit_seq, audit_hash = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            conn.execute("UPDATE meta SET value = ? WHERE key = 'chain_head'", (f"{head_seq}:{head_sha}",))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (f"{audit_seq}:{audit_hash}",))
    finally:
        conn.close()
    for victim in (data_dir / path, data_dir / store_path, data_dir / "receipts" / file_id[-2:] / f"{file_id}.json"):
        os.chmod(victim.parent, 0o755)
        victim.unlink()


@pytest.mark.slow
def test_two_receivers_sharing_one_store_hold_one_chain_and_a_killed_one_loses_nothing(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Behind a shared subscription consecutive documents go to either receiver; both append under the store's
    per-agent lock, a document ahead of the other's append is a gap the agent fills, and a receiver killed with
    -9 mid-stream costs only resends."""
    dock = tmp_path / "dock"
    dock.mkdir()
    agent_toml, data_dir = agent_setup(tmp_path, mosquitto.port, dock_root=dock, evidence={"checkpoint_s": 1})
    enrol(agent_toml, tmp_path / "enrolled")
    store = tmp_path / "store"
    procs = []
    for name in ("receiver-a", "receiver-b"):
        config = receiver_setup(tmp_path, mosquitto.port, store, tmp_path / "enrolled", name=name,
                                shared_subscription=True)
        procs.append(receiver_proc(tmp_path, config, name).start())
    for name in ("receiver-a", "receiver-b"):
        wait_for(lambda n=name: receiver_logged(tmp_path, "mqtt connected", n), 20, what=f"{name} connected")
    agent = agent_proc(tmp_path, agent_toml).start()
    try:
        prepared = make_recorder_volume(dock / ".prep", "VOL1", {f"DCIM/100/REC{i:04d}.MP4": 3000 + i
                                                                  for i in range(12)})
        os.rename(prepared, dock / "VOL1")
        wait_for(lambda: len(held_chain(store)) >= 4, 60, what="the chain under way")
        procs[0].kill9()
        procs[0].start()
        wait_for(lambda: len([r for r in catalog_rows(data_dir) if r[1] == "source_cleared"]) == 12, 90,
                 what="every file synced and cleared")
        wait_for(lambda: chain_settled(data_dir, store), 60, what="the whole chain held and receipted")
        prev = GENESIS_PREV
        held = held_chain(store)
        assert sorted(held) == list(range(1, len(held) + 1))
        for seq in sorted(held):
            assert held[seq]["prev"] == prev
            prev = hashlib.sha256(canonical_json(held[seq])).hexdigest()
        assert not (store / "chains" / AGENT_ID / "refused").exists(), "an honest agent is never refused"
    finally:
        assert agent.stop() == 0
        for proc in procs:
            assert proc.stop() == 0
