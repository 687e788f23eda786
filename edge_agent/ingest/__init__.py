"""Ingest: stage -> hash -> verify -> seal (DESIGN.md section 2).

`Ingestor.stage` copies a source file into staging/ computing SHA-256 in the
same pass, fsyncs it, drops it from the page cache and reads it back to prove
the copy, then renames it into store/ and only then records `staged`.
`Sealer.seal` writes and signs the manifest, links it into the agent's
document chain and records `sealed`. Memory stays flat: everything streams in
1 MiB blocks. `Ingestor.recover` puts the store back in line with the catalog
after a crash.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from edge_agent.catalog import STORED_FILES, Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.digest import hash_file, hash_stream
from edge_agent.durable import fsync_dir
from edge_agent.evidence.manifest import GENESIS_PREV, MANIFEST_VERSION, AgentKey, write_document
from edge_agent.layout import StoreLayout

log = logging.getLogger(__name__)

CHUNK_SIZE_DEFAULT = 256 * 1024
# Dirty pages of a copy are sent to disk every this many bytes, not all at the closing fsync.
WRITEBACK_STEP = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True) if hasattr(ctypes.CDLL(None), "sync_file_range") else None
# errno values that mean "the recorder went away" rather than "this file is bad".
_GONE = {errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ENOTCONN, errno.EIO}


class IngestError(Exception):
    """Base of the ways an ingest can stop; the message says what to do."""


class IntakePaused(IngestError):
    """No room to take more data: intake waits, nothing is deleted to make room for it."""


class SourceGone(IngestError):
    """The source vanished or changed mid-copy (recorder pulled, file rewritten); retry when it is back."""


class SourceUnreadable(IngestError):
    """The source file cannot be read (permissions, bad sectors); it is kept and retried on next dock."""


class CopyMismatch(IngestError):
    """The read-back of the staged copy did not match the bytes read from the source."""


def iso_ms(ms: int | None, tz: ZoneInfo) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="milliseconds")


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


class Sealer:
    """Signs documents and links them into the agent's single hash chain, one at a time."""

    def __init__(self, catalog: Catalog, key: AgentKey, layout: StoreLayout, config: AgentConfig):
        self.catalog = catalog
        self.key = key
        self.layout = layout
        self.config = config
        self.tz = config.agent.zone
        self._lock = threading.Lock()
        # Per file kind, more manifest keys (a camera segment's location and the gaps before it), so that
        # a file sealed by crash recovery carries them too.
        self.extra_keys: dict[str, Callable[[FileRecord], dict[str, Any]]] = {}

    def _head(self) -> tuple[int, str]:
        head = self.catalog.meta_get("chain_head")
        if head is None:
            return 0, GENESIS_PREV
        seq, _, digest = head.partition(":")
        return int(seq), digest

    def _chain(self, conn: Any, seq: int, kind: str, doc_id: str, digest: str, prev: str, path: Path) -> None:
        conn.execute(
            "INSERT INTO documents (seq, kind, doc_id, sha256, prev, path, created_ms) VALUES (?,?,?,?,?,?,?)",
            (seq, kind, doc_id, digest, prev, str(path.relative_to(self.layout.data_dir)), now_ms()),
        )
        self.catalog.meta_set(conn, "chain_head", f"{seq}:{digest}")

    def manifest_body(self, record: FileRecord, media: dict[str, Any]) -> dict[str, Any]:
        agent = self.config.agent
        model, serial = self._device(record.device_id)
        return {
            "v": MANIFEST_VERSION,
            "type": "file",
            "file_id": record.file_id,
            "agent_id": agent.id, "site_id": agent.site, "unit": agent.unit,
            "source": {
                "kind": record.kind, "device_id": record.device_id, "model": model,
                "serial": serial, "slot": record.slot, "dock": record.dock,
                "original_path": record.original_path, "volume_label": record.volume_label,
            },
            "officer_id": record.officer_id, "case_id": record.case_id, "party": record.party,
            "recorded_start": iso_ms(record.recorded_start_ms, self.tz),
            "recorded_end": iso_ms(record.recorded_end_ms, self.tz),
            "recorded_start_ms": record.recorded_start_ms, "recorded_end_ms": record.recorded_end_ms,
            "ingested_at": iso_ms(record.ingested_at_ms, self.tz),
            "clock_offset_ms": record.clock_offset_ms,
            "size": record.size, "sha256": record.sha256,
            "chunk_size": self.config.mqtt.chunk_kib * 1024,
            "media": media,
            "retention": record.retention,
        }

    def _device(self, device_id: str) -> tuple[str | None, str | None]:
        """The device's model and serial as the catalog knows them."""
        rows = self.catalog.query("SELECT model, serial FROM devices WHERE device_id = ?", (device_id,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def seal(self, record: FileRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """staged -> sealed: sign the manifest, write it durably, then record it. Returns the manifest."""
        media = _loads(record.media) if record.media else {}
        body = self.manifest_body(record, media)
        if record.kind in self.extra_keys:
            body.update(self.extra_keys[record.kind](record))
        if extra:
            body.update(extra)
        path = self.layout.manifest_path(record.file_id)
        # The write transaction is held while the document is written, so the chain stays linear even
        # when another process (a custodian's CLI) signs at the same time.
        with self._lock, self.catalog.transaction() as conn:
            seq, prev = self._head()
            doc = self.key.sign({**body, "prev": prev})
            data = write_document(path, doc)
            digest = hashlib.sha256(data).hexdigest()
            self._chain(conn, seq + 1, "file", record.file_id, digest, prev, path)
            self.catalog.transition(record.file_id, State.SEALED, expect=State.STAGED, actor="edge-agent",
                                    manifest_sha256=digest, audit_detail={"manifest_sha256": digest})
        return doc

    def sign_document(self, kind: str, doc_id: str, body: dict[str, Any], path: Path,
                      after: Any = None) -> dict[str, Any]:
        """Sign and chain a session manifest or annotation. `after(conn)` runs in the same transaction."""
        with self._lock, self.catalog.transaction() as conn:
            seq, prev = self._head()
            doc = self.key.sign({"v": MANIFEST_VERSION, "type": kind, "agent_id": self.config.agent.id,
                                 **body, "prev": prev})
            data = write_document(path, doc)
            digest = hashlib.sha256(data).hexdigest()
            self._chain(conn, seq + 1, kind, doc_id, digest, prev, path)
            if after is not None:
                after(conn, digest)
        return doc

    def seal_session(self, session_id: str) -> dict[str, Any] | None:
        """Sign the batch manifest of one docking session: every file it brought, with hash and size."""
        rows = self.catalog.query(
            "SELECT file_id, original_path, sha256, size, state FROM files WHERE session_id = ? ORDER BY file_id",
            (session_id,))
        session = self.catalog.query("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        if not session:
            return None
        s = session[0]
        sealed = [r for r in rows if r["sha256"] is not None and r["state"] not in ("discovered", "staged")]
        body = {
            "session_id": session_id, "dock": s["dock"], "slot": s["slot"], "device_id": s["device_id"],
            "serial": s["serial"], "model": s["model"], "officer_id": s["officer_id"],
            "docked_at": iso_ms(s["docked_ms"], self.tz),
            "files": [{"file_id": r["file_id"], "sha256": r["sha256"], "size": r["size"],
                       "original_path": r["original_path"]} for r in sealed],
            "files_not_sealed": [r["original_path"] for r in rows if r not in sealed],
        }
        path = self.layout.session_manifest_path(session_id)

        def record(conn: Any, digest: str) -> None:
            conn.execute("UPDATE sessions SET manifest_sha256 = ?, files_total = ? WHERE session_id = ?",
                         (digest, len(rows), session_id))

        return self.sign_document("session", session_id, body, path, after=record)


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


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
        rows = self.catalog.query(
            f"SELECT COALESCE(SUM(size), 0) FROM files INDEXED BY files_stored_size WHERE {STORED_FILES}")
        return int(rows[0][0])

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

    def stage(self, record: FileRecord, source: Path, abort: Callable[[], bool] | None = None) -> FileRecord:
        """discovered -> staged: copy with SHA-256 in one pass, fsync, read back, move into the store."""
        size_hint = record.source_size or 0
        self._reserve(size_hint)
        staging = self.layout.staging_path(record.file_id)
        try:
            digest, size = self._copy(source, staging, record, abort)
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
            _unlink_quietly(staging)
            raise
        finally:
            self._release(size_hint)
        media = probe_media(final)
        media_json = json.dumps(media, ensure_ascii=False, sort_keys=True)
        end_ms = record.recorded_end_ms
        if end_ms is None and record.recorded_start_ms is not None and "duration_ms" in media:
            end_ms = record.recorded_start_ms + media["duration_ms"]
        return self.catalog.transition(
            record.file_id, State.STAGED, expect=State.DISCOVERED, actor="edge-agent",
            sha256=digest, size=size, store_path=str(final.relative_to(self.layout.data_dir)),
            media=media_json, ingested_at_ms=now_ms(), recorded_end_ms=end_ms, last_error=None,
            audit_detail={"sha256": digest, "size": size},
        )

    def _copy(self, source: Path, staging: Path, record: FileRecord,
              abort: Callable[[], bool] | None) -> tuple[str, int]:
        try:
            src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise self._source_error(exc, record) from exc
        try:
            before = os.fstat(src)
            if (record.source_size is not None and before.st_size != record.source_size) or (
                    record.source_mtime_ns is not None and before.st_mtime_ns != record.source_mtime_ns):
                raise SourceGone(f"{record.original_path}: changed on the recorder since it was listed; "
                                 "it will be listed again")
            dst = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                digest, size = self._pump(src, dst, record, abort)
                os.fsync(dst)
            finally:
                os.close(dst)
            after = os.fstat(src)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != before.st_size:
                raise SourceGone(f"{record.original_path}: changed on the recorder during the copy; retried")
        finally:
            os.close(src)
        return digest, size

    def _pump(self, src: int, dst: int, record: FileRecord, abort: Callable[[], bool] | None) -> tuple[str, int]:
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

        digest, size = hash_stream(src, write, read_error=lambda exc: self._source_error(exc, record))
        assert digest is not None  # `write` never stops the stream, it raises
        return digest, size

    @staticmethod
    def _source_error(exc: OSError, record: FileRecord) -> IngestError:
        if exc.errno in _GONE:
            return SourceGone(f"{record.original_path}: source went away ({exc.strerror}); "
                              "the partial copy was discarded, it resumes when the recorder is back")
        return SourceUnreadable(f"{record.original_path}: cannot read ({exc.strerror}); kept on the recorder, "
                                "retried at next dock; check the recorder's storage")

    def ingest(self, record: FileRecord, source: Path, abort: Callable[[], bool] | None = None) -> FileRecord:
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
            if not _disk_full(exc):
                raise
            raise IntakePaused(f"disk full while recording {record.original_path} ({exc}); intake paused, "
                               "nothing half-done was kept; it resumes when space returns") from exc
        return record

    # -- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Bring the store in line with the catalog after any stop. Returns what was done."""
        self.layout.create()
        done = {"partials_removed": 0, "orphans_removed": 0, "resealed": 0}
        for part in self.layout.staging.glob("*.part"):
            _unlink_quietly(part)
            done["partials_removed"] += 1
        if done["partials_removed"]:
            fsync_dir(self.layout.staging)
        for record in self.catalog.files(states=[State.DISCOVERED]):
            orphan = self.layout.media_path(record.file_id, Path(record.original_path).suffix)
            if orphan.exists():  # renamed into the store, but the row was never written: redo from source
                _unlink_quietly(orphan)
                fsync_dir(orphan.parent)
                done["orphans_removed"] += 1
        for record in self.catalog.files(states=[State.STAGED]):
            stored = self.layout.data_dir / (record.store_path or "")
            if record.store_path and stored.is_file() and record.sha256:
                self.sealer.seal(record)
                done["resealed"] += 1
            else:
                self.catalog.transition(record.file_id, State.DISCOVERED, expect=State.STAGED,
                                        actor="edge-agent", reason="staged copy missing after restart; recopy",
                                        sha256=None, size=None, store_path=None)
        if any(done.values()):
            log.info("recovered %s", " ".join(f"{k}={v}" for k, v in done.items()))
        return done


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
