"""The receiver's committed files in S3 with Object Lock, against a real SeaweedFS started here."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from edge_agent.clock import now_ms
from edge_agent.config import ConfigError, parse_receiver_config
from edge_agent.platform.receiver import Receiver, objectstore
from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings, StoreConfigError
from edge_agent.platform.receiver.receipts import Receipts, ReceiverKey
from edge_agent.platform.receiver.store import ChunkStore
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_RECEIVING, chunk_count, chunk_span
from tests.helpers import wait_for
from tests.peers.mosquitto import Mosquitto
from tests.seaweedfs import SeaweedFS
from tests.sync_support import AGENT_ID as SYNC_AGENT
from tests.sync_support import ScriptedAgent, enrolled_agent_key, receiver_logged, receiver_proc, receiver_setup

AGENT = "ws-s3-01"
CHUNK = 64 * 1024
BUCKET = "evidence-locked"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    server.client().create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    yield server
    server.stop()


def settings(server: SeaweedFS, directory: Path, **overrides) -> S3Settings:
    return S3Settings(endpoint=server.endpoint, bucket=BUCKET, credentials_file=server.credentials_file(directory),
                      connect_timeout_s=1, read_timeout_s=5, **overrides)


def receiver(server: SeaweedFS, root: Path, **overrides) -> ChunkStore:
    """A receiver's store on its own disk (`root`, for the transfers in progress) committing into the bucket."""
    root.mkdir(parents=True, exist_ok=True)
    return ChunkStore(root, sole_writer=False, committed=S3Committed(settings(server, root, **overrides)))


def transfer(store: ChunkStore, file_id: str, content: bytes, retention: str = "routine") -> dict:
    """A manifest accepted and every chunk written: the next progress commits."""
    doc = {"size": len(content), "chunk_size": CHUNK, "sha256": hashlib.sha256(content).hexdigest(),
           "retention": retention}
    assert store.accept_manifest(AGENT, file_id, json.dumps(doc, sort_keys=True).encode(), doc).state == ACK_RECEIVING
    for seq in range(chunk_count(len(content), CHUNK)):
        offset, length = chunk_span(seq, len(content), CHUNK)
        data = content[offset:offset + length]
        assert store.put_chunk(AGENT, file_id, seq, offset, data, hashlib.sha256(data).hexdigest())
    return doc


def file_id(n: int) -> str:
    return f"01JD5Q7M6X2V9TNEXRVZ3K{n:04d}"


def test_a_committed_file_is_locked_in_compliance_mode_with_its_checksum(seaweed: SeaweedFS, tmp_path: Path) -> None:
    store = receiver(seaweed, tmp_path / "r1", routine_days=30)
    content = os.urandom(3 * CHUNK + 17)
    doc = transfer(store, file_id(1), content)
    before = datetime.now(UTC)
    ack = store.progress(AGENT, file_id(1), doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
    assert not store.incoming(AGENT, file_id(1)).exists()

    s3 = seaweed.client()
    head = s3.head_object(Bucket=BUCKET, Key=f"objects/{doc['sha256']}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(content).digest()).decode()
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert before + timedelta(days=30) - timedelta(minutes=1) <= until <= datetime.now(UTC) + timedelta(days=30)
    assert s3.get_object(Bucket=BUCKET, Key=f"objects/{doc['sha256']}")["Body"].read() == content
    index = json.loads(s3.get_object(Bucket=BUCKET, Key=f"index/{AGENT}/{file_id(1)}.json")["Body"].read())
    assert (index["sha256"], index["size"]) == (doc["sha256"], len(content))
    manifest_key = f"manifests/{AGENT}/{file_id(1)}.{doc['sha256']}.json"
    assert s3.head_object(Bucket=BUCKET, Key=manifest_key)["ObjectLockMode"] == "COMPLIANCE"

    # The receipt is signed over the manifest stored in the bucket.
    receipts = Receipts(ReceiverKey.load_or_create(tmp_path / "keys"), store)
    assert receipts.attach(AGENT, ack).receipt is not None


def test_a_large_file_is_streamed_in_parts_each_with_its_checksum(seaweed: SeaweedFS, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)   # S3's smallest part, to keep the test small
    store = receiver(seaweed, tmp_path / "r1")
    content = os.urandom(11 * 1024**2 + 5)
    doc = transfer(store, file_id(2), content, retention="long_term")
    assert store.progress(AGENT, file_id(2), doc).state == ACK_COMPLETE
    s3 = seaweed.client()
    head = s3.head_object(Bucket=BUCKET, Key=f"objects/{doc['sha256']}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-3")   # three parts, each checked by the server
    assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=365 * 10 - 1)
    assert s3.get_object(Bucket=BUCKET, Key=f"objects/{doc['sha256']}")["Body"].read() == content


def test_a_locked_evidence_object_cannot_be_deleted_overwritten_or_released(seaweed: SeaweedFS,
                                                                             tmp_path: Path) -> None:
    store = receiver(seaweed, tmp_path / "r1")
    content = os.urandom(CHUNK + 1)
    doc = transfer(store, file_id(3), content, retention="evidence")
    assert store.progress(AGENT, file_id(3), doc).state == ACK_COMPLETE
    s3, key = seaweed.client(), f"objects/{doc['sha256']}"
    version = s3.head_object(Bucket=BUCKET, Key=key)["VersionId"]
    assert s3.get_object_legal_hold(Bucket=BUCKET, Key=key)["LegalHold"]["Status"] == "ON"

    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=BUCKET, Key=key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as refused:
        s3.put_object_retention(Bucket=BUCKET, Key=key, VersionId=version, Retention={
            "Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(days=1)})
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # A conditional overwrite is refused; an unconditional PUT only adds a newer version beside the locked one.
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"forged", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"forged")
    assert s3.get_object(Bucket=BUCKET, Key=key, VersionId=version)["Body"].read() == content
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=BUCKET, Key=key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_a_legal_hold_keeps_evidence_past_its_retain_until_date(seaweed: SeaweedFS, tmp_path: Path) -> None:
    store = receiver(seaweed, tmp_path / "r1", routine_days=6 / 86400)   # locked for six seconds
    docs = {retention: transfer(store, file_id(n), os.urandom(CHUNK + n), retention)
            for n, retention in ((7, "routine"), (8, "evidence"))}
    for n, (retention, doc) in zip((7, 8), docs.items(), strict=True):
        assert store.progress(AGENT, file_id(n), doc).state == ACK_COMPLETE, retention
    s3 = seaweed.client()
    versions = {r: s3.head_object(Bucket=BUCKET, Key=f"objects/{d['sha256']}") for r, d in docs.items()}
    # Waiting for a date to pass has no event to await: sleep until the later retain-until date is behind us.
    until = max(head["ObjectLockRetainUntilDate"] for head in versions.values())
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 0.5)
    s3.delete_object(Bucket=BUCKET, Key=f"objects/{docs['routine']['sha256']}",
                     VersionId=versions["routine"]["VersionId"])   # its date has passed: it may go
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=BUCKET, Key=f"objects/{docs['evidence']['sha256']}",
                         VersionId=versions["evidence"]["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


@pytest.mark.parametrize(("n", "size"), [(4, 2 * CHUNK), (9, 11 * 1024**2)], ids=["one put", "multipart"])
def test_two_receivers_racing_on_one_file_store_it_once(seaweed: SeaweedFS, tmp_path: Path, n: int, size: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two receivers on separate disks each hold every chunk of the same file and commit at the same instant:
    each answers `complete` (with the one index entry that won) or, while the other holds the multipart upload's
    claim, `receiving`, and completes on its next attempt; no key ever has a second version."""
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)
    content = os.urandom(size)
    stores = [receiver(seaweed, tmp_path / name) for name in ("r1", "r2")]
    docs = [transfer(store, file_id(n), content) for store in stores]
    barrier, acks = threading.Barrier(2), [None, None]

    def commit(i: int) -> None:
        barrier.wait()
        acks[i] = stores[i].progress(AGENT, file_id(n), docs[i])

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert ACK_COMPLETE in [a.state for a in acks]
    for i, ack in enumerate(acks):
        if ack.state != ACK_COMPLETE:   # the other receiver held the upload claim: the agent asks again
            assert ack.state == ACK_RECEIVING and size > objectstore.PART_BYTES
            acks[i] = stores[i].progress(AGENT, file_id(n), docs[i])
    assert [(a.state, a.sha256) for a in acks] == [(ACK_COMPLETE, docs[0]["sha256"])] * 2
    s3 = seaweed.client()
    for key in (f"index/{AGENT}/{file_id(n)}.json", f"objects/{docs[0]['sha256']}",
                f"manifests/{AGENT}/{file_id(n)}.{docs[0]['sha256']}.json"):
        versions = s3.list_object_versions(Bucket=BUCKET, Prefix=key).get("Versions", [])
        assert [v["Key"] for v in versions] == [key], f"{key} written more than once"
    assert stores[0].stored(AGENT, file_id(n)) == stores[1].stored(AGENT, file_id(n))


def test_a_live_upload_claim_defers_the_commit_and_an_abandoned_one_is_taken_over(
        seaweed: SeaweedFS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another receiver's live claim on the bytes: `receiving`, nothing uploaded. Once its claim has expired
    (the holder was killed mid-upload), the next receiver claims the next generation and stores the file."""
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)
    content = os.urandom(11 * 1024**2)
    sha256 = hashlib.sha256(content).hexdigest()
    s3 = seaweed.client()
    claim = {"key": f"objects/{sha256}", "holder": "dead-receiver:1:0", "expires_ms": now_ms() + 3_600_000}
    s3.put_object(Bucket=BUCKET, Key=f"claims/objects/{sha256}/0", Body=json.dumps(claim).encode())
    store = receiver(seaweed, tmp_path / "r1")
    doc = transfer(store, file_id(12), content)
    ack = store.progress(AGENT, file_id(12), doc)
    assert ack.state == ACK_RECEIVING
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"objects/{sha256}")
    assert store.incoming(AGENT, file_id(12)).exists()

    monkeypatch.setattr(objectstore, "now_ms", lambda: claim["expires_ms"] + 1)   # an hour later: it expired
    ack = store.progress(AGENT, file_id(12), doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, sha256)
    taken = json.loads(s3.get_object(Bucket=BUCKET, Key=f"claims/objects/{sha256}/1")["Body"].read())
    assert taken["holder"] == store.committed.holder
    assert s3.get_object(Bucket=BUCKET, Key=f"objects/{sha256}")["Body"].read() == content


def test_while_the_store_is_down_the_file_stays_receiving_and_completes_when_it_returns(tmp_path: Path) -> None:
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    try:
        server.client().create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
        store = receiver(server, tmp_path / "r1")
        content = os.urandom(2 * CHUNK + 3)
        doc = transfer(store, file_id(5), content)
        server.stop()
        ack = store.progress(AGENT, file_id(5), doc)
        assert ack.state == ACK_RECEIVING and ack.state != ACK_COMPLETE
        assert store.settled(AGENT, file_id(5)) is None
        assert store.incoming(AGENT, file_id(5)).exists()   # every chunk kept for the next attempt
        server.start()
        ack = store.progress(AGENT, file_id(5), doc)
        assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
        body = server.client().get_object(Bucket=BUCKET, Key=f"objects/{doc['sha256']}")["Body"].read()
        assert body == content
    finally:
        server.stop()


def test_a_credentials_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text("access_key_id = a\nsecret_access_key = b\n", encoding="utf-8")
    os.chmod(path, 0o644)
    with pytest.raises(StoreConfigError, match="chmod 600"):
        S3Committed(S3Settings(endpoint="http://127.0.0.1:1", bucket=BUCKET, credentials_file=path))
    os.chmod(path, 0o600)
    path.write_text("access_key_id = a\n", encoding="utf-8")
    with pytest.raises(StoreConfigError, match="secret_access_key"):
        S3Committed(S3Settings(endpoint="http://127.0.0.1:1", bucket=BUCKET, credentials_file=path))


def test_store_config_names_what_is_missing_or_invalid() -> None:
    with pytest.raises(ConfigError) as error:
        parse_receiver_config({"store": {"backend": "s3"}}, "receiver.toml")
    assert "endpoint, bucket, credentials_file" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_receiver_config({"store": {"backend": "s3", "endpoint": "s3.example.org", "bucket": "evidence",
                                         "credentials_file": "/etc/edge-receiver/s3"}}, "receiver.toml")
    assert "is not a URL" in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_receiver_config({"store": {"backend": "s3", "endpoint": "https://s3.example.org", "bucket": "Ev",
                                         "credentials_file": "/etc/edge-receiver/s3"}}, "receiver.toml")
    assert "not an S3 bucket name" in str(error.value)
    assert parse_receiver_config({}, "receiver.toml").store.backend == "local"   # the default stays local


def test_a_receiver_configured_for_s3_commits_into_the_bucket(seaweed: SeaweedFS, tmp_path: Path) -> None:
    config = parse_receiver_config({
        "receiver": {"store_dir": str(tmp_path / "store"), "keys_dir": str(tmp_path / "agents")},
        "store": {"backend": "s3", "endpoint": seaweed.endpoint, "bucket": BUCKET, "routine_days": 7,
                  "credentials_file": str(seaweed.credentials_file(tmp_path))}}, "receiver.toml")
    (tmp_path / "agents").mkdir()
    store = Receiver(config).store
    doc = transfer(store, file_id(6), os.urandom(CHUNK))
    assert store.progress(AGENT, file_id(6), doc).state == ACK_COMPLETE
    head = seaweed.client().head_object(Bucket=BUCKET, Key=f"objects/{doc['sha256']}")
    assert head["ObjectLockRetainUntilDate"] < datetime.now(UTC) + timedelta(days=7, minutes=1)
    assert not (tmp_path / "store" / "index" / AGENT).exists()   # the index is the bucket's


def test_through_mqtt_a_store_outage_is_answered_receiving_until_the_store_returns(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A receiver process with [store] backend = "s3": with SeaweedFS killed, a fully sent file is answered
    `receiving` with every chunk held and never `complete`; once SeaweedFS is back, the agent's query completes it
    with a receipt signed over the manifest in the bucket."""
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    proc = None
    try:
        server.client().create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
        key = enrolled_agent_key(tmp_path, SYNC_AGENT)
        config = receiver_setup(tmp_path, mosquitto.port, tmp_path / "store", tmp_path / "enrolled")
        config.write_text(config.read_text(encoding="utf-8") + server.store_toml(tmp_path, BUCKET), encoding="utf-8")
        proc = receiver_proc(tmp_path, config).start()
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
        server.stop()

        agent = ScriptedAgent(mosquitto.port, key)
        content = os.urandom(4 * 65536)
        doc = agent.send_file(content)
        held = agent.ack(doc["file_id"], "receiving")
        while held["have"] != [[0, 3]]:
            held = agent.ack(doc["file_id"], "receiving")
        wait_for(lambda: receiver_logged(tmp_path, "commit deferred"), 20, what="the commit deferred")
        agent.query(doc["file_id"])
        assert agent.ack(doc["file_id"])["state"] == "receiving"   # the next answer: still not complete

        server.start()
        agent.query(doc["file_id"])
        ack = agent.ack(doc["file_id"], "complete")
        assert ack["sha256"] == hashlib.sha256(content).hexdigest() and ack["receipt"] is not None
        body = server.client().get_object(Bucket=BUCKET, Key=f"objects/{ack['sha256']}")["Body"].read()
        assert body == content
        agent.close()
        assert proc.alive, "the receiver died"
    finally:
        if proc is not None:
            proc.stop()
        server.stop()


def test_a_receiver_refuses_to_start_on_a_bucket_without_object_lock(seaweed: SeaweedFS, tmp_path: Path) -> None:
    seaweed.client().create_bucket(Bucket="unlocked-bucket")
    for bucket in ("unlocked-bucket", "no-such-bucket"):
        config = parse_receiver_config({
            "receiver": {"store_dir": str(tmp_path / "store"), "keys_dir": str(tmp_path / "agents")},
            "store": {"backend": "s3", "endpoint": seaweed.endpoint, "bucket": bucket,
                      "credentials_file": str(seaweed.credentials_file(tmp_path))}}, "receiver.toml")
        with pytest.raises(StoreConfigError, match="object-lock-enabled-for-bucket"):
            Receiver(config)
