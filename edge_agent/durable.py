"""Durability primitives: the write -> fsync file -> fsync directory protocol.

Every state change in the catalog is recorded only after the bytes it describes
went through one of these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a directory entry (a create, rename or unlink inside `path`) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path) -> None:
    """Create `path` and any missing parents (like `mkdir(parents=True, exist_ok=True)`), and make each
    directory it created durable in its parent: a crash cannot lose a directory a file was then written in."""
    path = Path(path)
    created: list[Path] = []
    at = path
    while not at.is_dir():
        created.append(at)
        at = at.parent
    for directory in reversed(created):
        try:
            directory.mkdir()
        except FileExistsError:   # another process made it meanwhile (synced here too: it may not live to)
            if not directory.is_dir():
                raise
        fsync_dir(directory.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def drop_cache(fd: int) -> None:
    """Ask the kernel to forget cached pages of an fsynced file, so a read-back hits the disk."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        # Not every filesystem honours the advice (tmpfs, FUSE); the read-back is still a real read.
        pass
