"""Durability primitives: the write -> fsync file -> fsync directory protocol.

Every state change in the catalog is recorded only after the bytes it describes
went through one of these functions. A batch of small files groups the work (`SyncGroup`,
`atomic_write_many`): every file is written, then all are made durable by one
syncfs of their filesystem, renamed, and the directories made durable by another.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BLOCK = 1024 * 1024

_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True) if hasattr(ctypes.CDLL(None), "sync_file_range") else None

# Directories this process made or found whose entry in their parent is durable (see `DirSync.ensure`).
_durable_dirs: set[Path] = set()
_dirs_lock = threading.Lock()


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a create, rename or unlink inside `path`) durable."""
    _fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Start writing a range of dirty pages to disk without waiting (Linux sync_file_range; nbytes 0: to the
    end), so the disk writes while the caller goes on and the closing fsync has little left to do."""
    if _libc is not None:
        _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE)


def _kernel_reports_syncfs_errors() -> bool:
    """syncfs(2) returns the writeback errors of the filesystem's files since Linux 5.8; before, it did not."""
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


_SYNCFS = _libc is not None and hasattr(_libc, "syncfs") and _kernel_reports_syncfs_errors()


class SyncGroup:
    """The durability of one batch: the files it wrote (`file`), the directories it made (`ensure`) and the
    directories whose entries it changed (`touch`) are noted, then `sync` makes all of them durable before
    it returns; nothing is promised before. Use as a context manager.

    `grouped` (a batch of several files): everything noted on the filesystem of `anchor` is made durable by
    ONE syncfs(2) of that filesystem instead of one fsync per file and directory; the kernel reports through
    it the writeback error of any file there since the group opened (Linux >= 5.8, else each is fsynced).
    Paths on another filesystem, and every path when not grouped, are fsynced one by one (each once)."""

    def __init__(self, anchor: Path, *, grouped: bool = False):
        self._files: dict[Path, None] = {}     # ordered sets
        self._parents: dict[Path, None] = {}
        self._touched: dict[Path, None] = {}
        self._ensured: list[Path] = []
        self.created: list[Path] = []
        self._fd: int | None = None
        self._dev = -1
        if grouped and _SYNCFS:
            # Opened before anything is written: syncfs reports the errors seen since this open.
            self._fd = os.open(_existing(Path(os.path.abspath(anchor))), os.O_RDONLY | os.O_DIRECTORY)
            self._dev = os.fstat(self._fd).st_dev

    @property
    def whole_filesystem(self) -> bool:
        """`sync` flushes the anchor's whole filesystem (one syncfs), not only what was noted."""
        return self._fd is not None

    def __enter__(self) -> SyncGroup:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def file(self, path: Path) -> None:
        """`path` was written: make its content durable at `sync`."""
        self._files[path] = None

    def ensure(self, path: Path, mode: int = 0o777) -> Path:
        """Make `path` and its missing parents now (`mode` to mkdir; the umask applies); their entries become
        durable at `sync`. A directory this process has not made durable itself gets its parent synced too:
        another thread (or process) may have made it and not synced yet."""
        path = Path(os.path.abspath(path))
        if path in _durable_dirs and path.is_dir():
            return path
        with _dirs_lock:
            missing, probe = [], path
            while not probe.is_dir():
                missing.append(probe)
                probe = probe.parent
            for new in reversed(missing):
                try:
                    new.mkdir(mode=mode)
                    self.created.append(new)
                except FileExistsError:
                    if not new.is_dir():
                        raise
                self._parents[new.parent] = None
            self._parents[path.parent] = None
        self._ensured.append(path)
        return path

    def touch(self, path: Path) -> None:
        """`path` (a directory) had an entry created, renamed or removed: fsync it at `sync`."""
        self._touched[Path(os.path.abspath(path))] = None

    def sync(self) -> None:
        """Make every noted file and directory durable: one syncfs for those on the anchor's filesystem when
        grouped, one fsync of each otherwise (files first, then outer directories, each once)."""
        dirs = [*self._parents, *(p for p in self._touched if p not in self._parents)]
        pending: list[tuple[Path, bool]] = [(p, False) for p in self._files] + [(p, True) for p in dirs]
        if self._fd is not None and pending:
            pending = [(p, is_dir) for p, is_dir in pending if os.stat(p).st_dev != self._dev]
            if _libc.syncfs(self._fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of the filesystem of the batch: {os.strerror(err)}")
        for path, is_dir in pending:
            if is_dir:
                fsync_dir(path)
            else:
                fsync_file(path)
        with _dirs_lock:
            _durable_dirs.update(self._ensured)
        for noted in (self._files, self._parents, self._touched):
            noted.clear()
        self._ensured.clear()


def _existing(path: Path) -> Path:
    while not path.is_dir():
        path = path.parent
    return path


def fsync_file(path: Path) -> None:
    """Make the content of the file at `path` durable."""
    _fsync_path(path, os.O_RDONLY)


def make_dirs(path: Path, mode: int = 0o777) -> list[Path]:
    """Make `path` and any missing parent, each one's entry durable in its parent (the parent fsynced after
    the mkdir) before returning, so a file later made durable inside cannot be lost with its directory.
    Returns the directories created, outermost first. `mode` as for `Path.mkdir` (the umask applies)."""
    with SyncGroup(path) as group:
        group.ensure(path, mode)
        group.sync()
    return group.created


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write_many(entries: list[tuple[Path, bytes, int]], group: SyncGroup | None = None) -> None:
    """Write each (path, data, mode) so that a crash leaves either the old or the new content of each: all
    are written to temporary files (writeback started) and made durable together, then renamed over their
    paths and their directories made durable together (missing ones made first). With `group` the last
    step is left to the caller's `group.sync()`, to be grouped with more of its own."""
    if not entries:
        return
    own = group is None
    if group is None:
        group = SyncGroup(entries[0][0].parent, grouped=len(entries) > 1)
    try:
        temps = write_temps(entries, group)
        try:
            group.sync()
            replace_temps(temps, group)
        except BaseException:
            discard_temps(temps)
            raise
        if own:
            group.sync()
    finally:
        if own:
            group.__exit__()


def write_temps(entries: list[tuple[Path, bytes, int]], group: SyncGroup) -> list[tuple[Path, Path]]:
    """The first half of `atomic_write_many`: each (path, data, mode) written to a temporary file beside
    `path` (writeback started, noted in `group`); returns the (temporary, path) pairs for `replace_temps`
    once `group.sync()` has made them durable. Nothing is renamed: a crash leaves every path as it was."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in entries:
            group.ensure(path.parent)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            temps.append((tmp, path))
            try:
                _write_fd(fd, data)
                start_writeback(fd)
            finally:
                os.close(fd)
            group.file(tmp)
    except BaseException:
        discard_temps(temps)
        raise
    return temps


def replace_temps(temps: list[tuple[Path, Path]], group: SyncGroup) -> None:
    """The second half: rename each durable temporary over its path, in order; the directories are made
    durable at the caller's next `group.sync()`."""
    for tmp, path in temps:
        os.replace(tmp, path)
        group.touch(path.parent)


def discard_temps(temps: list[tuple[Path, Path]]) -> None:
    for tmp, _ in temps:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content; a missing parent
    directory is made durably first."""
    atomic_write_many([(path, data, mode)])


def drop_cache(fd: int) -> None:
    """Ask the kernel to forget the cached pages of a file: before a read-back of an fsynced copy, so it hits the
    disk; after a file streamed once (a recorder's file copied, a copy read back), so the next file's pages reuse
    these instead of new memory (in a VM that hands freed memory back to its host, each new page costs a fault in
    the host: ingest spent about half its CPU there, docs/BENCHMARKS.md "Ingest speed"). Dirty pages are kept."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        # Not every filesystem honours the advice (tmpfs, FUSE); the read-back is still a real read.
        pass


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing, its directory too), waiting for other holders:
    processes sharing a store take turns; the kernel releases it when the holder dies."""
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        os.close(fd)   # closing releases the lock


def lock_file(path: Path, *, wait: bool) -> int | None:
    """An exclusive flock on `path` (created if missing, its directory too): the descriptor holding it (close
    it to release), or None when another holder has it and `wait` is False."""
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
