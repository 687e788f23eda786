"""The receiver's store on a real file system: chunk records, the running whole-file hash and its fallbacks,
a commit cut short, limits, expiry and fsck."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from edge_agent import durable
from edge_agent.platform.receiver import check_store
from edge_agent.platform.receiver.fair import FairQueue
from edge_agent.platform.receiver.store import ChunkStore, Limits
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_RECEIVING, ACK_REJECTED, chunk_count, chunk_span
from tests.helpers import resident_pages

AGENT = "ws-store-01"
FILE_ID = "01JD5Q7M6X2V9TNEXRVZ3KXW4A"
CHUNK = 4096


def manifest(content: bytes, sha256: str | None = None) -> tuple[bytes, dict]:
    doc = {"size": len(content), "chunk_size": CHUNK, "sha256": sha256 or hashlib.sha256(content).hexdigest()}
    return json.dumps(doc, sort_keys=True).encode(), doc


def started(root: Path, size: int, *, sole_writer: bool = True, sha256: str | None = None
            ) -> tuple[ChunkStore, bytes, dict]:
    """A store with a transfer of `size` random bytes begun (its manifest accepted)."""
    store = ChunkStore(root, sole_writer=sole_writer)
    content = os.urandom(size)
    canonical, doc = manifest(content, sha256)
    assert store.accept_manifest(AGENT, FILE_ID, canonical, doc).state == ACK_RECEIVING
    return store, content, doc


def put(store: ChunkStore, content: bytes, seq: int, check: str = "sha256") -> None:
    """Chunk `seq` with the check an agent put in its header: crc32 (this version) or sha256 (older agents)."""
    offset, length = chunk_span(seq, len(content), CHUNK)
    data = content[offset:offset + length]
    value = f"{zlib.crc32(data):08x}" if check == "crc32" else hashlib.sha256(data).hexdigest()
    assert store.put_chunk(AGENT, FILE_ID, seq, offset, data, value)


def assert_completes(store: ChunkStore, content: bytes, doc: dict) -> None:
    """Every chunk is in: the commit says `complete` and stores exactly `content`."""
    ack = store.progress(AGENT, FILE_ID, doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
    assert store.object_path(doc["sha256"]).read_bytes() == content
    assert not store.incoming(AGENT, FILE_ID).exists()


@pytest.mark.parametrize("check", ["crc32", "sha256"])
@pytest.mark.parametrize("sole_writer", [True, False])
@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_every_order_stores_the_exact_file(tmp_path: Path, sole_writer: bool, order: str, check: str) -> None:
    store, content, doc = started(tmp_path, CHUNK * 9 + 123, sole_writer=sole_writer)
    seqs = list(range(chunk_count(len(content), CHUNK)))
    if order == "reversed":
        seqs.reverse()
    elif order == "shuffled":
        seqs = seqs[3:] + seqs[:3]
    for seq in seqs:
        put(store, content, seq, check)
        put(store, content, seq, check)   # a duplicate changes nothing
    assert store.have(AGENT, FILE_ID) == sorted(seqs)
    assert_completes(store, content, doc)


def test_whole_file_mismatch_is_rejected_with_the_running_hash(tmp_path: Path) -> None:
    store, content, doc = started(tmp_path, CHUNK * 4, sha256=hashlib.sha256(b"another file").hexdigest())
    for seq in range(4):
        put(store, content, seq)
    ack = store.progress(AGENT, FILE_ID, doc)
    assert ack.state == ACK_REJECTED and "SHA-256" in ack.reason
    assert not store.object_path(doc["sha256"]).exists()


@pytest.mark.parametrize("check", ["crc32", "sha256"])
def test_a_chunk_whose_bytes_did_not_reach_the_disk_is_asked_for_again(tmp_path: Path, check: str) -> None:
    """Chunks that came out of order are read back at commit and checked against their records."""
    store, content, doc = started(tmp_path, CHUNK * 6)
    for seq in (0, 1, 3, 4, 5, 2):
        put(store, content, seq, check)
    with open(store.incoming(AGENT, FILE_ID) / "data", "r+b") as data:   # as after a power cut before the sync
        data.seek(4 * CHUNK)
        data.write(bytes(CHUNK))
    ack = store.progress(AGENT, FILE_ID, doc)
    assert (ack.state, ack.have) == (ACK_RECEIVING, [[0, 3], [5, 5]])
    assert store.have(AGENT, FILE_ID) == [0, 1, 2, 3, 5]
    put(store, content, 4)
    assert_completes(store, content, doc)


def test_another_receiver_continues_the_transfer_from_the_records(tmp_path: Path) -> None:
    first, content, doc = started(tmp_path, CHUNK * 5)
    for seq in range(3):
        put(first, content, seq)
    second = ChunkStore(tmp_path, sole_writer=True)   # a restarted receiver: nothing in memory
    assert second.have(AGENT, FILE_ID) == [0, 1, 2]
    put(second, content, 3)
    assert first.have(AGENT, FILE_ID) == [0, 1, 2, 3]   # records appended by another process are seen
    put(second, content, 4)
    assert_completes(second, content, doc)


def test_records_of_both_checks_in_one_transfer_are_read_back_after_a_restart(tmp_path: Path) -> None:
    """A transfer begun with SHA-256 headers (an older agent, or before the receiver's first ack) and finished
    with CRC-32 ones, resumed by a restarted receiver: every record is read back against its own kind, a chunk
    of either kind whose bytes did not reach the disk is asked for again, the file is stored exactly."""
    first, content, doc = started(tmp_path, CHUNK * 6)
    for seq in (0, 2, 4):
        put(first, content, seq, "sha256")
    second = ChunkStore(tmp_path, sole_writer=True)   # nothing in memory: the commit reads every chunk back
    for seq in (1, 3, 5):
        put(second, content, seq, "crc32")
    lines = (second.incoming(AGENT, FILE_ID) / "chunks").read_bytes().splitlines()
    assert sorted(len(line.split()[1]) for line in lines) == [8, 8, 8, 64, 64, 64]
    with open(second.incoming(AGENT, FILE_ID) / "data", "r+b") as data:   # as after a power cut before the sync
        for seq in (2, 3):
            data.seek(seq * CHUNK)
            data.write(bytes(CHUNK))
    ack = second.progress(AGENT, FILE_ID, doc)
    assert (ack.state, ack.have) == (ACK_RECEIVING, [[0, 1], [4, 5]])
    put(second, content, 2, "crc32")
    put(second, content, 3, "crc32")
    assert_completes(second, content, doc)


def test_a_forged_crc32_does_not_get_altered_bytes_stored(tmp_path: Path) -> None:
    """CRC-32 is a transport check: whoever alters a chunk can write its matching CRC (as a matching SHA-256:
    the header is not signed). Chunks that each match their CRC but not the sealed file are rejected at the
    whole file's SHA-256 against the manifest, in order (the running hash) and read back after a restart."""
    for sole_writer in (True, False):
        store, content, doc = started(tmp_path / str(sole_writer), CHUNK * 4, sole_writer=sole_writer)
        altered = content[:CHUNK + 7] + bytes([content[CHUNK + 7] ^ 1]) + content[CHUNK + 8:]
        for seq in (0, 1, 3, 2):
            put(store, altered, seq, "crc32")   # each chunk with the CRC of its altered bytes
        ack = ChunkStore(tmp_path / str(sole_writer), sole_writer=sole_writer).progress(AGENT, FILE_ID, doc)
        assert ack.state == ACK_REJECTED and "SHA-256" in ack.reason
        assert not store.object_path(doc["sha256"]).exists() and store.stored(AGENT, FILE_ID) is None


def test_a_record_cut_short_by_a_crash_is_not_a_chunk_held(tmp_path: Path) -> None:
    store, content, _doc = started(tmp_path, CHUNK * 3)
    put(store, content, 0)
    with open(store.incoming(AGENT, FILE_ID) / "chunks", "ab") as log:
        log.write(b"00000001 " + hashlib.sha256(b"x").hexdigest()[:20].encode())
    assert ChunkStore(tmp_path).have(AGENT, FILE_ID) == [0]
    with open(store.incoming(AGENT, FILE_ID) / "chunks", "ab") as log:   # a CRC-32 record cut short
        log.write(b"\n00000002 0a1b2c")
    assert ChunkStore(tmp_path).have(AGENT, FILE_ID) == [0]


# -- a commit cut short, limits, expiry, fsck -----------------------------------------------------------


def all_chunks(store: ChunkStore, content: bytes) -> None:
    for seq in range(chunk_count(len(content), CHUNK)):
        put(store, content, seq)


def test_a_commit_cut_short_after_its_bytes_were_moved_is_finished_by_the_next_receiver(tmp_path: Path) -> None:
    """What an older receiver killed inside its commit left: every chunk recorded and the manifest in incoming/,
    the bytes already in objects/, no index. Today's store raised FileNotFoundError on every later call."""
    store, content, doc = started(tmp_path, CHUNK * 3 + 5)
    all_chunks(store, content)
    target = store.object_path(doc["sha256"])
    target.parent.mkdir(parents=True)
    os.replace(store.incoming(AGENT, FILE_ID) / "data", target)
    store.close()
    again = ChunkStore(tmp_path, sole_writer=True)
    assert_completes(again, content, doc)
    assert check_store(tmp_path).findings == []


def test_a_commit_whose_bytes_were_lost_starts_the_transfer_over(tmp_path: Path) -> None:
    store, content, doc = started(tmp_path, CHUNK * 3)
    all_chunks(store, content)
    os.unlink(store.incoming(AGENT, FILE_ID) / "data")   # moved, then lost with a disk that never synced it
    ack = store.progress(AGENT, FILE_ID, doc)
    assert (ack.state, ack.have) == (ACK_RECEIVING, [])
    all_chunks(store, content)
    assert_completes(store, content, doc)


def test_fan_out_directories_are_made_durable_in_their_parent(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda path: (synced.append(Path(path)), real(path)))
    store, content, doc = started(tmp_path, CHUNK * 2)
    all_chunks(store, content)
    assert_completes(store, content, doc)
    for parent in ("objects", "index", "incoming", "locks"):
        assert tmp_path / parent in synced, f"a new directory in {parent}/ was not synced in it"


def test_a_new_transfer_beyond_the_limits_is_busy_and_nothing_is_deleted(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, sole_writer=True, limits=Limits(max_open_transfers=2,
                                                                  max_reserved_bytes=10 * CHUNK, min_free_bytes=0))
    docs = []
    for n in range(3):
        content = os.urandom(CHUNK * 2 + n)
        canonical, doc = manifest(content)
        docs.append((f"01JD5Q7M6X2V9TNEXRVZ3KXW4{n}", canonical, doc))
    acks = [store.accept_manifest(AGENT, fid, canonical, doc) for fid, canonical, doc in docs]
    assert [(a.state, a.reason) for a in acks] == [(ACK_RECEIVING, None)] * 2 + [(ACK_RECEIVING, "busy")]
    assert not store.incoming(AGENT, docs[2][0]).exists()
    again = store.accept_manifest(AGENT, docs[0][0], docs[0][1], docs[0][2])   # an open transfer still rejoins
    assert (again.state, again.reason) == (ACK_RECEIVING, None)
    assert store.accept_manifest("another-agent", *docs[2]).reason is None     # the caps are per agent
    big = manifest(os.urandom(11 * CHUNK))
    assert ChunkStore(tmp_path, limits=Limits(max_reserved_bytes=10 * CHUNK, min_free_bytes=0)).accept_manifest(
        "third-agent", FILE_ID, *big).reason == "busy"
    # A reserve far above what the disk has free (other processes may free space meanwhile).
    full = ChunkStore(tmp_path, limits=Limits(min_free_bytes=store.free_bytes() + 2**50))
    assert full.accept_manifest("fourth-agent", FILE_ID, *manifest(b"x")).reason == "busy"
    assert store.open_transfers(AGENT)[0] == 2


def test_abandoned_transfers_and_old_locks_expire(tmp_path: Path) -> None:
    store, content, doc = started(tmp_path, CHUNK * 3)
    put(store, content, 0)
    fresh = "01JD5Q7M6X2V9TNEXRVZ3KXW4B"
    store.accept_manifest(AGENT, fresh, *manifest(os.urandom(CHUNK)))
    old = time.time() - 8 * 86400
    transfer = store.incoming(AGENT, FILE_ID)
    for path in [*transfer.iterdir(), transfer, tmp_path / "locks" / AGENT / f"{FILE_ID}.lock"]:
        os.utime(path, (old, old))
    expired = store.expire(7 * 86400)
    assert [(a, f) for a, f, _idle in expired] == [(AGENT, FILE_ID)]
    assert not transfer.exists() and store.incoming(AGENT, fresh).exists()
    assert not (tmp_path / "locks" / AGENT / f"{FILE_ID}.lock").exists()
    assert (tmp_path / "locks" / AGENT / f"{fresh}.lock").exists()
    ack = store.accept_manifest(AGENT, FILE_ID, *manifest(content))   # the agent sends it again: a new transfer
    assert (ack.state, ack.have) == (ACK_RECEIVING, [])
    all_chunks(store, content)
    assert_completes(store, content, doc)


def test_fsck_finds_and_repairs_every_kind_of_damage(tmp_path: Path) -> None:
    store, content, doc = started(tmp_path, CHUNK * 2)
    all_chunks(store, content)                                   # half committed: every chunk, no commit
    other = os.urandom(CHUNK)
    stored_id = "01JD5Q7M6X2V9TNEXRVZ3KXW4C"
    odoc = manifest(other)[1]
    store.accept_manifest(AGENT, stored_id, *manifest(other))
    store.put_chunk(AGENT, stored_id, 0, 0, other, odoc["sha256"])
    assert store.progress(AGENT, stored_id, odoc).state == ACK_COMPLETE
    store.close()
    orphan = ChunkStore(tmp_path).object_path(hashlib.sha256(b"orphan").hexdigest())
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"orphan")
    bad = ChunkStore(tmp_path).object_path(hashlib.sha256(b"genuine").hexdigest())
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"altered")
    (tmp_path / "incoming" / AGENT / "01JD5Q7M6X2V9TNEXRVZ3KXW4D").mkdir()   # a manifest accept cut short
    stored_object = ChunkStore(tmp_path).object_path(odoc["sha256"])
    os.chmod(stored_object, 0o644)
    stored_object.write_bytes(b"rot")                            # the index now names a bad object
    (tmp_path / "index" / AGENT / ".x.json.tmp-1").write_bytes(b"")
    kinds = sorted(f.kind for f in check_store(tmp_path).findings)
    assert kinds == sorted(["half_committed", "no_manifest", "orphan_object", "bad_object", "bad_object",
                            "missing_object", "temp_file"])
    repaired = check_store(tmp_path, repair=True)
    assert repaired.clean and len(repaired.findings) == len(kinds)
    assert check_store(tmp_path).findings == []
    assert ChunkStore(tmp_path).stored(AGENT, FILE_ID)["sha256"] == doc["sha256"]
    assert (tmp_path / "quarantine" / "objects" / bad.relative_to(tmp_path / "objects")).read_bytes() == b"altered"


def test_the_inbound_queue_takes_agents_in_turn_and_refuses_beyond_an_agents_share() -> None:
    stop = threading.Event()
    inbound = FairQueue(agent_messages=3, agent_bytes=100, total_bytes=1000)
    for n in range(4):
        assert inbound.put("flooder", f"f{n}", 10, stop) == (n < 3)   # the fourth is beyond its share
    assert not inbound.put("flooder", "big", 95, stop)
    assert inbound.put("honest", "h0", 10, stop) and inbound.put("honest", "h1", 10, stop)
    assert [inbound.get(0) for _ in range(5)] == ["f0", "h0", "f1", "h1", "f2"]
    assert inbound.get(0) is None


def test_receiver_fsck_command_reports_then_repairs(tmp_path: Path) -> None:
    store, content, _doc = started(tmp_path, CHUNK * 2)
    all_chunks(store, content)   # every chunk held, the commit not run: half committed
    store.close()
    cli = [sys.executable, "-m", "edge_agent.cli", "--json", "receiver", "fsck", "--store", str(tmp_path)]
    found = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert found.returncode == 1, found.stderr
    assert [f["kind"] for f in json.loads(found.stdout)["findings"]] == ["half_committed"]
    repaired = subprocess.run([*cli, "--repair"], capture_output=True, text=True, timeout=60)
    assert repaired.returncode == 0 and json.loads(repaired.stdout)["clean"], repaired.stderr
    assert subprocess.run(cli, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([*cli[:-1], str(tmp_path / "nothing")], capture_output=True, timeout=60).returncode == 2


def test_chunks_made_durable_leave_the_page_cache_and_the_commit_is_whole(tmp_path: Path) -> None:
    """Once the syncer has made a transfer's chunks durable (before any ack names them) their pages are dropped:
    the next chunks' writes reuse them instead of new memory (docs/BENCHMARKS.md "Pages recycled"), and the
    commit, which does not read the data back for chunks hashed in order, stores every byte all the same."""
    store, content, doc = started(tmp_path, 64 * CHUNK + 5)
    count = chunk_count(len(content), CHUNK)
    for seq in range(count // 2):
        put(store, content, seq, "crc32")
    data = store.incoming(AGENT, FILE_ID) / "data"
    if resident_pages(data) == 0:
        pytest.skip("written pages are not in the page cache on this filesystem")
    store.sync([(AGENT, FILE_ID)])
    assert resident_pages(data) == 0
    for seq in range(count // 2, count):
        put(store, content, seq, "crc32")
    assert resident_pages(data) > 0   # written since the last sync: dirty, and kept until it is durable
    store.sync([(AGENT, FILE_ID)])
    assert resident_pages(data) == 0
    assert_completes(store, content, doc)

