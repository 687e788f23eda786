"""The receiver's store, on a disk that several receivers may share.

Layout under `store_dir`:

    objects/<aa>/<sha256>                               the bytes, once per content (read-only)
    objects/<aa>/<sha256>.<agent>.<file_id>.manifest.json  each signed manifest, beside its bytes
    index/<agent>/<file_id>.json                        a stored file: the commit point of `complete`
    rejected/<agent>/<file_id>.json                     a rejected file and why (until a new manifest)
    incoming/<agent>/<file_id>/manifest.json            a transfer in progress: its verified manifest,
    incoming/<agent>/<file_id>/data                     its bytes, each chunk written at its offset,
    incoming/<agent>/<file_id>/chunks                   and one record line per chunk held,
                                                        `<seq:08d> <check>\n`, appended after its
                                                        bytes are written (the check from its
                                                        header: CRC-32, 8 hex digits, or SHA-256, 64)
    locks/<agent>/<file_id>.lock                        flock: shared to add a chunk, exclusive to
                                                        accept a manifest, commit or reject

Any receiver can continue another's transfer: all state that matters is here.
The commit is resumable at every step: the verified `data` is hard-linked
into objects/ (it stays in incoming/ until the end), the manifest copy is
written, then the index (the commit point), and only then is incoming/
removed. A crash after any step leaves a state the next manifest, query or
commit finishes; `COMMIT_STEPS` names them, and `EDGE_AGENT_RECEIVER_CRASH_AT`
set to one makes the process kill itself there (fault-injection tests only).
A transfer's data file is made durable (fdatasync) before an ack names its
chunks; a record lost in a crash only means its chunk is asked for again.
The bytes are written once and renamed into objects/ at commit. The
whole-file SHA-256 is computed as chunks arrive in order when this receiver is
the only writer (no shared subscription), so the commit reads back only the
chunks that came out of order or were written by an earlier process; it checks
each of those against its record, so a chunk whose bytes did not reach the
disk (a power cut before the sync) is asked for again rather than failing the
file. Only a whole-file SHA-256 that differs from the manifest's is a
rejection.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edge_agent import durable
from edge_agent.clock import now_ms
from edge_agent.digest import hash_stream
from edge_agent.durable import atomic_write, fsync_dir, make_dirs
from edge_agent.i18n import Refusal
from edge_agent.platform.receiver.supervise import Loop, pulse
from edge_agent.protocol.heartbeat import Heartbeat
from edge_agent.protocol.wire import (
    ACK_COMPLETE,
    ACK_RECEIVING,
    ACK_REJECTED,
    REASON_BUSY,
    Ack,
    chunk_check,
    chunk_count,
    to_ranges,
)

log = logging.getLogger(__name__)
RECORD = re.compile(rb"^(\d{8}) ([0-9a-f]{64}|[0-9a-f]{8})$", re.M)   # <seq> <check>: SHA-256 or CRC-32
MAX_TRANSFERS_KNOWN = 4096
MAX_TRANSFERS_OPEN = 32   # transfers whose files a sole writer keeps open between chunks
CRASH_AT_ENV = "EDGE_AGENT_RECEIVER_CRASH_AT"
COMMIT_STEPS = ("data_synced", "object_linked", "object_dir_synced", "manifest_copied", "index_written",
                "incoming_removed")


class StoreUnavailable(Exception):
    """The store of committed files did not answer or failed on its side: nothing was committed, nothing is
    acknowledged `complete`; the commit is tried again on the next progress or query."""


class StoreConfigError(Refusal):
    """The settings of the store of committed files cannot be used; the message names the key and what to do."""


class CommittedFiles(Protocol):
    """Where committed files go when not under `root` (objectstore.py `S3Committed`). Each method raises
    StoreUnavailable when the store cannot be reached."""

    bucket: str

    def stored(self, agent: str, file_id: str) -> dict[str, Any] | None:
        """The index entry of a committed file, or None."""

    def manifest(self, sha256: str, agent: str, file_id: str) -> bytes | None:
        """The signed manifest committed with a file, or None."""

    def commit(self, agent: str, file_id: str, data: Path, manifest: bytes, doc: dict[str, Any]) -> dict[str, Any]:
        """Store the verified bytes, the manifest and the index entry; the entry that holds (the first)."""


def crash_point(step: str) -> None:
    """Fault injection: SIGKILL this process after commit step `step` if `EDGE_AGENT_RECEIVER_CRASH_AT` names
    it (unset in production: a dict lookup per step of a commit)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        log.critical("fault injection: killing the receiver at commit step=%s", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Limits:
    """What one agent may hold open in incoming/ and the free space kept: a new transfer beyond them is
    answered `receiving` with reason `busy` (the agent backs off and asks again; nothing is deleted)."""

    max_open_transfers: int = 64
    max_reserved_bytes: int = 256 * 1024**3
    min_free_bytes: int = 5 * 1024**3


@dataclass
class _Known:
    """What this process knows of one transfer in progress: the records read so far from its log (a bitmap of
    the chunks held), and the whole-file SHA-256 of chunks 0..hashed-1 if it wrote each of them, in order
    (`pending` of those still queued for the hasher thread)."""

    log_inode: int = -1
    log_read: int = 0
    held: bytearray = field(default_factory=bytearray)
    count: int = 0
    digest: Any = None
    hashed: int = 0
    pending: int = 0

    def holds(self, seq: int) -> bool:
        return seq // 8 < len(self.held) and bool(self.held[seq // 8] >> (seq % 8) & 1)

    def add(self, seq: int) -> None:
        if seq // 8 >= len(self.held):
            self.held.extend(bytes(seq // 8 + 1 - len(self.held)))
        if not self.holds(seq):
            self.held[seq // 8] |= 1 << (seq % 8)
            self.count += 1

    def seqs(self) -> list[int]:
        return [i * 8 + bit for i, byte in enumerate(self.held) if byte for bit in range(8) if byte >> bit & 1]


@dataclass
class _Files:
    """A transfer's lock, data and record log, open for adding chunks. A sole writer keeps them open between
    chunks; `stale` is set when the transfer is committed, rejected or restarted, and they are opened again."""

    lock: int
    data: int = -1
    log: int = -1
    stale: bool = False

    def close(self) -> None:
        for fd in (self.data, self.log, self.lock):
            if fd != -1:
                os.close(fd)


class ChunkStore:
    """`sole_writer`: no other live receiver writes this store's transfers (no shared subscription; a restarted
    receiver continues from the store), so the whole-file hash of chunks this process wrote in order can be
    trusted at commit without reading them back, and a transfer's files can stay open between its chunks."""

    def __init__(self, root: Path, *, sole_writer: bool = False, limits: Limits | None = None,
                 committed: CommittedFiles | None = None):
        self.root = Path(root)
        # Where committed files go: None, objects/ and index/ under `root`; else an S3 bucket (objectstore.py),
        # while the transfers in progress stay in incoming/ here.
        self.committed = committed
        self.sole_writer = sole_writer
        self.limits = limits
        for sub in ("objects", "index", "rejected", "incoming", "locks"):
            make_dirs(self.root / sub)
        self._known: OrderedDict[tuple[str, str], _Known] = OrderedDict()
        self._known_lock = threading.Lock()
        self._open: OrderedDict[tuple[str, str], _Files] = OrderedDict()   # used by the thread adding chunks
        # The running hash is the hasher thread's work, so writing a chunk does not wait for it (bounded: 32 chunks).
        self._to_hash: queue.Queue[tuple[_Known, bytes | memoryview] | None] = queue.Queue(maxsize=32)
        self._hashed = threading.Condition()
        self._closing = threading.Event()
        self.hasher = Loop("receiver-hasher", self._hash_loop, self._closing)
        if sole_writer:
            self.hasher.start()

    def close(self) -> None:
        self._closing.set()
        if self.hasher.thread.is_alive():
            self._to_hash.put(None)
            self.hasher.join(timeout=30)
        with self._known_lock:
            self._known.clear()
            opened, self._open = list(self._open.values()), OrderedDict()
        for files in opened:
            files.close()

    def _hash_loop(self, heartbeat: Heartbeat) -> None:
        while True:
            heartbeat.idle()   # nothing to hash until a chunk is written
            if (item := self._to_hash.get()) is None:
                return
            heartbeat.beat()
            known, data = item
            known.digest.update(data)
            with self._hashed:
                known.pending -= 1
                self._hashed.notify_all()

    def _digest_of(self, known: _Known) -> Any:
        """A copy of the running hash once the hasher has taken every chunk queued for it."""
        with self._hashed:
            while known.pending:
                self._hashed.wait()
        return known.digest.copy()

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

    def _open_lock(self, agent: str, file_id: str) -> int:
        path = self.root / "locks" / agent / f"{file_id}.lock"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:   # the agent's first file
            make_dirs(path.parent)
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextmanager
    def _lock(self, agent: str, file_id: str, exclusive: bool) -> Iterator[None]:
        while True:
            fd = self._open_lock(agent, file_id)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            if self._lock_is_current(agent, file_id, fd):
                break
            os.close(fd)   # an expired lock file, unlinked while we waited for it: lock the new one
        try:
            yield
        finally:
            os.close(fd)   # closing releases the lock

    def _lock_is_current(self, agent: str, file_id: str, fd: int) -> bool:
        try:
            return os.stat(self.root / "locks" / agent / f"{file_id}.lock").st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    # -- reading state -----------------------------------------------------------------------------

    def stored(self, agent: str, file_id: str) -> dict[str, Any] | None:
        """The index entry of a stored file, or None (also while the bucket cannot be reached: not `complete`)."""
        if self.committed is not None:
            try:
                return self.committed.stored(agent, file_id)
            except StoreUnavailable as exc:
                log.warning("store unreachable agent=%s file=%s: %s", agent, file_id, exc)
                return None
        try:
            return json.loads(self._index(agent, file_id).read_bytes())
        except FileNotFoundError:
            return None

    def stored_manifest(self, sha256: str, agent: str, file_id: str) -> bytes:
        """The signed manifest stored with a committed file (OSError or StoreUnavailable if it cannot be read)."""
        if self.committed is not None:
            manifest = self.committed.manifest(sha256, agent, file_id)
            if manifest is None:
                raise FileNotFoundError(f"manifest of {agent}/{file_id} missing from bucket {self.committed.bucket}")
            return manifest
        return self.manifest_path(sha256, agent, file_id).read_bytes()

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
        """The chunks recorded as held, in order."""
        with self._known_lock:
            return self._refresh(agent, file_id).seqs()

    def _known_for(self, agent: str, file_id: str) -> _Known:
        """This process's view of a transfer (caller holds `_known_lock`)."""
        key = (agent, file_id)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = _Known(digest=hashlib.sha256() if self.sole_writer else None)
            while len(self._known) > MAX_TRANSFERS_KNOWN:
                self._known.popitem(last=False)
        self._known.move_to_end(key)
        return known

    def _refresh(self, agent: str, file_id: str) -> _Known:
        """This process's view of a transfer, brought up to date with the records appended to its log since
        (by any receiver). Caller holds `_known_lock`."""
        known = self._known_for(agent, file_id)
        try:
            fd = os.open(self.incoming(agent, file_id) / "chunks", os.O_RDONLY)
        except FileNotFoundError:
            known.log_inode, known.log_read, known.held, known.count = -1, 0, bytearray(), 0
            return known
        try:
            inode = os.fstat(fd).st_ino
            if inode != known.log_inode:   # a new log (a lost chunk dropped at commit): read it from the start
                known.log_inode, known.log_read, known.held, known.count = inode, 0, bytearray(), 0
            blocks = []
            while block := os.pread(fd, 1 << 20, known.log_read + sum(map(len, blocks))):
                blocks.append(block)
        finally:
            os.close(fd)
        new = b"".join(blocks)
        end = new.rfind(b"\n") + 1   # a line cut short by a crash, or being appended, waits
        for match in RECORD.finditer(new, 0, end):
            known.add(int(match[1]))
        known.log_read += end
        return known

    def _forget(self, agent: str, file_id: str) -> None:
        """The transfer was committed, rejected or restarted (exclusive lock held)."""
        with self._known_lock:
            self._known.pop((agent, file_id), None)
            if (files := self._open.get((agent, file_id))) is not None:
                files.stale = True

    def _files(self, agent: str, file_id: str) -> _Files:
        """A sole writer's open files of a transfer (opened on first use; only the thread adding chunks calls)."""
        key = (agent, file_id)
        with self._known_lock:
            files = self._open.get(key)
            if files is not None and not files.stale:
                self._open.move_to_end(key)
                return files
            self._open.pop(key, None)
        if files is not None:
            files.close()
        files = _Files(self._open_lock(agent, file_id))
        with self._known_lock:
            self._open[key] = files
            evicted = [self._open.popitem(last=False)[1] for _ in range(len(self._open) - MAX_TRANSFERS_OPEN)]
        for old in evicted:
            old.close()
        return files

    def _records(self, agent: str, file_id: str) -> dict[int, bytes]:
        """Every chunk's recorded check (CRC-32 or SHA-256, hex, ASCII), read in full (commit, lock held)."""
        try:
            log_bytes = (self.incoming(agent, file_id) / "chunks").read_bytes()
        except FileNotFoundError:
            return {}
        return {int(m[1]): m[2] for m in RECORD.finditer(log_bytes, 0, log_bytes.rfind(b"\n") + 1)}

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
                if self.incoming(agent, file_id).exists():   # a commit killed after its index: tidy up
                    shutil.rmtree(self.incoming(agent, file_id), ignore_errors=True)
                    fsync_dir(self.incoming(agent, file_id).parent)
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
                busy = self._busy(agent, int(doc["size"]))
                if busy is not None:
                    log.warning("transfer deferred agent=%s file=%s reason=%s size=%d detail=%r", agent, file_id,
                                REASON_BUSY, doc["size"], busy)
                    return Ack(file_id, ACK_RECEIVING, [], None, REASON_BUSY)
                shutil.rmtree(incoming, ignore_errors=True)   # chunks of another manifest are not this file's
                self._forget(agent, file_id)
                make_dirs(incoming)
                self._fresh_data(incoming, doc["size"])
                atomic_write(current, canonical)   # makes `data` and `manifest.json` durable in `incoming`
            return self._progress_locked(agent, file_id, doc)

    @staticmethod
    def _fresh_data(incoming: Path, size: int) -> None:
        """An empty, sparse data file of `size` bytes: chunks fill it in any order (synced with its directory
        by the caller's next atomic_write, or here)."""
        fd = os.open(incoming / "data", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(incoming)

    def open_ids(self, agent: str) -> set[str]:
        """The file ids of `agent`'s transfers in incoming/ (one directory listing)."""
        try:
            return {entry.name for entry in os.scandir(self.root / "incoming" / agent)}
        except FileNotFoundError:
            return set()

    def open_transfers(self, agent: str) -> tuple[int, int]:
        """How many transfers `agent` has in incoming/ and the bytes their data files reserve."""
        count = reserved = 0
        try:
            entries = list(os.scandir(self.root / "incoming" / agent))
        except FileNotFoundError:
            return 0, 0
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            count += 1
            try:
                reserved += os.stat(os.path.join(entry.path, "data")).st_size
            except FileNotFoundError:
                continue
        return count, reserved

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def at_cap(self, agent: str, file_id: str) -> str | None:
        """Why any new transfer from `agent` would be answered `busy` now (open transfers or reserved bytes at
        their cap, or the free-space reserve reached), None if it might be taken or `file_id` is already open
        or stored. Cheap (no lock, no signature): the receiver asks before it verifies a manifest."""
        limits = self.limits
        if limits is None or self.incoming(agent, file_id).exists() or self._index(agent, file_id).exists():
            return None
        count, reserved = self.open_transfers(agent)
        if count >= limits.max_open_transfers:
            return f"{count} transfers open, receiver.max_open_transfers_per_agent is {limits.max_open_transfers}"
        if reserved >= limits.max_reserved_bytes:
            return (f"{reserved} bytes reserved by open transfers: receiver.max_reserved_gb_per_agent is "
                    f"{limits.max_reserved_bytes / 1024**3:g}")
        if self.free_bytes() < limits.min_free_bytes:
            return f"the store keeps receiver.min_free_gb={limits.min_free_bytes / 1024**3:g} GiB free"
        return None

    def _busy(self, agent: str, size: int) -> str | None:
        """Why a new transfer of `size` bytes from `agent` must wait, or None (no limits: never)."""
        limits = self.limits
        if limits is None:
            return None
        count, reserved = self.open_transfers(agent)
        if count >= limits.max_open_transfers:
            return f"{count} transfers open, receiver.max_open_transfers_per_agent is {limits.max_open_transfers}"
        if reserved + size > limits.max_reserved_bytes:
            return (f"{reserved} bytes reserved by open transfers, this file needs {size} more: "
                    f"receiver.max_reserved_gb_per_agent is {limits.max_reserved_bytes / 1024**3:g}")
        free = self.free_bytes()
        if free - size < limits.min_free_bytes:
            return (f"{free} bytes free on the store, this file needs {size}: receiver.min_free_gb keeps "
                    f"{limits.min_free_bytes / 1024**3:g} GiB free; free space on {self.root}")
        return None

    def put_chunk(self, agent: str, file_id: str, seq: int, offset: int, data: bytes | memoryview,
                  check: str) -> bool:
        """Write chunk `seq` (verified by the caller against `check`, its header's CRC-32 or SHA-256) and its
        record. False if the transfer is not in
        progress (settled meanwhile, or never started). One thread adds chunks (the receiver's worker): a
        sole writer keeps each transfer's files open between its chunks."""
        if not self.sole_writer:
            with self._lock(agent, file_id, exclusive=False):
                files = _Files(-1)
                try:
                    return self._add_chunk(agent, file_id, files, seq, offset, data, check)
                finally:
                    files.close()
        while True:
            files = self._files(agent, file_id)
            fcntl.flock(files.lock, fcntl.LOCK_SH)
            try:
                if not files.stale:   # else committed, rejected or restarted since it was opened: open again
                    return self._add_chunk(agent, file_id, files, seq, offset, data, check)
            finally:
                fcntl.flock(files.lock, fcntl.LOCK_UN)

    def _add_chunk(self, agent: str, file_id: str, files: _Files, seq: int, offset: int, data: bytes | memoryview,
                   check: str) -> bool:
        """put_chunk with the transfer's lock held shared."""
        incoming = self.incoming(agent, file_id)
        with self._known_lock:
            known = self._known_for(agent, file_id)
            if not (self.sole_writer and known.log_inode != -1):   # sole writer: every later record is ours
                self._refresh(agent, file_id)
            if known.holds(seq):
                return True   # a duplicate: same seq, same verified bytes
        if files.data == -1:
            try:
                files.data = os.open(incoming / "data", os.O_WRONLY)
            except FileNotFoundError:
                return False
        view, at = memoryview(data), offset
        while view:
            n = os.pwrite(files.data, view, at)
            view, at = view[n:], at + n
        if known.digest is not None and seq == known.hashed:   # in order: the commit need not read it back
            known.hashed += 1
            with self._hashed:
                known.pending += 1
            self._to_hash.put((known, data))
        # One line appended (atomic for so small a write): a line cut short by a crash is not a record, and
        # the commit checks each record it reads back against the bytes it names.
        record = b"%08d %s\n" % (seq, check.encode("ascii"))
        with self._known_lock:
            if files.log == -1:
                files.log = os.open(incoming / "chunks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(files.log, record)
            if self.sole_writer:   # what this process appends it need not read back
                if known.log_inode == -1:
                    known.log_inode = os.fstat(files.log).st_ino
                known.log_read += len(record)
                known.add(seq)
        return True

    def sync(self, transfers: Iterable[tuple[str, str]]) -> None:
        """Make every chunk written so far to these transfers durable before an ack names it: one fdatasync of
        each one's data file (a transfer settled meanwhile was made durable by its commit)."""
        for agent, file_id in transfers:
            try:
                fd = os.open(self.incoming(agent, file_id) / "data", os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
                # Durable now, and not read again on the way (the hasher takes the chunks from memory): its pages
                # go back to the kernel for the next chunks' writes, cheaper than new ones (durable.drop_cache;
                # 1.2-2.0 CPU-s/GiB less for the receiver, docs/BENCHMARKS.md "Pages recycled").
                durable.drop_cache(fd)
            finally:
                os.close(fd)

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
        self._forget(agent, file_id)
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
        if not (incoming / "data").exists():
            return self._commit_without_data(agent, file_id, doc)
        sha256, chunk_size = doc["sha256"], doc["chunk_size"]
        with self._known_lock:
            known = self._known.get((agent, file_id))
        if known is not None and known.digest is not None:
            digest, first = self._digest_of(known), known.hashed   # chunks this process wrote in order
        else:
            digest, first = hashlib.sha256(), 0
        records = self._records(agent, file_id) if first < total else {}
        lost = []
        fd = os.open(incoming / "data", os.O_RDONLY)
        try:
            for seq in range(first, total):
                data = os.pread(fd, chunk_size, seq * chunk_size)
                digest.update(data)
                if seq % 64 == 0:
                    pulse()   # re-reading a large file after a restart is progress, not a stuck thread
                record = records.get(seq)
                if record is None or chunk_check(data, record.decode("ascii")).encode("ascii") != record:
                    lost.append(seq)
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("data_synced")
        if lost:
            kept = set(records) - set(lost)
            atomic_write(incoming / "chunks", b"".join(b"%08d %s\n" % (seq, records[seq]) for seq in sorted(kept)))
            with self._known_lock:
                if known is not None:
                    known.log_inode = -1   # read the new log from the start
                if (files := self._open.get((agent, file_id))) is not None:
                    files.stale = True     # and append to it, not to the old one
            log.warning("chunks lost agent=%s file=%s seqs=%s: their bytes did not reach the disk; asking again",
                        agent, file_id, to_ranges(lost))
            return Ack(file_id, ACK_RECEIVING, to_ranges(self.have(agent, file_id)))
        if digest.hexdigest() != sha256:
            return self._reject_locked(agent, file_id, (
                f"the assembled file has SHA-256 {digest.hexdigest()}, the manifest says {sha256}: "
                "its bytes were altered after sealing or in transit"))
        if self.committed is not None:
            return self._commit_to_bucket(agent, file_id, doc)
        self._link_object(incoming / "data", sha256)
        return self._record_stored(agent, file_id, doc)

    def _commit_to_bucket(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        """The verified bytes, manifest and index into the bucket (lock held); `receiving` while it cannot be
        reached, with every chunk kept here, so the next progress or query commits again."""
        assert self.committed is not None
        incoming, sha256 = self.incoming(agent, file_id), doc["sha256"]
        try:
            entry = self.committed.commit(agent, file_id, incoming / "data", (incoming / "manifest.json").read_bytes(),
                                          doc)
        except StoreUnavailable as exc:
            log.warning("commit deferred agent=%s file=%s: %s", agent, file_id, exc)
            return Ack(file_id, ACK_RECEIVING, to_ranges(self.have(agent, file_id)))
        shutil.rmtree(incoming, ignore_errors=True)
        fsync_dir(incoming.parent)
        self._forget(agent, file_id)
        if entry["sha256"] != sha256:
            return Ack(file_id, ACK_REJECTED, [], None,
                       f"a different file with id {file_id} is already stored (SHA-256 {entry['sha256']})")
        log.info("stored agent=%s file=%s size=%d sha256=%s bucket=%s", agent, file_id, doc["size"], sha256,
                 self.committed.bucket)
        return Ack(file_id, ACK_COMPLETE, [], sha256)

    def _link_object(self, data: Path, sha256: str) -> None:
        """Hard-link verified bytes into objects/ (they stay in incoming/ until the index is written). The
        same bytes stored already are kept (G3: one copy), unless they no longer hash to their name."""
        target = self.object_path(sha256)
        make_dirs(target.parent)
        os.chmod(data, 0o444)
        try:
            os.link(data, target)
        except FileExistsError:
            if not os.path.samefile(data, target) and not self.object_intact(sha256):
                log.error("object replaced sha256=%s reason=its bytes no longer hash to its name", sha256)
                spare = target.with_name(f".{sha256}.tmp-{os.getpid()}")
                self._unlink(spare)
                os.link(data, spare)
                os.replace(spare, target)
        crash_point("object_linked")
        fsync_dir(target.parent)
        crash_point("object_dir_synced")

    def _record_stored(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        """The object is durable: the manifest copy beside it, the index (the commit point), then incoming/
        goes. Each step may be redone after a crash."""
        incoming, sha256 = self.incoming(agent, file_id), doc["sha256"]
        manifest = (incoming / "manifest.json").read_bytes()
        atomic_write(self.manifest_path(sha256, agent, file_id), manifest, mode=0o444)
        crash_point("manifest_copied")
        index = self._index(agent, file_id)
        make_dirs(index.parent)
        atomic_write(index, json.dumps(
            {"agent_id": agent, "file_id": file_id, "sha256": sha256, "size": doc["size"], "stored_ms": now_ms(),
             "object": str(self.object_path(sha256).relative_to(self.root))}).encode(), mode=0o444)
        crash_point("index_written")
        shutil.rmtree(incoming, ignore_errors=True)
        fsync_dir(incoming.parent)
        crash_point("incoming_removed")
        self._forget(agent, file_id)
        log.info("stored agent=%s file=%s size=%d sha256=%s", agent, file_id, doc["size"], sha256)
        return Ack(file_id, ACK_COMPLETE, [], sha256)

    def _commit_without_data(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        """Every chunk recorded but no `data`: a receiver before this one moved it into objects/ and died before
        the index. The object, if it hashes right, is the file: finish the commit. Else start over."""
        if self.object_intact(doc["sha256"]):
            log.warning("commit resumed agent=%s file=%s: the object was stored, its index was not", agent, file_id)
            return self._record_stored(agent, file_id, doc)
        incoming = self.incoming(agent, file_id)
        self._unlink(incoming / "chunks")
        self._fresh_data(incoming, doc["size"])
        self._forget(agent, file_id)
        log.warning("transfer restarted agent=%s file=%s: its bytes were lost in a crash during its commit",
                    agent, file_id)
        return Ack(file_id, ACK_RECEIVING, [])

    def object_intact(self, sha256: str) -> bool:
        """The object named `sha256` exists and its bytes hash to that name (read in full)."""
        try:
            fd = os.open(self.object_path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:   # a large object takes minutes: each block read is progress for the supervisor
            return hash_stream(fd, lambda _block: pulse())[0] == sha256
        finally:
            os.close(fd)

    def expire(self, max_age_s: float) -> list[tuple[str, str, float]]:
        """Drop transfers nothing touched for `max_age_s` (their agent sends the file again if it still has it),
        and lock files of settled transfers as old. Returns (agent, file id, idle seconds) of each transfer."""
        expired = []
        for agent_dir in subdirs(self.root / "incoming"):
            for transfer in subdirs(agent_dir):
                agent, file_id = agent_dir.name, transfer.name
                with self._lock(agent, file_id, exclusive=True):
                    idle = _idle_s(transfer)
                    if idle is None or idle < max_age_s:
                        continue
                    shutil.rmtree(transfer, ignore_errors=True)
                    fsync_dir(agent_dir)
                    self._forget(agent, file_id)
                expired.append((agent, file_id, idle))
        for agent_dir in subdirs(self.root / "locks"):
            for lock in agent_dir.glob("*.lock"):
                self._expire_lock(agent_dir.name, lock.name[:-len(".lock")], max_age_s)
        return expired

    def _expire_lock(self, agent: str, file_id: str, max_age_s: float) -> None:
        """Unlink an old lock file of a transfer no longer in incoming/, holding it (`_lock` then sees the
        inode is gone and locks the new file)."""
        with self._lock(agent, file_id, exclusive=True):
            path = self.root / "locks" / agent / f"{file_id}.lock"
            idle = _idle_s(path)
            if idle is not None and idle >= max_age_s and not self.incoming(agent, file_id).exists():
                self._unlink(path)
                self._forget(agent, file_id)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise



def subdirs(path: Path) -> list[Path]:
    """The directories in `path` (none if it does not exist), sorted."""
    try:
        return sorted(Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _idle_s(path: Path) -> float | None:
    """Seconds since anything in `path` (a file, or a directory and the files in it) was last changed."""
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            newest = max([newest, *(p.stat().st_mtime for p in path.iterdir())])
    except FileNotFoundError:
        return None
    return max(0.0, now_ms() / 1000 - newest)
