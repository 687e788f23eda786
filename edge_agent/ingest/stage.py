"""Staging: copy a source file into the store, hashing it in the same pass, and prove the copy.

`Ingestor.stage` copies into staging/ computing SHA-256 as it goes (`edge_agent.digest.hash_stream`, the
one streaming hash), fsyncs, drops the copy from the page cache and reads it back to prove it, then
renames it into store/ and only then records `staged`. Memory stays flat: everything streams in 1 MiB
blocks. `Ingestor.ingest` stages and seals one file; `Ingestor.recover` runs crash recovery.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.digest import hash_file, hash_stream
from edge_agent.durable import fsync_dir
from edge_agent.ingest.errors import (
    CopyMismatch,
    IngestError,
    IntakePaused,
    SourceGone,
    SourceUnreadable,
    disk_full,
)
from edge_agent.ingest.recover import recover, unlink_quietly
from edge_agent.ingest.seal import Sealer
from edge_agent.layout import StoreLayout
from edge_agent.protocol.canonical import canonical_json

# Dirty pages of a copy are sent to disk every this many bytes, not all at the closing fsync.
WRITEBACK_STEP = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True) if hasattr(ctypes.CDLL(None), "sync_file_range") else None
# errno values that mean "the recorder went away" rather than "this file is bad".
_GONE = {errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ENOTCONN, errno.EIO}

Abort = Callable[[], bool]


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range of dirty pages to disk without waiting (Linux sync_file_range), so the disk
    writes a copy while it is still being made and the closing fsync has little left to do."""
    if _libc is not None:
        _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, view: memoryview, record: FileRecord) -> None:
    written, n = 0, len(view)
    try:
        while written < n:
            written += os.write(fd, view[written:])
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise IntakePaused(f"disk full while copying {record.original_path}; intake paused, the "
                               "partial copy was discarded and nothing else was touched") from exc
        raise


def probe_media(path: Path) -> dict[str, Any]:
    """Container, duration and codec of a media file, without decoding; never raises."""
    container = path.suffix.lower().lstrip(".") or "bin"
    media: dict[str, Any] = {"container": container}
    if container in ("bin", "txt", "ini", "json", "log"):
        return media
    import av  # local: PyAV loads FFmpeg, which the CLI's small commands do not need

    try:
        with av.open(str(path), metadata_errors="ignore") as probe:
            if probe.duration is not None:
                media["duration_ms"] = int(probe.duration // 1000)
            video = next(iter(probe.streams.video), None)
            audio = next(iter(probe.streams.audio), None)
            stream = video if video is not None else audio
            # A stream FFmpeg has no decoder for (found by the crash suite in random bytes) has no codec context.
            context = stream.codec_context if stream is not None else None
            if context is not None:
                media["codec"] = context.name
                if stream is video and context.width:
                    media["width"], media["height"] = context.width, context.height
    except (av.FFmpegError, OSError, ValueError) as exc:
        media["probe_error"] = str(exc)[:200]
    return media


def source_error(exc: OSError, record: FileRecord) -> IngestError:
    """What a failed read of the source means: the recorder went away, or this file cannot be read."""
    if exc.errno in _GONE:
        return SourceGone(f"{record.original_path}: source went away ({exc.strerror}); "
                          "the partial copy was discarded, it resumes when the recorder is back")
    return SourceUnreadable(f"{record.original_path}: cannot read ({exc.strerror}); kept on the recorder, "
                            "retried at next dock; check the recorder's storage")


def _changed(record: FileRecord, st: os.stat_result) -> bool:
    """The source is not the file the catalog listed (size or mtime differ)."""
    return (record.source_size is not None and st.st_size != record.source_size) or (
        record.source_mtime_ns is not None and st.st_mtime_ns != record.source_mtime_ns)


def _pump(src: int, dst: int, record: FileRecord, abort: Abort | None) -> tuple[str, int]:
    """Stream `src` into `dst`, hashing; writeback starts as it goes, `abort()` stops it."""
    flushed = written = 0

    def write(view: memoryview) -> None:
        nonlocal flushed, written
        if abort is not None and abort():
            raise SourceGone(f"{record.original_path}: recorder undocked during the copy; the partial "
                             "copy was discarded, it resumes when the recorder is back")
        _write_all(dst, view, record)
        written += len(view)
        if written - flushed >= WRITEBACK_STEP:
            start_writeback(dst, flushed, written - flushed)
            flushed = written

    digest, size = hash_stream(src, write, read_error=lambda exc: source_error(exc, record))
    assert digest is not None  # `write` never stops the stream, it raises
    return digest, size


def copy_hashing(source: Path, staging: Path, record: FileRecord, abort: Abort | None) -> tuple[str, int]:
    """Copy `source` to `staging` (fsynced) and return (sha256, size) of the bytes read; SourceGone if the
    source is not, or stops being, the file the catalog listed."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise source_error(exc, record) from exc
    try:
        before = os.fstat(src)
        if _changed(record, before):
            raise SourceGone(f"{record.original_path}: changed on the recorder since it was listed; "
                             "it will be listed again")
        dst = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            digest, size = _pump(src, dst, record, abort)
            os.fsync(dst)
        finally:
            os.close(dst)
        after = os.fstat(src)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != before.st_size:
            raise SourceGone(f"{record.original_path}: changed on the recorder during the copy; retried")
    finally:
        os.close(src)
    return digest, size


class Ingestor:
    """Copies sources into the store and seals them; safe to call from several dock threads at once."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, sealer: Sealer, config: AgentConfig):
        self.catalog = catalog
        self.layout = layout
        self.sealer = sealer
        self.config = config
        self._reserve_lock = threading.Lock()
        self._reserved = 0  # bytes being copied right now, so parallel copies do not overbook the disk

    # -- space ----------------------------------------------------------------------------------

    def store_bytes(self) -> int:
        return self.catalog.files.stored_bytes()

    def _reserve(self, size: int) -> None:
        limit = int(self.config.agent.max_disk_gb * 1024**3)
        min_free = self.config.agent.min_free_mb * 1024**2
        with self._reserve_lock:
            used = self.store_bytes() + self._reserved
            free = self.layout.disk_usage().free - self._reserved
            if used + size > limit:
                raise IntakePaused(
                    f"store would exceed max_disk_gb={self.config.agent.max_disk_gb} "
                    f"({used + size} bytes); intake paused until synced files are purged or the limit is raised")
            if free - size < min_free:
                raise IntakePaused(
                    f"disk nearly full ({free // 1024**2} MiB free, {size // 1024**2} MiB needed, "
                    f"min_free_mb={self.config.agent.min_free_mb}); intake paused until space returns")
            self._reserved += size

    def _release(self, size: int) -> None:
        with self._reserve_lock:
            self._reserved -= size

    # -- stage ----------------------------------------------------------------------------------

    def stage(self, record: FileRecord, source: Path, abort: Abort | None = None) -> FileRecord:
        """discovered -> staged: copy with SHA-256 in one pass, fsync, read back, move into the store."""
        size_hint = record.source_size or 0
        self._reserve(size_hint)
        try:
            final, digest, size = self._copy_into_store(record, source, abort)
        finally:
            self._release(size_hint)
        media = probe_media(final)
        end_ms = record.recorded_end_ms
        if end_ms is None and record.recorded_start_ms is not None and "duration_ms" in media:
            end_ms = record.recorded_start_ms + media["duration_ms"]
        return self.catalog.transition(
            record.file_id, State.STAGED, expect=State.DISCOVERED, actor="edge-agent",
            sha256=digest, size=size, store_path=str(final.relative_to(self.layout.data_dir)),
            media=canonical_json(media).decode("utf-8"), ingested_at_ms=now_ms(),
            recorded_end_ms=end_ms, last_error=None, audit_detail={"sha256": digest, "size": size},
        )

    def _copy_into_store(self, record: FileRecord, source: Path, abort: Abort | None) -> tuple[Path, str, int]:
        """Copy, read back, and rename into the store durably; the staging copy never outlives a failure."""
        staging = self.layout.staging_path(record.file_id)
        try:
            digest, size = copy_hashing(source, staging, record, abort)
            if self.config.agent.verify_readback:
                check, check_size = hash_file(staging, drop=True)
                if (check, check_size) != (digest, size):
                    raise CopyMismatch(
                        f"{record.original_path}: read-back of the staged copy differs from the source "
                        f"(disk or memory fault?); the copy was discarded and will be retried")
            final = self.layout.media_path(record.file_id, Path(record.original_path).suffix)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(staging, 0o444)
            os.replace(staging, final)
            fsync_dir(final.parent)
            fsync_dir(self.layout.staging)
        except BaseException:
            unlink_quietly(staging)
            raise
        return final, digest, size

    def ingest(self, record: FileRecord, source: Path, abort: Abort | None = None) -> FileRecord:
        """Stage and seal one discovered file. Raises an IngestError subclass when it cannot."""
        try:
            if record.state == State.DISCOVERED:
                record = self.stage(record, source, abort)
            if record.state == State.STAGED:
                self.sealer.seal(record)
                record = self.catalog.get(record.file_id)
        except (OSError, sqlite3.OperationalError) as exc:
            # The disk filled after the copy (manifest or catalog write): nothing was recorded, so the next
            # pass redoes this file from where the catalog says it is.
            if not disk_full(exc):
                raise
            raise IntakePaused(f"disk full while recording {record.original_path} ({exc}); intake paused, "
                               "nothing half-done was kept; it resumes when space returns") from exc
        return record

    # -- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Bring the store in line with the catalog after any stop (see `ingest.recover`)."""
        return recover(self.catalog, self.layout, self.sealer)
