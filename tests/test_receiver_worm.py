"""The platform's custody record in the WORM bucket (worm.py): chain documents and receipts as locked objects,
legal holds released only by a signed platform request, and `receiver fsck` of a bucket. Real SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from edge_agent.catalog import Catalog
from edge_agent.clock import now_ms
from edge_agent.evidence.manifest import GENESIS_PREV, AgentKey, canonical_json, verify_signature
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from edge_agent.ops.retention import place_hold, release_hold
from edge_agent.platform.receiver import objectstore
from edge_agent.platform.receiver.chain import STATE_HELD, STATE_REFUSED, ChainKeeper, ChainStore
from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings
from edge_agent.platform.receiver.receipts import Receipts, ReceiverKey
from edge_agent.platform.receiver.store import ChunkStore
from edge_agent.platform.receiver.worm import BucketRecords, CaseReleased, HoldRelease, ReleaseRefused, check_bucket
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_RECEIVING, chunk_count, chunk_span
from tests.helpers import agent_config
from tests.seaweedfs import SeaweedFS
from tests.sync_support import CLI

AGENT = "ws-worm-01"
CASE_AGENT = "ws-worm-02"
CHUNK = 64 * 1024
BUCKET = "custody-locked"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    server.client().create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    yield server
    server.stop()


def committed(server: SeaweedFS, directory: Path, bucket: str = BUCKET, **overrides: Any) -> S3Committed:
    directory.mkdir(parents=True, exist_ok=True)
    return S3Committed(S3Settings(endpoint=server.endpoint, bucket=bucket, connect_timeout_s=1, read_timeout_s=5,
                                  credentials_file=server.credentials_file(directory), **overrides))


def file_id(n: int) -> str:
    return f"01JD5Q7M6X2V9TNEXRVZ3W{n:04d}"


def store_file(store: ChunkStore, fid: str, content: bytes, retention: str, agent: str = AGENT) -> dict[str, Any]:
    """A file through a receiver's store into the bucket: manifest, every chunk, commit."""
    doc = {"size": len(content), "chunk_size": CHUNK, "sha256": hashlib.sha256(content).hexdigest(),
           "retention": retention}
    assert store.accept_manifest(agent, fid, json.dumps(doc, sort_keys=True).encode(), doc).state == ACK_RECEIVING
    for seq in range(chunk_count(len(content), CHUNK)):
        offset, length = chunk_span(seq, len(content), CHUNK)
        data = content[offset:offset + length]
        assert store.put_chunk(agent, fid, seq, offset, data, hashlib.sha256(data).hexdigest())
    assert store.progress(agent, fid, doc).state == ACK_COMPLETE
    return doc


def keeper(root: Path, records: BucketRecords | None, agent_key: AgentKey, receipt_key: AgentKey,
           events: list[dict[str, Any]]) -> ChainKeeper:
    return ChainKeeper(ChainStore(root, records), lambda _agent, _key_id, _seq: agent_key.public,
                       receipt_key.sign, events.append)


def chain_doc(key: AgentKey, prev: str, n: int, agent: str = AGENT, **extra: Any) -> dict[str, Any]:
    return key.sign({"v": 1, "type": "annotation", "agent_id": agent, "annotation_id": f"a{n}", "prev": prev,
                     **extra})


def offer(chain: ChainKeeper, seq: int, doc: dict[str, Any], agent: str = AGENT) -> dict[str, Any] | None:
    return chain.offer(agent, canonical_json({"seq": seq, "doc": doc}))


def sha(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(doc)).hexdigest()


# -- chain documents and receipts as objects -----------------------------------------------------------------


def test_chain_documents_and_chain_receipts_are_locked_objects_and_the_bucket_decides_a_fork_across_hosts(
        seaweed: SeaweedFS, tmp_path: Path) -> None:
    agent_key, receipt_key = AgentKey.load_or_create(tmp_path / "agent"), AgentKey.load_or_create(tmp_path / "rk")
    events: list[dict[str, Any]] = []
    host_a = keeper(tmp_path / "a", BucketRecords(committed(seaweed, tmp_path / "a")), agent_key, receipt_key, events)
    d1 = chain_doc(agent_key, GENESIS_PREV, 1)
    d2 = chain_doc(agent_key, sha(d1), 2)
    assert offer(host_a, 1, d1)["state"] == STATE_HELD
    answer = offer(host_a, 2, d2)
    assert (answer["state"], answer["seq"]) == (STATE_HELD, 2)

    s3 = seaweed.client()
    for seq, doc in ((1, d1), (2, d2)):
        key = f"chains/{AGENT}/docs/{seq:012d}.json"
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == canonical_json(doc)
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"] > datetime.now(UTC)
        with pytest.raises(ClientError) as refused:
            s3.delete_object(Bucket=BUCKET, Key=key, VersionId=head["VersionId"])
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    kept = json.loads(s3.get_object(Bucket=BUCKET, Key=f"chain-receipts/{AGENT}/{2:012d}.json")["Body"].read())
    assert kept == answer["receipt"]
    verify_signature(kept, receipt_key.public)
    assert (kept["seq"], kept["sha256"]) == (2, sha(d2))

    # A receiver on another host, with a chain store of its own and the same bucket: another document at seq 1
    # (signed by the agent: a restored or cloned agent) is a fork, though this host's own store holds nothing.
    host_b = keeper(tmp_path / "b", BucketRecords(committed(seaweed, tmp_path / "b")), agent_key, receipt_key, events)
    forged = chain_doc(agent_key, GENESIS_PREV, 99)
    refused_answer = offer(host_b, 1, forged)
    assert (refused_answer["state"], refused_answer["refusal"]) == (STATE_REFUSED, "fork")
    assert events and events[-1]["type"] == "chain_fork"
    assert host_b.store.head(AGENT) == (0, None), "nothing held on host b"
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"chains/{AGENT}/refused/")["KeyCount"] == 1
    # The genuine documents from the agent catch host b up: the same bytes the bucket holds.
    assert offer(host_b, 1, d1)["state"] == STATE_HELD
    assert offer(host_b, 2, d2)["seq"] == 2
    versions = s3.list_object_versions(Bucket=BUCKET, Prefix=f"chains/{AGENT}/docs/").get("Versions", [])
    assert len(versions) == 2, "no chain document written twice"


def test_a_complete_receipt_is_a_locked_object_and_an_evidence_one_is_on_legal_hold(seaweed: SeaweedFS,
                                                                                    tmp_path: Path) -> None:
    bucket = committed(seaweed, tmp_path / "r1")
    store = ChunkStore(tmp_path / "r1", committed=bucket)
    receipts = Receipts(ReceiverKey.load_or_create(tmp_path / "keys"), store, BucketRecords(bucket))
    s3 = seaweed.client()
    for n, retention in ((1, "routine"), (2, "evidence")):
        doc = store_file(store, file_id(n), os.urandom(CHUNK + n), retention)
        ack = receipts.attach(AGENT, store.settled(AGENT, file_id(n)))
        assert ack.receipt is not None
        key = f"receipts/{AGENT}/{file_id(n)}.json"
        assert json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == ack.receipt
        assert ack.receipt["sha256"] == doc["sha256"]
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head.get("ObjectLockLegalHoldStatus", "OFF") == ("ON" if retention == "evidence" else "OFF")
        receipts.attach(AGENT, store.settled(AGENT, file_id(n)))   # the same ack again: not written twice
        assert len(s3.list_object_versions(Bucket=BUCKET, Prefix=key).get("Versions", [])) == 1


# -- legal-hold release by a signed platform request -------------------------------------------------------------


def receiver_toml(server: SeaweedFS, tmp_path: Path, release_keys: Path | None, bucket: str = BUCKET) -> Path:
    path = tmp_path / "receiver.toml"
    keys = f'release_keys = "{release_keys}"\n' if release_keys is not None else ""
    path.write_text(f'[receiver]\nstore_dir = "{tmp_path / "store"}"\nkeys_dir = "{tmp_path / "agents"}"\n'
                    f'[store]\nbackend = "s3"\nendpoint = "{server.endpoint}"\nbucket = "{bucket}"\n'
                    f'credentials_file = "{server.credentials_file(tmp_path)}"\nroutine_days = 1\n{keys}',
                    encoding="utf-8")
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ, "LANG": "C"})


def release_request(key: AgentKey, fid: str, seq: int, **overrides: Any) -> dict[str, Any]:
    body = {"cmd": "release_hold", "id": f"rel-{seq}-{fid}", "ts": now_ms(), "seq": seq, "agent": AGENT,
            "file_id": fid, **overrides}
    return key.sign(body)


def test_a_legal_hold_goes_off_only_on_a_valid_signed_release_and_retention_still_holds(
        seaweed: SeaweedFS, tmp_path: Path) -> None:
    platform = AgentKey.load_or_create(tmp_path / "platform")
    (tmp_path / "platform.pem").write_text(platform.public_pem(), encoding="utf-8")
    config = receiver_toml(seaweed, tmp_path, tmp_path / "platform.pem")
    bucket = committed(seaweed, tmp_path / "r1", routine_days=1)
    store = ChunkStore(tmp_path / "r1", committed=bucket)
    records = BucketRecords(bucket)
    Receipts(ReceiverKey.load_or_create(tmp_path / "keys"), store, records).attach(
        AGENT, store_file(store, fid := file_id(10), os.urandom(CHUNK + 10), "evidence") and store.settled(AGENT, fid))
    entry = bucket.stored(AGENT, fid)
    keys = records.file_keys(AGENT, fid, entry)
    assert [records.legal_hold(k) for k in keys] == ["ON"] * 4

    def attempt(request: dict[str, Any] | str, name: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}.json"
        path.write_text(request if isinstance(request, str) else json.dumps(request), encoding="utf-8")
        return cli("receiver", "hold", "release", "--config", str(config), "--request", str(path))

    unsigned = {"cmd": "release_hold", "id": "x", "ts": now_ms(), "seq": 1, "agent": AGENT, "file_id": fid}
    other_key = AgentKey.load_or_create(tmp_path / "intruder")
    forged = {**release_request(platform, fid, 1), "file_id": fid}
    forged["seq"] = 2   # altered after signing
    stale = release_request(platform, fid, 1, ts=now_ms() - 10 * 60 * 1000)
    for name, request, reason in (("unsigned", unsigned, "not signed by a platform key"),
                                  ("intruder", release_request(other_key, fid, 1), "not signed by a platform key"),
                                  ("forged", forged, "bad signature"), ("stale", stale, "stale or replayed"),
                                  ("not-json", "{", "cannot read the request")):
        result = attempt(request, name)
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert reason in result.stderr, (name, result.stderr)
        assert [records.legal_hold(k) for k in keys] == ["ON"] * 4, f"{name}: the hold must stay on"

    valid = release_request(platform, fid, 1)
    result = attempt(valid, "valid")
    assert result.returncode == 0, result.stderr
    assert "legal hold released" in result.stdout
    assert [records.legal_hold(k) for k in keys] == ["OFF"] * 4
    release = seaweed.client().get_object(Bucket=BUCKET, Key=records.release_key(platform.key_id, 1))
    assert json.loads(release["Body"].read())["request"] == valid   # the signed request kept, locked

    for k in keys:   # the hold is off, the COMPLIANCE date (a day away) is not: still no deletion
        version = records.first_version(k)
        with pytest.raises(ClientError) as refused:
            seaweed.client().delete_object(Bucket=BUCKET, Key=k, VersionId=version)
        assert refused.value.response["Error"]["Code"] == "AccessDenied", k

    records.set_legal_hold(keys[0], "ON")   # held again (an investigator): the captured request replayed
    for name, request in (("replay", valid), ("lower-seq", release_request(platform, fid, 1, id="fresh-id"))):
        result = attempt(request, name)
        assert result.returncode == 1 and "replay" in result.stderr, (name, result.stderr)
    assert records.legal_hold(keys[0]) == "ON"


def test_hold_release_without_release_keys_says_which_key_to_set(seaweed: SeaweedFS, tmp_path: Path) -> None:
    config = receiver_toml(seaweed, tmp_path, None)
    (tmp_path / "r.json").write_text("{}", encoding="utf-8")
    result = cli("receiver", "hold", "release", "--config", str(config), "--request", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "store.release_keys" in result.stderr, result.stderr
    result = cli("receiver", "hold", "release", "--config", str(config), "--agent", AGENT)   # no --file, no request
    assert result.returncode == 2 and "--request" in result.stderr, result.stderr


# -- fsck of the bucket -----------------------------------------------------------------------------------------


def fsck_cli(config: Path) -> tuple[int, dict[str, Any]]:
    result = cli("--json", "receiver", "fsck", "--config", str(config))
    return result.returncode, json.loads(result.stdout or "{}")


def test_fsck_of_a_healthy_bucket_is_clean(seaweed: SeaweedFS, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "PART_BYTES", 5 * 1024**2)   # one multipart object among them
    seaweed.client().create_bucket(Bucket="fsck-healthy", ObjectLockEnabledForBucket=True)
    bucket = committed(seaweed, tmp_path / "r1", "fsck-healthy", routine_days=1)
    store = ChunkStore(tmp_path / "r1", committed=bucket)
    for n, retention, size in ((20, "routine", CHUNK), (21, "evidence", CHUNK + 1), (22, "evidence", CHUNK + 2),
                               (23, "long_term", 11 * 1024**2)):
        store_file(store, file_id(n), os.urandom(size), retention)
    platform = AgentKey.load_or_create(tmp_path / "platform")
    (tmp_path / "platform.pem").write_text(platform.public_pem(), encoding="utf-8")
    HoldRelease(BucketRecords(bucket), tmp_path / "platform.pem").release(release_request(platform, file_id(22), 1))
    report = check_bucket(bucket)
    assert (report.objects_checked, report.findings) == (4, [])
    code, result = fsck_cli(receiver_toml(seaweed, tmp_path, None, "fsck-healthy"))
    assert (code, result["clean"], result["objects_checked"]) == (0, True, 4)


def test_fsck_of_a_bucket_reports_a_missing_object_a_missing_manifest_an_overwrite_and_a_dropped_hold(
        seaweed: SeaweedFS, tmp_path: Path) -> None:
    s3 = seaweed.client()
    s3.create_bucket(Bucket="fsck-broken", ObjectLockEnabledForBucket=True)
    bucket = committed(seaweed, tmp_path / "r1", "fsck-broken", routine_days=1)
    store = ChunkStore(tmp_path / "r1", committed=bucket)
    good = store_file(store, file_id(30), os.urandom(CHUNK), "routine")
    overwritten = store_file(store, file_id(31), os.urandom(CHUNK + 1), "routine")
    unheld = store_file(store, file_id(32), os.urandom(CHUNK + 2), "evidence")
    # By hand, with the receiver's own credentials: an index entry whose object was never stored,
    missing = {"agent_id": AGENT, "file_id": file_id(33), "sha256": "ab" * 32, "size": 5, "stored_ms": now_ms(),
               "object": f"objects/{'ab' * 32}", "retention": "routine"}
    s3.put_object(Bucket="fsck-broken", Key=f"index/{AGENT}/{file_id(33)}.json", Body=json.dumps(missing).encode())
    # an object and its index without the signed manifest,
    content = os.urandom(100)
    digest = hashlib.sha256(content).hexdigest()
    lock = bucket.lock_args("routine", now_ms())
    s3.put_object(Bucket="fsck-broken", Key=f"objects/{digest}", Body=content, **lock)
    s3.put_object(Bucket="fsck-broken", Key=f"index/{AGENT}/{file_id(34)}.json", Body=json.dumps(
        {**missing, "file_id": file_id(34), "sha256": digest, "size": 100}).encode())
    # a newer version written over a locked object, and an evidence object's legal hold turned off.
    s3.put_object(Bucket="fsck-broken", Key=f"objects/{overwritten['sha256']}", Body=b"forged")
    BucketRecords(bucket).set_legal_hold(f"objects/{unheld['sha256']}", "OFF")

    code, result = fsck_cli(receiver_toml(seaweed, tmp_path, None, "fsck-broken"))
    assert code == 1 and not result["clean"]
    found = sorted((f["kind"], f["path"]) for f in result["findings"])
    assert found == [("bad_checksum", f"index/{AGENT}/{file_id(31)}.json"),
                     ("missing_manifest", f"index/{AGENT}/{file_id(34)}.json"),
                     ("missing_object", f"index/{AGENT}/{file_id(33)}.json"),
                     ("no_legal_hold", f"index/{AGENT}/{file_id(32)}.json"),
                     ("wrong_lock", f"index/{AGENT}/{file_id(31)}.json")]   # the forged version is not locked
    assert not any(file_id(30) in f["path"] for f in result["findings"]), good


# -- legal-hold release on the agent's own word: a case_released annotation in its chain ----------------------------


def test_releasing_a_case_on_the_agent_signs_case_released_into_its_chain_and_that_releases_the_bucket_hold(
        seaweed: SeaweedFS, tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    _, config = agent_config(tmp_path / "agent", agent={"id": CASE_AGENT})
    layout = StoreLayout(config.agent.data_dir).open()
    catalog = Catalog(config.catalog_path)
    bucket = committed(seaweed, tmp_path / "r1", routine_days=1)
    records = BucketRecords(bucket)
    store = ChunkStore(tmp_path / "r1", committed=bucket)
    fid = file_id(40)
    store_file(store, fid, os.urandom(CHUNK + 40), "evidence", CASE_AGENT)
    keys = records.file_keys(CASE_AGENT, fid, bucket.stored(CASE_AGENT, fid))[:3]   # no receipt sent here
    try:
        agent_key = AgentKey.load_or_create(layout.keys)
        sealer = Sealer(catalog, agent_key, layout, config)
        releaser = CaseReleased(records, lambda _agent, _key_id, chain_seq: agent_key.public)
        # The file is tagged into case C-9 by a signed annotation, then another case is released: no release.
        sealer.sign_document("annotation", "tag-40", {"annotation_id": "tag-40", "file_id": fid, "case_id": "C-9"},
                             layout.annotation_path("tag-40"))
        place_hold(catalog, case_id="C-8", reason="other case", actor="test")
        release_hold(catalog, case_id="C-8", reason="closed", actor="test", sealer=sealer)
        chain = keeper(tmp_path / "r1", records, agent_key, AgentKey.load_or_create(tmp_path / "rk"), [])

        def deliver() -> None:   # the agent's chain, as its sync sends it, into the receiver's (and the bucket)
            for row in catalog.documents.chain():
                doc = json.loads((config.agent.data_dir / row["path"]).read_bytes())
                assert offer(chain, row["seq"], doc, CASE_AGENT)["state"] == STATE_HELD

        deliver()
        with pytest.raises(ReleaseRefused, match="no case_released annotation for case C-9"):
            releaser.release(CASE_AGENT, fid)
        assert [records.legal_hold(k) for k in keys] == ["ON"] * 3

        place_hold(catalog, case_id="C-9", reason="investigation", actor="test")
        release_hold(catalog, case_id="C-9", reason="case closed by the court", actor="test", sealer=sealer)
        released = json.loads(layout.annotation_path(catalog.documents.chain()[-1]["doc_id"]).read_bytes())
        assert (released["case_id"], released["case_released"]) == ("C-9", True)
        deliver()
        result = releaser.release(CASE_AGENT, fid)
        assert result["chain_seq"] == 3 and result["case_id"] == "C-9"
        assert [records.legal_hold(k) for k in keys] == ["OFF"] * 3
        assert not [f for f in check_bucket(bucket).findings if CASE_AGENT in f.path], "a release fsck knows of"
    finally:
        catalog.close()


def test_a_case_released_document_forged_into_the_bucket_releases_nothing(seaweed: SeaweedFS, tmp_path: Path) -> None:
    agent = "ws-worm-03"
    bucket = committed(seaweed, tmp_path / "r1", routine_days=1)
    records = BucketRecords(bucket)
    store = ChunkStore(tmp_path / "r1", committed=bucket)
    agent_key, intruder = AgentKey.load_or_create(tmp_path / "agent"), AgentKey.load_or_create(tmp_path / "intruder")
    fid = file_id(41)
    store_file(store, fid, os.urandom(CHUNK + 41), "evidence", agent)
    keys = records.file_keys(agent, fid, bucket.stored(agent, fid))[:3]   # no receipt sent here
    tag = chain_doc(agent_key, GENESIS_PREV, 1, agent, file_id=fid, case_id="C-1")
    chain = keeper(tmp_path / "r1", records, agent_key, AgentKey.load_or_create(tmp_path / "rk"), [])
    assert offer(chain, 1, tag, agent)["state"] == STATE_HELD
    # Written by hand with the receiver's S3 credentials, signed by another key: counts for nothing.
    forged = chain_doc(intruder, sha(tag), 2, agent, case_id="C-1", case_released=True)
    seaweed.client().put_object(Bucket=BUCKET, Key=records.chain_doc_key(agent, 2), Body=canonical_json(forged))
    releaser = CaseReleased(records, lambda _agent, _key_id, chain_seq: agent_key.public)
    with pytest.raises(ReleaseRefused, match="does not verify at seq 2"):
        releaser.release(agent, fid)
    assert [records.legal_hold(k) for k in keys] == ["ON"] * 3
