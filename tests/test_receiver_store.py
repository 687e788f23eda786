"""The receiver's store on a real file system: chunk records, the running whole-file hash and its fallbacks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edge_agent.platform.receiver.store import ChunkStore
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_RECEIVING, ACK_REJECTED, chunk_count, chunk_span

AGENT = "ws-store-01"
FILE_ID = "01JD5Q7M6X2V9TNEXRVZ3KXW4A"
CHUNK = 4096


def manifest(content: bytes, sha256: str | None = None) -> tuple[bytes, dict]:
    doc = {"size": len(content), "chunk_size": CHUNK, "sha256": sha256 or hashlib.sha256(content).hexdigest()}
    return repr(sorted(doc.items())).encode(), doc


def started(root: Path, size: int, *, sole_writer: bool = True, sha256: str | None = None
            ) -> tuple[ChunkStore, bytes, dict]:
    """A store with a transfer of `size` random bytes begun (its manifest accepted)."""
    store = ChunkStore(root, sole_writer=sole_writer)
    content = os.urandom(size)
    canonical, doc = manifest(content, sha256)
    assert store.accept_manifest(AGENT, FILE_ID, canonical, doc).state == ACK_RECEIVING
    return store, content, doc


def put(store: ChunkStore, content: bytes, seq: int) -> None:
    offset, length = chunk_span(seq, len(content), CHUNK)
    data = content[offset:offset + length]
    assert store.put_chunk(AGENT, FILE_ID, seq, offset, data, hashlib.sha256(data).hexdigest())


def assert_completes(store: ChunkStore, content: bytes, doc: dict) -> None:
    """Every chunk is in: the commit says `complete` and stores exactly `content`."""
    ack = store.progress(AGENT, FILE_ID, doc)
    assert (ack.state, ack.sha256) == (ACK_COMPLETE, doc["sha256"])
    assert store.object_path(doc["sha256"]).read_bytes() == content
    assert not store.incoming(AGENT, FILE_ID).exists()


@pytest.mark.parametrize("sole_writer", [True, False])
@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled"])
def test_every_order_stores_the_exact_file(tmp_path: Path, sole_writer: bool, order: str) -> None:
    store, content, doc = started(tmp_path, CHUNK * 9 + 123, sole_writer=sole_writer)
    seqs = list(range(chunk_count(len(content), CHUNK)))
    if order == "reversed":
        seqs.reverse()
    elif order == "shuffled":
        seqs = seqs[3:] + seqs[:3]
    for seq in seqs:
        put(store, content, seq)
        put(store, content, seq)   # a duplicate changes nothing
    assert store.have(AGENT, FILE_ID) == sorted(seqs)
    assert_completes(store, content, doc)


def test_whole_file_mismatch_is_rejected_with_the_running_hash(tmp_path: Path) -> None:
    store, content, doc = started(tmp_path, CHUNK * 4, sha256=hashlib.sha256(b"another file").hexdigest())
    for seq in range(4):
        put(store, content, seq)
    ack = store.progress(AGENT, FILE_ID, doc)
    assert ack.state == ACK_REJECTED and "SHA-256" in ack.reason
    assert not store.object_path(doc["sha256"]).exists()


def test_a_chunk_whose_bytes_did_not_reach_the_disk_is_asked_for_again(tmp_path: Path) -> None:
    """Chunks that came out of order are read back at commit and checked against their records."""
    store, content, doc = started(tmp_path, CHUNK * 6)
    for seq in (0, 1, 3, 4, 5, 2):
        put(store, content, seq)
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


def test_a_record_cut_short_by_a_crash_is_not_a_chunk_held(tmp_path: Path) -> None:
    store, content, _doc = started(tmp_path, CHUNK * 3)
    put(store, content, 0)
    with open(store.incoming(AGENT, FILE_ID) / "chunks", "ab") as log:
        log.write(b"00000001 " + hashlib.sha256(b"x").hexdigest()[:20].encode())
    assert ChunkStore(tmp_path).have(AGENT, FILE_ID) == [0]
