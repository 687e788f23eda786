"""The receiver's store, on a disk that several receivers may share.

Layout under `store_dir`:

    objects/<aa>/<sha256>                               the bytes, once per content (read-only)
    objects/<aa>/<sha256>.<agent>.<file_id>.manifest.json  each signed manifest, beside its bytes
    index/<agent>/<file_id>.json                        a stored file: the commit point of `complete`
    rejected/<agent>/<file_id>.json                     a rejected file and why (until a new manifest)
    incoming/<agent>/<file_id>/manifest.json            a transfer in progress: its verified manifest,
    incoming/<agent>/<file_id>/data                     its bytes, each chunk written at its offset,
    incoming/<agent>/<file_id>/<seq:08d>                and one record per chunk held (its SHA-256),
                                                        created after its bytes are written
    locks/<agent>/<file_id>.lock                        flock: shared to add a chunk, exclusive to
                                                        accept a manifest, commit or reject

Any receiver can continue another's transfer: all state is here, none in
memory. Chunk writes are made durable (one syncfs) before an ack names them.
The bytes are written once: the commit hashes `data` in place and renames it
into objects/. It checks every chunk against its record as it goes, so a chunk
whose bytes did not reach the disk (a power cut before the sync) is asked for
again rather than failing the file; only a whole-file SHA-256 that differs
from the manifest's with every chunk intact is a rejection.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_agent.durable import atomic_write, fsync_dir
from edge_agent.sync.wire import ACK_COMPLETE, ACK_RECEIVING, ACK_REJECTED, Ack, chunk_count, to_ranges

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)


def now_ms() -> int:
    return int(time.time() * 1000)


class ChunkStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in ("objects", "index", "rejected", "incoming", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self._root_fd)

    # -- paths -------------------------------------------------------------------------------------

    def incoming(self, agent: str, file_id: str) -> Path:
        return self.root / "incoming" / agent / file_id

    def _index(self, agent: str, file_id: str) -> Path:
        return self.root / "index" / agent / f"{file_id}.json"

    def _rejected(self, agent: str, file_id: str) -> Path:
        return self.root / "rejected" / agent / f"{file_id}.json"

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def manifest_path(self, sha256: str, agent: str, file_id: str) -> Path:
        return self.root / "objects" / sha256[:2] / f"{sha256}.{agent}.{file_id}.manifest.json"

    @contextmanager
    def _lock(self, agent: str, file_id: str, exclusive: bool) -> Iterator[None]:
        path = self.root / "locks" / agent / f"{file_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)   # closing releases the lock

    # -- reading state -----------------------------------------------------------------------------

    def stored(self, agent: str, file_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._index(agent, file_id).read_bytes())
        except FileNotFoundError:
            return None

    def rejection(self, agent: str, file_id: str) -> str | None:
        try:
            return str(json.loads(self._rejected(agent, file_id).read_bytes())["reason"])
        except FileNotFoundError:
            return None

    def manifest(self, agent: str, file_id: str) -> dict[str, Any] | None:
        """The verified manifest of a transfer in progress, or None."""
        try:
            return json.loads((self.incoming(agent, file_id) / "manifest.json").read_bytes())
        except FileNotFoundError:
            return None

    def have(self, agent: str, file_id: str) -> list[int]:
        try:
            names = os.listdir(self.incoming(agent, file_id))
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def settled(self, agent: str, file_id: str) -> Ack | None:
        """`complete` or `rejected` if the file is past transfer, else None."""
        stored = self.stored(agent, file_id)
        if stored is not None:
            return Ack(file_id, ACK_COMPLETE, [], stored["sha256"])
        reason = self.rejection(agent, file_id)
        if reason is not None:
            return Ack(file_id, ACK_REJECTED, [], None, reason)
        return None

    # -- changing state ----------------------------------------------------------------------------

    def accept_manifest(self, agent: str, file_id: str, canonical: bytes, doc: dict[str, Any]) -> Ack:
        """Start (or rejoin) a transfer with a manifest whose signature the caller verified."""
        with self._lock(agent, file_id, exclusive=True):
            stored = self.stored(agent, file_id)
            if stored is not None:
                if stored["sha256"] == doc["sha256"]:
                    return Ack(file_id, ACK_COMPLETE, [], stored["sha256"])
                return Ack(file_id, ACK_REJECTED, [], None,
                           f"a different file with id {file_id} is already stored (SHA-256 {stored['sha256']})")
            self._unlink(self._rejected(agent, file_id))   # a new manifest is a new attempt
            incoming = self.incoming(agent, file_id)
            current = incoming / "manifest.json"
            try:
                same = current.read_bytes() == canonical
            except FileNotFoundError:
                same = False
            if not same:
                shutil.rmtree(incoming, ignore_errors=True)   # chunks of another manifest are not this file's
                incoming.mkdir(parents=True)
                fd = os.open(incoming / "data", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.ftruncate(fd, doc["size"])   # sparse: chunks fill it in any order
                finally:
                    os.close(fd)
                atomic_write(current, canonical)
            return self._progress_locked(agent, file_id, doc)

    def put_chunk(self, agent: str, file_id: str, seq: int, offset: int, data: bytes | memoryview,
                  sha256: str) -> bool:
        """Write chunk `seq` (verified by the caller) and its record. False if the transfer is not in
        progress (settled meanwhile, or never started)."""
        with self._lock(agent, file_id, exclusive=False):
            incoming = self.incoming(agent, file_id)
            record = incoming / f"{seq:08d}"
            if record.exists():
                return True   # a duplicate: same seq, same verified bytes
            try:
                fd = os.open(incoming / "data", os.O_WRONLY)
            except FileNotFoundError:
                return False
            try:
                view, at = memoryview(data), offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            finally:
                os.close(fd)
            # No tmp + rename: a record cut short by a crash cannot pass as valid, the commit checks each
            # record against the bytes it names and asks again for any that differ.
            try:
                fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return True
            try:
                os.write(fd, sha256.encode("ascii"))
            finally:
                os.close(fd)
            return True

    def sync(self) -> None:
        """Make every chunk written so far durable before an ack names it (one syncfs, not one fsync each)."""
        if _libc.syncfs(self._root_fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(self.root))

    def progress(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        """What the receivers hold of this file; assembles and commits it when every chunk is there."""
        have = self.have(agent, file_id)
        if len(have) < chunk_count(doc["size"], doc["chunk_size"]):
            return self.settled(agent, file_id) or Ack(file_id, ACK_RECEIVING, to_ranges(have))
        with self._lock(agent, file_id, exclusive=True):
            return self._progress_locked(agent, file_id, doc)

    def reject(self, agent: str, file_id: str, reason: str) -> Ack:
        """Record a rejection and drop the partial transfer; the agent keeps its file."""
        with self._lock(agent, file_id, exclusive=True):
            return self.settled(agent, file_id) or self._reject_locked(agent, file_id, reason)

    def _reject_locked(self, agent: str, file_id: str, reason: str) -> Ack:
        atomic_write(self._rejected(agent, file_id),
                     json.dumps({"reason": reason, "ts_ms": now_ms()}, ensure_ascii=False).encode("utf-8"))
        shutil.rmtree(self.incoming(agent, file_id), ignore_errors=True)
        log.warning("rejected agent=%s file=%s reason=%s", agent, file_id, reason)
        return Ack(file_id, ACK_REJECTED, [], None, reason)

    def _progress_locked(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        settled = self.settled(agent, file_id)
        if settled is not None:
            return settled
        have = self.have(agent, file_id)
        total = chunk_count(doc["size"], doc["chunk_size"])
        if len(have) < total:
            return Ack(file_id, ACK_RECEIVING, to_ranges(have))
        return self._commit(agent, file_id, doc, total)

    def _commit(self, agent: str, file_id: str, doc: dict[str, Any], total: int) -> Ack:
        """Check every chunk and the whole file's SHA-256, then store it content-addressed (lock held)."""
        incoming = self.incoming(agent, file_id)
        sha256, chunk_size = doc["sha256"], doc["chunk_size"]
        digest, lost = hashlib.sha256(), []
        fd = os.open(incoming / "data", os.O_RDONLY)
        try:
            for seq in range(total):
                data = os.pread(fd, chunk_size, seq * chunk_size)
                digest.update(data)
                if hashlib.sha256(data).hexdigest().encode("ascii") != (incoming / f"{seq:08d}").read_bytes():
                    lost.append(seq)
            os.fsync(fd)
        finally:
            os.close(fd)
        if lost:
            for seq in lost:
                self._unlink(incoming / f"{seq:08d}")
            log.warning("chunks lost agent=%s file=%s seqs=%s: their bytes did not reach the disk; asking again",
                        agent, file_id, to_ranges(lost))
            return Ack(file_id, ACK_RECEIVING, to_ranges(self.have(agent, file_id)))
        if digest.hexdigest() != sha256:
            return self._reject_locked(agent, file_id, (
                f"the assembled file has SHA-256 {digest.hexdigest()}, the manifest says {sha256}: "
                "its bytes were altered after sealing or in transit"))
        target = self.object_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self._unlink(incoming / "data")   # the same bytes are stored already (G3: one copy)
        else:
            os.chmod(incoming / "data", 0o444)
            os.replace(incoming / "data", target)
        fsync_dir(target.parent)
        manifest = (incoming / "manifest.json").read_bytes()
        atomic_write(self.manifest_path(sha256, agent, file_id), manifest, mode=0o444)
        atomic_write(self._index(agent, file_id), json.dumps(
            {"agent_id": agent, "file_id": file_id, "sha256": sha256, "size": doc["size"], "stored_ms": now_ms(),
             "object": str(target.relative_to(self.root))}).encode(), mode=0o444)
        shutil.rmtree(incoming, ignore_errors=True)
        log.info("stored agent=%s file=%s size=%d sha256=%s", agent, file_id, doc["size"], sha256)
        return Ack(file_id, ACK_COMPLETE, [], sha256)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
