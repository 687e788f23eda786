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
