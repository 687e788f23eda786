"""Transfers in progress as objects in the object store (`[store] transfers = "s3"`), against a real SeaweedFS:
receivers share nothing but the buckets, so any receiver continues any transfer."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import zlib
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from edge_agent.config import ConfigError, parse_receiver_config
from edge_agent.platform.receiver import Receiver, objectstore
from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings, StoreConfigError
from edge_agent.platform.receiver.store import CRASH_AT_ENV
from edge_agent.platform.receiver.transfers import BucketTransfers
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_RECEIVING, ACK_REJECTED, chunk_count, chunk_span, to_ranges
from tests.helpers import wait_for
from tests.peers.mosquitto import Mosquitto
from tests.seaweedfs import SeaweedFS
from tests.sync_support import AGENT_ID as SYNC_AGENT
from tests.sync_support import (
    ScriptedAgent,
    enrolled_agent_key,
    held_seqs,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    stop_all,
)

AGENT = "ws-xfer-01"
CHUNK = 64 * 1024
LOCKED, TRANSFERS = "evidence-locked", "evidence-transfers"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    make_buckets(server)
    yield server
    server.stop()


def make_buckets(server: SeaweedFS) -> None:
    s3 = server.client()
    s3.create_bucket(Bucket=LOCKED, ObjectLockEnabledForBucket=True)
    s3.create_bucket(Bucket=TRANSFERS)


def receiver(server: SeaweedFS, root: Path) -> BucketTransfers:
    """A receiver with its own local directory, sharing the two buckets with every other one."""
    root.mkdir(parents=True, exist_ok=True)
    committed = S3Committed(S3Settings(endpoint=server.endpoint, bucket=LOCKED, connect_timeout_s=1,
                                       read_timeout_s=5, credentials_file=server.credentials_file(root)))
    return BucketTransfers(root, committed, TRANSFERS)


def manifest(content: bytes, **overrides) -> tuple[bytes, dict]:
    doc = {"size": len(content), "chunk_size": CHUNK, "sha256": hashlib.sha256(content).hexdigest(),
           "retention": "routine", **overrides}
    return json.dumps(doc, sort_keys=True).encode(), doc


def chunk(content: bytes, seq: int, check: str = "sha256") -> tuple[int, bytes, str]:
    """Chunk `seq` and the check its header carried: crc32 (this version's agents) or sha256 (older ones)."""
    offset, length = chunk_span(seq, len(content), CHUNK)
    data = content[offset:offset + length]
    return offset, data, f"{zlib.crc32(data):08x}" if check == "crc32" else hashlib.sha256(data).hexdigest()


def put(store: BucketTransfers, fid: str, content: bytes, seqs, check: str = "sha256") -> None:
    for seq in seqs:
        offset, data, value = chunk(content, seq, check)
        assert store.put_chunk(AGENT, fid, seq, offset, data, value)


def file_id(n: int) -> str:
    return f"01JD5Q7M6X2V9TNEXRVZ4K{n:04d}"


def keys(server: SeaweedFS, bucket: str, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for obj in listed.get("Contents", [])]


def restart(server: SeaweedFS, key: str) -> None:
    """Start SeaweedFS again and await its data: its S3 API answers before the volume server is back (reads fail
    with InternalError until then)."""
    server.start()

    def readable() -> bool:
        try:
            server.client().get_object(Bucket=TRANSFERS, Key=key)["Body"].read()
        except (BotoCoreError, ClientError):
            return False
        return True

    wait_for(readable, 60, what="SeaweedFS serving its data again")


def versions(server: SeaweedFS, key: str) -> list[str]:
    listed = server.client().list_object_versions(Bucket=LOCKED, Prefix=key)
    return [v["Key"] for v in listed.get("Versions", [])]


def test_chunks_and_manifest_are_objects_and_the_commit_streams_them_into_the_locked_bucket(
        seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)   # S3's smallest part: 80 chunks in each
    store = receiver(seaweed, tmp_path / "r1")
    content = os.urandom(11 * 1024**2 + 7)
    canonical, doc = manifest(content)
    fid, total = file_id(1), chunk_count(len(content), CHUNK)
    assert store.accept_manifest(AGENT, fid, canonical, doc).state == ACK_RECEIVING
    s3 = seaweed.client()
    assert s3.get_object(Bucket=TRANSFERS, Key=f"transfers/{AGENT}/{fid}/manifest.json")["Body"].read() == canonical
    put(store, fid, content, range(0, total, 2), "crc32")   # this version's agents: CRC-32 chunk headers
    prefix = f"transfers/{AGENT}/{fid}/chunks/{doc['sha256']}-{CHUNK}/"
    assert keys(seaweed, TRANSFERS, prefix) == [f"{prefix}{seq:08d}" for seq in range(0, total, 2)]
    head = s3.head_object(Bucket=TRANSFERS, Key=f"{prefix}00000002", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == base64.b64encode(bytes.fromhex(chunk(content, 2, "crc32")[2])).decode()
    # A second receiver, new to the transfer, sees what is held from the listing alone.
    other = receiver(seaweed, tmp_path / "r2")
    assert other.have(AGENT, fid) == list(range(0, total, 2))
    assert other.progress(AGENT, fid, doc).have == to_ranges(list(range(0, total, 2)))
    assert other.manifest(AGENT, fid) == doc

    put(other, fid, content, range(1, total, 2))   # an older agent's SHA-256 headers, in the same transfer
    head = s3.head_object(Bucket=TRANSFERS, Key=f"{prefix}00000001", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(chunk(content, 1)[2])).decode()
    ack = other.progress(AGENT, fid, doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
    key = f"objects/{doc['sha256']}"
    assert s3.get_object(Bucket=LOCKED, Key=key)["Body"].read() == content
    head = s3.head_object(Bucket=LOCKED, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-3") and head["ObjectLockMode"] == "COMPLIANCE"
    assert keys(seaweed, TRANSFERS, f"transfers/{AGENT}/{fid}/") == []   # the transfer's objects are gone
    assert store.progress(AGENT, fid, doc).state == ACK_COMPLETE
    assert not (tmp_path / "r1" / "incoming" / AGENT).exists() and not (tmp_path / "r2" / "incoming" / AGENT).exists()


@pytest.mark.parametrize("check", ["crc32", "sha256"])
def test_a_chunk_whose_checksum_the_server_refuses_is_not_recorded(seaweed: SeaweedFS, tmp_path: Path,
                                                                     check: str) -> None:
    store = receiver(seaweed, tmp_path / "r1")
    content = os.urandom(3 * CHUNK)
    canonical, doc = manifest(content)
    fid = file_id(2 if check == "sha256" else 72)
    store.accept_manifest(AGENT, fid, canonical, doc)
    offset, data, value = chunk(content, 1, check)
    damaged = bytes([data[0] ^ 1]) + data[1:]   # bytes changed after they were checked: the server recomputes
    assert store.put_chunk(AGENT, fid, 1, offset, damaged, value)
    assert store.have(AGENT, fid) == []
    assert receiver(seaweed, tmp_path / "r2").have(AGENT, fid) == []
    assert store.progress(AGENT, fid, doc).have == []
    put(store, fid, content, range(3), check)
    assert store.progress(AGENT, fid, doc).state == ACK_COMPLETE


def test_a_file_whose_chunks_do_not_hash_to_the_manifest_is_rejected_never_complete(
        seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)
    for n, size in ((3, 2 * CHUNK + 5), (4, 6 * 1024**2)):   # one put; a multipart upload
        store = receiver(seaweed, tmp_path / f"r{n}")
        content = os.urandom(size)
        canonical, doc = manifest(content, sha256=hashlib.sha256(b"another file").hexdigest())
        fid = file_id(n)
        store.accept_manifest(AGENT, fid, canonical, doc)
        put(store, fid, content, range(chunk_count(size, CHUNK)), "crc32")   # each chunk matches its CRC-32
        ack = store.progress(AGENT, fid, doc)
        assert ack.state == ACK_REJECTED and "SHA-256" in ack.reason
        assert keys(seaweed, LOCKED, f"objects/{doc['sha256']}") == []
        assert keys(seaweed, LOCKED, f"index/{AGENT}/{fid}") == []
        assert receiver(seaweed, tmp_path / "other").settled(AGENT, fid).state == ACK_REJECTED
        assert keys(seaweed, TRANSFERS, f"transfers/{AGENT}/{fid}/") == []


def test_a_chunk_written_late_for_an_earlier_manifest_is_not_counted_for_the_new_one(seaweed: SeaweedFS,
                                                                                       tmp_path: Path) -> None:
    """Receiver A still has the first manifest when receiver B takes a new one for the same id (the agent
    sealed the file again): a chunk A writes afterwards is not held for the new file."""
    a, b = receiver(seaweed, tmp_path / "a"), receiver(seaweed, tmp_path / "b")
    fid = file_id(9)
    first, second = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK)
    canonical, doc = manifest(first)
    assert a.accept_manifest(AGENT, fid, canonical, doc).state == ACK_RECEIVING
    canonical2, doc2 = manifest(second)
    assert b.accept_manifest(AGENT, fid, canonical2, doc2).state == ACK_RECEIVING
    put(a, fid, first, [0])   # late, for the first manifest
    assert b.have(AGENT, fid) == []
    put(b, fid, second, [0, 1])
    ack = b.progress(AGENT, fid, doc2)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc2["sha256"])
    assert seaweed.client().get_object(Bucket=LOCKED, Key=f"objects/{doc2['sha256']}")["Body"].read() == second
    assert keys(seaweed, TRANSFERS, f"transfers/{AGENT}/{fid}/") == []


@pytest.mark.parametrize(("n", "size"), [(10, 3 * CHUNK), (11, 6 * 1024**2 + 1)], ids=["one put", "multipart"])
def test_two_receivers_committing_one_transfer_at_once_store_it_once(seaweed: SeaweedFS, tmp_path: Path, n: int,
                                                                     size: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both see every chunk and commit at the same instant: each answers `complete` (or, while the other holds
    the upload's claim, `receiving` and `complete` on its next attempt); every key has one version."""
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)
    content = os.urandom(size)
    canonical, doc = manifest(content)
    fid = file_id(n)
    stores = [receiver(seaweed, tmp_path / name) for name in ("r1", "r2")]
    stores[0].accept_manifest(AGENT, fid, canonical, doc)
    put(stores[0], fid, content, range(chunk_count(size, CHUNK)))
    barrier, acks = threading.Barrier(2), [None, None]

    def commit(i: int) -> None:
        barrier.wait()
        acks[i] = stores[i].progress(AGENT, fid, doc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for i, ack in enumerate(acks):
        if ack.state != ACK_COMPLETE:
            assert ack.state == ACK_RECEIVING
            acks[i] = stores[i].progress(AGENT, fid, doc)
    assert [(a.state, a.sha256) for a in acks] == [(ACK_COMPLETE, doc["sha256"])] * 2
    for key in (f"objects/{doc['sha256']}", f"index/{AGENT}/{fid}.json",
                f"manifests/{AGENT}/{fid}.{doc['sha256']}.json"):
        assert versions(seaweed, key) == [key], f"{key} written more than once"
    assert seaweed.client().get_object(Bucket=LOCKED, Key=f"objects/{doc['sha256']}")["Body"].read() == content


RECEIVER_A = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings
    from edge_agent.platform.receiver.transfers import BucketTransfers
    endpoint, root, content_path, fid, chunk_size = sys.argv[1:6]
    root, chunk_size = Path(root), int(chunk_size)
    committed = S3Committed(S3Settings(endpoint=endpoint, bucket="{locked}",
                                       credentials_file=root / "s3-credentials"))
    store = BucketTransfers(root, committed, "{transfers}")
    content = Path(content_path).read_bytes()
    canonical = Path(content_path + ".manifest").read_bytes()
    store.accept_manifest("{agent}", fid, canonical, json.loads(canonical))
    for seq in range(-(-len(content) // chunk_size)):
        data = content[seq * chunk_size:(seq + 1) * chunk_size]
        store.put_chunk("{agent}", fid, seq, seq * chunk_size, data, hashlib.sha256(data).hexdigest())
        print(seq, flush=True)
""").format(locked=LOCKED, transfers=TRANSFERS, agent=AGENT)


def test_a_receiver_killed_mid_file_loses_nothing_and_another_commits_it_once(seaweed: SeaweedFS,
                                                                               tmp_path: Path) -> None:
    """Receiver A (a process of its own, its own directory) takes the manifest and chunks and is killed -9
    while it writes them; receiver B, on another directory and sharing only the buckets, lists what A stored,
    takes the rest and commits the file once, byte-identical."""
    content = os.urandom(64 * CHUNK + 100)
    canonical, doc = manifest(content)
    fid, total = file_id(5), chunk_count(len(content), CHUNK)
    (tmp_path / "file").write_bytes(content)
    (tmp_path / "file.manifest").write_bytes(canonical)
    root_a = tmp_path / "a"
    root_a.mkdir()
    seaweed.credentials_file(root_a)
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_A, seaweed.endpoint, str(root_a),
                             str(tmp_path / "file"), fid, str(CHUNK)], stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        stored_by_a = [int(proc.stdout.readline()) for _ in range(20)]
        proc.kill()   # SIGKILL mid-file: a chunk may be half sent
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    b = receiver(seaweed, tmp_path / "b")
    held = b.have(AGENT, fid)
    assert set(stored_by_a) <= set(held) and len(held) < total   # every chunk A acknowledged is there
    assert b.manifest(AGENT, fid) == doc
    ack = b.accept_manifest(AGENT, fid, canonical, doc)   # the agent, sent to B, starts with its manifest again
    assert ack.state == ACK_RECEIVING and ack.have == to_ranges(held)
    put(b, fid, content, sorted(set(range(total)) - set(held)))
    ack = b.progress(AGENT, fid, doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
    s3 = seaweed.client()
    assert s3.get_object(Bucket=LOCKED, Key=f"objects/{doc['sha256']}")["Body"].read() == content
    for key in (f"objects/{doc['sha256']}", f"index/{AGENT}/{fid}.json",
                f"manifests/{AGENT}/{fid}.{doc['sha256']}.json"):
        assert versions(seaweed, key) == [key], f"{key} written more than once"
    assert keys(seaweed, TRANSFERS, f"transfers/{AGENT}/{fid}/") == []
    assert receiver(seaweed, tmp_path / "c").accept_manifest(AGENT, fid, canonical, doc).state == ACK_COMPLETE


COMMITTER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from edge_agent.platform.receiver import objectstore
    from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings
    from edge_agent.platform.receiver.transfers import BucketTransfers
    endpoint, root, fid, canonical = sys.argv[1:5]
    objectstore.PART_BYTES = 5 * 1024**2
    committed = S3Committed(S3Settings(endpoint=endpoint, bucket="{locked}",
                                       credentials_file=Path(root) / "s3-credentials"))
    print(BucketTransfers(Path(root), committed, "{transfers}").progress("{agent}", fid, json.loads(canonical)))
""").format(locked=LOCKED, transfers=TRANSFERS, agent=AGENT)


def test_a_receiver_killed_during_the_commit_leaves_the_transfer_for_another_to_commit_once(
        seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Receiver A is killed -9 after the first part of the committed object was uploaded: nothing is stored,
    every chunk is still in the bucket; B answers `receiving` while A's upload claim lasts, and once it has
    expired B commits the file, one version of each key."""
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)
    content = os.urandom(11 * 1024**2 + 3)
    canonical, doc = manifest(content)
    fid, total = file_id(12), chunk_count(len(content), CHUNK)
    b = receiver(seaweed, tmp_path / "b")
    b.accept_manifest(AGENT, fid, canonical, doc)
    put(b, fid, content, range(total))
    root_a = tmp_path / "a"
    root_a.mkdir()
    seaweed.credentials_file(root_a)
    crashed = subprocess.run([sys.executable, "-c", COMMITTER, seaweed.endpoint, str(root_a), fid, canonical],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, CRASH_AT_ENV: "part_uploaded"})
    assert crashed.returncode == -9 and "killing the receiver at commit step=part_uploaded" in crashed.stderr
    sha256 = doc["sha256"]
    assert keys(seaweed, LOCKED, f"objects/{sha256}") == [] and keys(seaweed, LOCKED, f"index/{AGENT}/{fid}") == []
    assert b.have(AGENT, fid) == list(range(total))   # nothing lost

    ack = b.progress(AGENT, fid, doc)
    assert ack.state == ACK_RECEIVING   # A's claim on the upload is live: B cannot know A is dead
    claim = json.loads(seaweed.client().get_object(Bucket=LOCKED, Key=f"claims/objects/{sha256}/0")["Body"].read())
    monkeypatch.setattr(objectstore, "now_ms", lambda: claim["expires_ms"] + 1)   # later: the claim has expired
    ack = b.progress(AGENT, fid, doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, sha256)
    assert seaweed.client().get_object(Bucket=LOCKED, Key=f"objects/{sha256}")["Body"].read() == content
    for key in (f"objects/{sha256}", f"index/{AGENT}/{fid}.json", f"manifests/{AGENT}/{fid}.{sha256}.json"):
        assert versions(seaweed, key) == [key], f"{key} written more than once"
    assert keys(seaweed, TRANSFERS, f"transfers/{AGENT}/{fid}/") == []


@pytest.mark.extended   # the default run has the store down at commit, and the S3 store's outage tests
def test_with_the_store_down_mid_transfer_the_file_stays_receiving_and_resumes(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    try:
        make_buckets(server)
        store = receiver(server, tmp_path / "r1")
        content = os.urandom(6 * CHUNK + 1)
        canonical, doc = manifest(content)
        fid, total = file_id(6), chunk_count(len(content), CHUNK)
        store.accept_manifest(AGENT, fid, canonical, doc)
        put(store, fid, content, range(3))
        server.stop()
        put(store, fid, content, range(3, total))   # not stored: not recorded
        ack = store.progress(AGENT, fid, doc)
        assert ack.state == ACK_RECEIVING and ack.have == [[0, 2]]
        assert store.accept_manifest(AGENT, fid, canonical, doc).state == ACK_RECEIVING
        restart(server, f"transfers/{AGENT}/{fid}/manifest.json")
        assert store.have(AGENT, fid) == [0, 1, 2]
        put(store, fid, content, range(3, total))   # the agent sends what was not acknowledged
        ack = store.progress(AGENT, fid, doc)
        assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
        assert server.client().get_object(Bucket=LOCKED, Key=f"objects/{doc['sha256']}")["Body"].read() == content
    finally:
        server.stop()


def test_with_the_store_down_at_commit_the_file_stays_receiving_and_commits_when_it_returns(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    try:
        make_buckets(server)
        store = receiver(server, tmp_path / "r1")
        content = os.urandom(4 * CHUNK)
        canonical, doc = manifest(content)
        fid = file_id(7)
        store.accept_manifest(AGENT, fid, canonical, doc)
        put(store, fid, content, range(4))
        server.stop()
        ack = store.progress(AGENT, fid, doc)
        assert ack.state == ACK_RECEIVING and ack.have == [[0, 3]]
        restart(server, f"transfers/{AGENT}/{fid}/manifest.json")
        ack = receiver(server, tmp_path / "r2").progress(AGENT, fid, doc)
        assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
    finally:
        server.stop()


def test_transfers_config_is_checked(seaweed: SeaweedFS, tmp_path: Path) -> None:
    base = {"backend": "s3", "endpoint": seaweed.endpoint, "bucket": LOCKED,
            "credentials_file": str(seaweed.credentials_file(tmp_path))}
    with pytest.raises(ConfigError, match='needs backend = "s3"'):
        parse_receiver_config({"store": {"transfers": "s3", "transfers_bucket": TRANSFERS}}, "receiver.toml")
    with pytest.raises(ConfigError, match="needs transfers_bucket"):
        parse_receiver_config({"store": {**base, "transfers": "s3"}}, "receiver.toml")
    with pytest.raises(ConfigError, match="is the bucket of committed files"):
        parse_receiver_config({"store": {**base, "transfers": "s3", "transfers_bucket": LOCKED}}, "receiver.toml")
    assert parse_receiver_config({"store": base}, "receiver.toml").store.transfers == "local"

    (tmp_path / "agents").mkdir()
    receiver_section = {"store_dir": str(tmp_path / "store"), "keys_dir": str(tmp_path / "agents")}
    config = parse_receiver_config({"receiver": receiver_section,
                                    "store": {**base, "transfers": "s3", "transfers_bucket": TRANSFERS}}, "r.toml")
    store = Receiver(config).store
    assert isinstance(store, BucketTransfers)
    content = os.urandom(CHUNK + 3)
    canonical, doc = manifest(content)
    store.accept_manifest(AGENT, file_id(8), canonical, doc)
    put(store, file_id(8), content, range(2))
    assert store.progress(AGENT, file_id(8), doc).state == ACK_COMPLETE
    assert not (tmp_path / "store" / "incoming" / AGENT).exists()

    seaweed.client().create_bucket(Bucket="locked-transfers", ObjectLockEnabledForBucket=True)
    for bucket, problem in (("locked-transfers", "has Object Lock"), ("no-such-transfers", "no such bucket")):
        config = parse_receiver_config({"receiver": receiver_section,
                                        "store": {**base, "transfers": "s3", "transfers_bucket": bucket}}, "r.toml")
        with pytest.raises(StoreConfigError, match=problem):
            Receiver(config)


def test_through_mqtt_a_receiver_killed_mid_file_is_continued_by_another_on_another_disk(
        seaweed: SeaweedFS, tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Two receiver processes with their own store_dir, sharing only the broker and the buckets. Receiver 1
    takes the manifest and half the chunks, acknowledges them and is killed -9; receiver 2 starts, answers the
    agent's query with the chunks receiver 1 stored, takes the rest and commits the file once, with a receipt."""
    key = enrolled_agent_key(tmp_path, SYNC_AGENT)
    store = seaweed.store_toml(tmp_path, LOCKED, TRANSFERS)
    procs = []
    for name in ("receiver-1", "receiver-2"):
        config = receiver_setup(tmp_path, mosquitto.port, tmp_path / name, tmp_path / "enrolled", name=name)
        config.write_text(config.read_text(encoding="utf-8") + store, encoding="utf-8")
        procs.append(receiver_proc(tmp_path, config, name))
    first, second = procs
    agent = None
    try:
        first.start()
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected", "receiver-1"), 20, what="receiver 1 up")
        agent = ScriptedAgent(mosquitto.port, key)
        content = os.urandom(40 * CHUNK + 11)
        doc = agent.manifest(content, CHUNK)
        total = chunk_count(len(content), CHUNK)
        agent.send_manifest(doc)
        agent.send_chunks(doc, content, list(range(total // 2)))
        held = agent.ack(doc["file_id"], "receiving")
        while held["have"] != [[0, total // 2 - 1]]:
            held = agent.ack(doc["file_id"], "receiving")
        first.kill9()

        second.start()
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected", "receiver-2"), 20, what="receiver 2 up")
        agent.query(doc["file_id"])
        ack = agent.ack(doc["file_id"])
        assert ack["state"] == "receiving" and ack["have"] == [[0, total // 2 - 1]]   # nothing lost
        agent.send_chunks(doc, content, list(range(total // 2, total)))
        ack = agent.ack(doc["file_id"], "complete")
        assert ack["sha256"] == doc["sha256"] and ack["receipt"] is not None
        assert receiver_logged(tmp_path, "from=transfers", "receiver-2")
        assert seaweed.client().get_object(Bucket=LOCKED, Key=f"objects/{doc['sha256']}")["Body"].read() == content
        for k in (f"objects/{doc['sha256']}", f"index/{SYNC_AGENT}/{doc['file_id']}.json"):
            assert versions(seaweed, k) == [k], f"{k} written more than once"
        assert keys(seaweed, TRANSFERS, f"transfers/{SYNC_AGENT}/{doc['file_id']}/") == []
        assert not (tmp_path / "receiver-1" / "incoming" / SYNC_AGENT).exists()
        assert second.alive
    finally:
        stop_all(agent, procs)


def test_through_mqtt_two_receivers_sharing_one_file_and_one_killed_mid_file_store_it_once(
        seaweed: SeaweedFS, tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Two receivers behind one shared subscription, each with its own store_dir: the chunks of one file are
    split between them. Receiver 1 is killed -9 mid-file; the agent (as a real one does) sends again what an ack
    does not name, until receiver 2 commits the file, once."""
    key = enrolled_agent_key(tmp_path, SYNC_AGENT)
    store = seaweed.store_toml(tmp_path, LOCKED, TRANSFERS)
    procs = []
    for name in ("receiver-1", "receiver-2"):
        config = receiver_setup(tmp_path, mosquitto.port, tmp_path / name, tmp_path / "enrolled", name=name,
                                shared_subscription=True)
        config.write_text(config.read_text(encoding="utf-8") + store, encoding="utf-8")
        procs.append(receiver_proc(tmp_path, config, name).start())
    agent = None
    try:
        for name in ("receiver-1", "receiver-2"):
            wait_for(lambda name=name: receiver_logged(tmp_path, "mqtt connected", name), 20, what=f"{name} up")
        agent = ScriptedAgent(mosquitto.port, key)
        content = os.urandom(40 * CHUNK + 11)
        doc = agent.manifest(content, CHUNK)
        total = chunk_count(len(content), CHUNK)
        half = total // 2
        agent.send_manifest(doc)
        agent.send_chunks(doc, content, list(range(half)))
        for _ in range(20):   # a chunk that reached receiver 2 before the manifest was in the bucket is asked again
            missing = set(range(half)) - held_seqs(agent.current_ack(doc["file_id"]))
            if not missing:
                break
            agent.send_chunks(doc, content, sorted(missing))
        assert not missing
        procs[0].kill9()

        agent.send_chunks(doc, content, list(range(half, total)))
        ack = agent.resend_until_complete(doc, content, acked=half, rounds=20)   # what went to the dead one
        assert (ack["state"], ack["sha256"]) == ("complete", doc["sha256"])
        assert seaweed.client().get_object(Bucket=LOCKED, Key=f"objects/{doc['sha256']}")["Body"].read() == content
        for k in (f"objects/{doc['sha256']}", f"index/{SYNC_AGENT}/{doc['file_id']}.json"):
            assert versions(seaweed, k) == [k], f"{k} written more than once"
        assert procs[1].alive
    finally:
        stop_all(agent, procs)
