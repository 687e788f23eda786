"""The one streaming SHA-256 (and SM3 beside it, in the same pass, under the 国密 suites): every hash of
evidence bytes (copy, read-back, verify, scrub, export) goes
through `hash_stream`, so memory stays a few 1 MiB blocks whatever the file size."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from edge_agent.atrest import AtRest, is_encrypted
from edge_agent.durable import BLOCK, drop_cache

# Blocks read ahead per stream: one being hashed (and written), the next ones already coming off the disk.
READ_AHEAD_DEPTH = 3
# Free read buffers kept for the next stream (8 dock workers reading ahead 3 blocks each, and a few more).
_POOL_MAX = 32
_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def _take_buffer() -> mmap.mmap:
    """A 1 MiB read buffer, page-aligned (as O_DIRECT wants), from the pool if one is free: a stream reuses the
    memory of the ones before it instead of faulting in new pages for every file."""
    with _pool_lock:
        if _pool:
            return _pool.pop()
    return mmap.mmap(-1, BLOCK)


def _give_buffer(buf: mmap.mmap) -> None:
    """Back to the pool; beyond its size it is left to the garbage collector (never closed here: a view of its
    last block may still be alive in a traceback)."""
    with _pool_lock:
        if len(_pool) < _POOL_MAX:
            _pool.append(buf)


class ReadAhead:
    """Reads a file descriptor ahead into a few reusable 1 MiB buffers on its own thread.

    The disk read of the next block overlaps the hashing (and writing) of this one: os.readv,
    hashlib and os.write all release the GIL. Memory is `depth` blocks whatever the file size, page-aligned
    (O_DIRECT) and taken from a pool that the streams before left (at most `_POOL_MAX` blocks kept).
    Use as a context manager; the thread is joined before the caller closes `fd`.
    """

    def __init__(self, fd: int, depth: int = READ_AHEAD_DEPTH):
        self._fd = fd
        self._free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[mmap.mmap, int] | OSError] = queue.SimpleQueue()
        self._buffers = [_take_buffer() for _ in range(depth)]
        for buf in self._buffers:
            self._free.put(buf)
        self._stopping = False
        self._thread = threading.Thread(target=self._read, name="read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopping = True
        self._free.put(None)
        self._thread.join()
        for buf in self._buffers:   # the reader has stopped and the caller is done with the blocks it was given
            _give_buffer(buf)
        self._buffers = []

    def _read(self) -> None:
        while (buf := self._free.get()) is not None and not self._stopping:
            try:
                n = os.readv(self._fd, [buf])
            except OSError as exc:
                self._full.put(exc)
                return
            self._full.put((buf, n))
            if not n:
                return

    def blocks(self) -> Iterator[memoryview]:
        """Each block read, in order; a read error is raised here, in the caller's thread."""
        while True:
            item = self._full.get()
            if isinstance(item, OSError):
                raise item
            buf, n = item
            if not n:
                return
            yield memoryview(buf)[:n]
            self._free.put(buf)  # the caller is done with this block once it asks for the next


class DirectRead:
    """Reads a file descriptor block by block in the caller's thread: for a file of at most one block, where
    there is nothing to overlap and ReadAhead's buffers and thread would cost more than the read itself.
    Reads into one pooled, page-aligned buffer (an O_DIRECT descriptor wants it aligned)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._buf: mmap.mmap | None = None

    def __enter__(self) -> DirectRead:
        self._buf = _take_buffer()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._buf is not None:
            _give_buffer(self._buf)
            self._buf = None

    def blocks(self) -> Iterator[memoryview]:
        """Each block read, in order, until end of file (a file that grew is still read to its end)."""
        assert self._buf is not None, "use DirectRead as a context manager"
        while n := os.readv(self._fd, [self._buf]):
            yield memoryview(self._buf)[:n]


def reader_for(fd: int) -> AbstractContextManager[ReadAhead | DirectRead]:
    """ReadAhead, or DirectRead when `fd` is a regular file with at most one block left to read."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size - os.lseek(fd, 0, os.SEEK_CUR) <= BLOCK:
        return DirectRead(fd)
    return ReadAhead(fd)


# A read off the disk of a file at least this large is made O_DIRECT and leaves no page cached; a smaller one reads
# through the page cache (dropped first) and leaves its pages for what reads it next (the probe of a photo's header).
DIRECT_READ_BYTES = 4 * 1024 * 1024


def open_off_disk(path: Path | os.PathLike[str]) -> int:
    """A descriptor for a read that must come off the disk (a read-back that proves a copy), its cached pages
    dropped. A file of at least `DIRECT_READ_BYTES` is opened O_DIRECT where the filesystem allows it, so the
    reads bypass the page cache (no cached page can answer them, and they leave none behind); call `done_off_disk`
    after reading."""
    flags = os.O_RDONLY
    if os.stat(path).st_size >= DIRECT_READ_BYTES:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:   # a filesystem without O_DIRECT (tmpfs before Linux 6.6, some FUSE)
                raise
        else:
            drop_cache(fd)   # frees the copy's pages now, for the next copy
            return fd
    fd = os.open(path, flags)
    drop_cache(fd)
    return fd


def done_off_disk(fd: int) -> None:
    """After reading a descriptor from `open_off_disk`: a large file read through the page cache (its filesystem
    refused O_DIRECT) is dropped from it again; a small one's pages stay for the next reader."""
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and os.fstat(fd).st_size >= DIRECT_READ_BYTES:
        drop_cache(fd)


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def hash_stream(fd: int, each: Callable[[memoryview], bool | None] | None = None, *,
                read_error: Callable[[OSError], Exception] | None = None,
                also: Sequence[Hasher] = ()) -> tuple[str | None, int]:
    """SHA-256 (hex) and size of what `fd` holds from its offset on, read ahead in 1 MiB blocks.

    `each` sees every block once it is hashed (to write a copy, pace a scrub, check an abort); when it
    returns False the stream stops and the digest is None. A read error is raised as `read_error(exc)`
    when given (what an exception raised by `each` never is), else as the OSError it was. `also` are other
    digests fed every block in the same pass (the SM3 of the 国密 suites); the caller finalises them.
    """
    digest, size = hashlib.sha256(), 0
    with reader_for(fd) as reader, Beside(also, isinstance(reader, ReadAhead)) as beside:
        blocks = reader.blocks()
        while True:
            try:
                block = next(blocks, None)
            except OSError as exc:
                if read_error is None:
                    raise
                raise read_error(exc) from exc
            if block is None:
                break
            beside.start(block)
            digest.update(block)
            size += len(block)
            try:
                if each is not None and each(block) is False:
                    return None, size
            finally:
                beside.wait()   # before the next block is asked for: the reader reuses this one's buffer
    return digest.hexdigest(), size


class Beside:
    """Feeds a block to other digests (`also`) while the caller hashes and writes it: on a thread of its own
    for a stream of several blocks (OpenSSL's SM3 is several times slower than SHA-256 with SHA extensions,
    and releases the GIL), in the caller's thread otherwise. `wait()` returns once they have it all."""

    def __init__(self, also: Sequence[Hasher], threaded: bool):
        self._also = also
        self._todo: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="digest-beside", daemon=True) \
            if also and threaded else None
        self._pending = False

    def __enter__(self) -> Beside:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (block := self._todo.get()) is not None:
            try:
                for other in self._also:
                    other.update(block)
            except BaseException as exc:   # handed to the caller's thread by wait()
                self._done.put(exc)
            else:
                self._done.put(None)

    def start(self, block: memoryview) -> None:
        if self._thread is None:
            for other in self._also:
                other.update(block)
            return
        self._todo.put(block)
        self._pending = True

    def wait(self) -> None:
        if self._pending:
            self._pending = False
            failed = self._done.get()
            if failed is not None:
                raise failed


@contextmanager
def _plain_read(path: Path | os.PathLike[str], drop: bool) -> Iterator[int]:
    """A descriptor to read `path` with; with `drop`, off the disk (`open_off_disk`, then `done_off_disk`)."""
    fd = open_off_disk(path) if drop else os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        if drop:
            done_off_disk(fd)
        os.close(fd)


def hash_file(path: Path | os.PathLike[str], *, drop: bool = False, also: Sequence[Hasher] = ()) -> tuple[str, int]:
    """SHA-256 and size of a file; with `drop`, the bytes come off the disk (`open_off_disk`: its cached pages
    dropped first, and a large file read O_DIRECT) and a large file's read leaves nothing in the page cache.
    `also`: other digests fed the same bytes in the same pass."""
    with _plain_read(path, drop) as fd:
        digest, size = hash_stream(fd, also=also)
    assert digest is not None
    return digest, size


def hash_stored(path: Path | os.PathLike[str], file_id: str, at_rest: AtRest,
                each: Callable[[memoryview], bool | None] | None = None, *,
                drop: bool = False, also: Sequence[Hasher] = ()) -> tuple[str | None, int]:
    """SHA-256 and size of the plaintext of a stored (or staging) copy of `file_id`, encrypted or not (its name
    says: edge_agent/atrest.py), as `hash_stream` with `each` and `also`; `drop` as in `hash_file`. An encrypted
    copy whose block fails authentication raises `atrest.Tampered` naming the block."""
    if not is_encrypted(path):
        with _plain_read(path, drop) as fd:
            return hash_stream(fd, each, also=also)
    digest, size = hashlib.sha256(), 0
    with at_rest.reader(path, file_id) as reader:
        try:
            if drop:
                drop_cache(reader.fileno())
            for block in reader.blocks():
                digest.update(block)
                for other in also:
                    other.update(block)
                size += len(block)
                if each is not None and each(block) is False:
                    return None, size
        finally:
            if drop:
                done_off_disk(reader.fileno())
    return digest.hexdigest(), size


# The span `fingerprint` hashes at each end of a file.
FINGERPRINT_SPAN = 1 << 20


def fingerprint(path: Path | os.PathLike[str]) -> str:
    """The cheap identity of a file's content: `<size>:<SHA-256 of its first and last MiB>` (the whole file when
    it is at most 2 MiB). Two files with other fingerprints hold other bytes; equal fingerprints are confirmed
    with the full SHA-256 before anything relies on them. Reads at most 2 MiB; symlinks are not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256()
        for offset in (0, max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN)):
            wanted = min(FINGERPRINT_SPAN, max(size - offset, 0))
            while wanted > 0:
                block = os.pread(fd, wanted, offset)
                if not block:
                    break
                digest.update(block)
                offset, wanted = offset + len(block), wanted - len(block)
    finally:
        os.close(fd)
    return f"{size}:{digest.hexdigest()}"


def fingerprint_covers_all(size: int) -> bool:
    """True if a file of `size` bytes is hashed whole by `fingerprint` (equal fingerprints: equal bytes)."""
    return size <= 2 * FINGERPRINT_SPAN


def confirmed_fingerprint(fp: str, sha256: str) -> str:
    """The fingerprint a row keeps when its content shares `fp` with other content: `<fp>+<full SHA-256>`.
    Its `fingerprint_base` is still `fp`, so lookups by fingerprint find it; the suffix tells the twins apart."""
    return f"{fp}+{sha256}"


def fingerprint_base(stored: str) -> str:
    """The `fingerprint` part of a stored fingerprint (see `confirmed_fingerprint`)."""
    return stored.partition("+")[0]


def fingerprint_sha256(stored: str) -> str | None:
    """The full SHA-256 a confirmed fingerprint carries, None for a plain one."""
    return stored.partition("+")[2] or None
