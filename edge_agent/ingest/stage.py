"""Staging: copy a source file into the store, hashing it in the same pass, and prove the copy.

`Ingestor.stage` copies into staging/ computing SHA-256 as it goes (`edge_agent.digest.hash_stream`, the
one streaming hash), fsyncs, drops the copy from the page cache and reads it back to prove it, then
renames it into store/ and only then records `staged`. Memory stays flat: everything streams in 1 MiB
blocks. `Ingestor.ingest` stages and seals one file; `Ingestor.recover` runs crash recovery.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.atrest import AtRest, AtRestError, BlockWriter, PlainFile, is_encrypted
from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.digest import Hasher, hash_stored, hash_stream
from edge_agent.durable import SyncGroup, drop_cache, start_writeback
from edge_agent.evidence.suites import DEFAULT_SUITE, sm3_hasher
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
# A recorder's file at least this large is dropped from the page cache once copied (its pages then serve the next
# copy). Not a smaller one: dropping pages just read can make the kernel drain every CPU's page lists (a fixed
# cost of a fraction of a millisecond, 18 % of a small-file import), for pages that matter little.
DROP_SOURCE_BYTES = 4 * 1024 * 1024
# errno values that mean "the recorder went away" rather than "this file is bad".
_GONE = {errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ESTALE, errno.ENOTCONN, errno.EIO}

Abort = Callable[[], bool]
Item = tuple[FileRecord, Path]   # a catalog row (discovered or staged) and its source file


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


# Files that are not media: nothing to probe.
_NOT_MEDIA = {"bin", "txt", "ini", "json", "log", "gps", "nmea", "xml", "csv", "cfg", "dat", "sha256", "md5"}
# Still images: their header says codec and size; PyAV (FFmpeg's image2 demuxer) would cost a probe per photo
# and invent a 40 ms duration.
_STILLS = {"jpg": "mjpeg", "jpeg": "mjpeg", "png": "png"}
# How much of a still image's head is read for its size (a JPEG's EXIF thumbnail can come before its frame).
_STILL_HEAD = 128 * 1024
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT (C4), JPG (C8), DAC (CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, None if `head` does not reach a valid one."""
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", head, i + 5)
            return (width, height) if width and height else None
        if marker == 0xDA or marker == 0xD9:   # scan data or end before any frame header
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        i += 2 + struct.unpack_from(">H", head, i + 2)[0]
    return None


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or len(head) < 24:
        return None
    width, height = struct.unpack_from(">II", head, 16)
    return (width, height) if width and height else None


def _probe_still(path: Path, media: dict[str, Any], plain: Callable[[], PlainFile] | None = None) -> dict[str, Any]:
    """Codec and size of a still image from its header (no FFmpeg); a header that is not the image its name
    says is a `probe_error`, as FFmpeg's would be."""
    codec = _STILLS[media["container"]]
    try:
        with (plain() if plain is not None else open(path, "rb")) as f:
            head = f.read(_STILL_HEAD)
    except (OSError, AtRestError) as exc:
        media["probe_error"] = str(exc)[:200]
        return media
    size = _jpeg_size(head) if codec == "mjpeg" else _png_size(head)
    if size is None:
        media["probe_error"] = f"no {codec} image header with a size in the first {_STILL_HEAD} bytes"
        return media
    media["codec"] = codec
    media["width"], media["height"] = size
    return media


def probe_media(path: Path, plain: Callable[[], PlainFile] | None = None) -> dict[str, Any]:
    """Container, duration and codec of a media file, without decoding; never raises. Still images are
    read from their header (codec and size, no duration); other media through PyAV. `plain`: opens the
    plaintext of an encrypted stored copy at `path` (edge_agent/atrest.py)."""
    container = path.suffix.lower().lstrip(".") or "bin"
    media: dict[str, Any] = {"container": container}
    if container in _NOT_MEDIA:
        return media
    if container in _STILLS:
        return _probe_still(path, media, plain)
    import av  # local: PyAV loads FFmpeg, which the CLI's small commands do not need

    try:
        with (plain() if plain is not None else nullcontext(str(path))) as source, \
                av.open(source, metadata_errors="ignore") as probe:
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
            media["tracks"] = [_track(s) for s in probe.streams]
    except (av.FFmpegError, OSError, ValueError, AtRestError) as exc:
        media["probe_error"] = str(exc)[:200]
    return media


def _track(stream: Any) -> dict[str, Any]:
    """One stream of a media file: kind and codec; resolution and frame rate, or sample rate and channels;
    `original_codec` when the recorder stored it in a lossless form of what the camera sent."""
    context = stream.codec_context
    if stream.metadata.get("ORIGINAL_KIND") == "data":
        # A camera's data stream (ONVIF metadata) the recorder kept in a text track, payloads unchanged; FFmpeg
        # names no codec for it (drivers/rtsp.py, docs/CAMERAS.md "Metadata tracks").
        return {"kind": "data", "codec": None, "stored_as": context.name if context is not None else None}
    track: dict[str, Any] = {"kind": stream.type, "codec": context.name if context is not None else None}
    if context is not None and stream.type == "video":
        rate = stream.average_rate or stream.guessed_rate
        # A string fraction as ffprobe writes it ("25/1", "30000/1001"): signed documents hold no floats.
        track.update(width=context.width, height=context.height, fps=f"{rate.numerator}/{rate.denominator}" if rate
                     else None)
    elif context is not None and stream.type == "audio":
        track.update(sample_rate=context.sample_rate, channels=context.channels)
    original = stream.metadata.get("ORIGINAL_CODEC")
    if original:
        track["original_codec"] = original
    return track


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


def _pump(src: int, dst: int, record: FileRecord, abort: Abort | None, also: Sequence[Hasher] = (),
          sink: BlockWriter | None = None) -> tuple[str, int]:
    """Stream `src` into `dst`, hashing (`also`: other digests fed the same bytes); writeback starts as it
    goes, `abort()` stops it. `sink`: encrypts what is written (the hashes stay the plaintext's)."""
    flushed = written = 0

    def write(view: memoryview) -> None:
        nonlocal flushed, written
        if abort is not None and abort():
            raise SourceGone(f"{record.original_path}: recorder undocked during the copy; the partial "
                             "copy was discarded, it resumes when the recorder is back")
        if sink is not None:
            _encrypt_into(sink, view, record)
        else:
            _write_all(dst, view, record)
        written += len(view)
        if written - flushed >= WRITEBACK_STEP:
            start_writeback(dst, flushed, written - flushed)
            flushed = written

    digest, size = hash_stream(src, write, read_error=lambda exc: source_error(exc, record), also=also)
    assert digest is not None  # `write` never stops the stream, it raises
    return digest, size


def _encrypt_into(sink: BlockWriter, view: memoryview | None, record: FileRecord) -> None:
    """`view` through the encrypting writer (None: its last block), a full disk as with a plain copy."""
    try:
        if view is None:
            sink.close()
        else:
            sink.write(view)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise IntakePaused(f"disk full while copying {record.original_path}; intake paused, the "
                               "partial copy was discarded and nothing else was touched") from exc
        raise


def copy_hashing(source: Path, staging: Path, record: FileRecord, abort: Abort | None,
                 at_rest: AtRest | None = None, also: Sequence[Hasher] = ()) -> tuple[str, int]:
    """Copy `source` to `staging` and return (sha256, size) of the bytes read (`also`: other digests fed
    the same bytes in the same pass, e.g. SM3); SourceGone if the source is
    not, or stops being, the file the catalog listed. The copy is written and its writeback started, not
    yet fsynced: the caller fsyncs it (`Ingestor` does so for a whole batch) before anything relies on it.
    With `at_rest` and a staging name that says encrypted, the copy is written encrypted (atrest.py)."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise source_error(exc, record) from exc
    before: os.stat_result | None = None
    try:
        before = os.fstat(src)
        if _changed(record, before):
            raise SourceGone(f"{record.original_path}: changed on the recorder since it was listed; "
                             "it will be listed again")
        dst = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            sink = at_rest.writer(dst, record.file_id) if at_rest is not None and is_encrypted(staging) else None
            digest, size = _pump(src, dst, record, abort, also, sink)
            if sink is not None:
                _encrypt_into(sink, None, record)
            start_writeback(dst)
        finally:
            os.close(dst)
        after = os.fstat(src)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or size != before.st_size:
            raise SourceGone(f"{record.original_path}: changed on the recorder during the copy; retried")
    finally:
        if before is not None and before.st_size >= DROP_SOURCE_BYTES:
            drop_cache(src)   # read once: its pages serve the next copy rather than stay cached
        os.close(src)
    return digest, size


def prove_copy(staging: Path, digest: str, size: int, record: FileRecord, at_rest: AtRest | None = None) -> None:
    """Drop a durable staged copy from the page cache and hash it from the disk: CopyMismatch if the bytes
    there are not the bytes read from the source (an encrypted copy is decrypted, every block authenticated).
    The pages it read are dropped again after (`hash_stored`'s `drop`)."""
    try:
        if hash_stored(staging, record.file_id, at_rest or AtRest(), drop=True) == (digest, size):
            return
    except AtRestError:
        pass
    raise CopyMismatch(f"{record.original_path}: read-back of the staged copy differs from the source "
                       f"(disk or memory fault?); the copy was discarded and will be retried")


@dataclass
class _Copy:
    index: int             # position in the batch
    record: FileRecord
    staging: Path
    digest: str
    size: int
    sm3: str | None = None          # under the 国密 suites: the SM3 of the same bytes (the manifest's `sm3`)
    final: Path | None = None


@dataclass
class Ingested:
    """What one batch came to, in the batch's order: `sealed` rows (fresh), then at most one `failed` item
    with the IngestError that stopped the batch, and the `rest` that was not tried (retry it)."""

    sealed: list[FileRecord] = field(default_factory=list)
    failed: tuple[FileRecord, Path, IngestError] | None = None
    rest: list[Item] = field(default_factory=list)


class Ingestor:
    """Copies sources into the store and seals them; safe to call from several dock threads at once.

    A batch (`ingest_batch`) groups the durability work of many small files without ever recording a state
    before its bytes are durable: every copy is written, then each fsynced and read back, then renamed into
    the store; every directory touched is fsynced once; then one transaction records them all `staged`.
    Sealing likewise writes and fsyncs every manifest, fsyncs their directories once and records them all
    `sealed` in one transaction that chains them in order (`Sealer.seal_batch`)."""

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

    def _reserve(self, sizes: list[int]) -> tuple[int, int, IntakePaused | None]:
        """Reserve room for the longest run of `sizes` (in order) that fits under max_disk_gb and above
        min_free_mb, with one look at the catalog and the disk for the whole batch. Returns how many fit, the
        bytes reserved for them and, when not all fit, why the first that does not was refused."""
        limit = int(self.config.agent.max_disk_gb * 1024**3)
        min_free = self.config.agent.min_free_mb * 1024**2
        with self._reserve_lock:
            used = self.store_bytes() + self._reserved
            free = self.layout.disk_usage().free - self._reserved
            fits, total, refused = 0, 0, None
            for size in sizes:
                if used + total + size > limit:
                    refused = IntakePaused(
                        f"store would exceed max_disk_gb={self.config.agent.max_disk_gb} ({used + total + size} "
                        "bytes); intake paused until synced files are purged or the limit is raised")
                    break
                if free - total - size < min_free:
                    refused = IntakePaused(
                        f"disk nearly full ({(free - total) // 1024**2} MiB free, {size // 1024**2} MiB needed, "
                        f"min_free_mb={self.config.agent.min_free_mb}); intake paused until space returns")
                    break
                fits, total = fits + 1, total + size
            self._reserved += total
        return fits, total, refused

    def _release(self, size: int) -> None:
        with self._reserve_lock:
            self._reserved -= size

    # -- stage ----------------------------------------------------------------------------------

    def stage(self, record: FileRecord, source: Path, abort: Abort | None = None) -> FileRecord:
        """discovered -> staged: copy with SHA-256 in one pass, fsync, read back, move into the store."""
        staged, failed, _ = self.stage_batch([(record, source)], abort)
        if failed is not None:
            raise failed[2]
        return staged[0]

    def stage_batch(self, items: list[Item], abort: Abort | None = None
                    ) -> tuple[list[FileRecord], tuple[FileRecord, Path, IngestError] | None, list[Item]]:
        """discovered -> staged for every discovered row of `items` (a staged one is passed through), in one
        transaction once all their copies are durable in the store. Returns (staged rows, the item that
        stopped the batch with its error or None, the items after it, not tried)."""
        copies: list[_Copy] = []
        ready = [record for record, _ in items if record.state == State.STAGED]
        failed: tuple[FileRecord, Path, IngestError] | None = None
        wanted = [(index, record, source) for index, (record, source) in enumerate(items)
                  if record.state == State.DISCOVERED]
        fits, reserved, refused = self._reserve([record.source_size or 0 for _, record, _ in wanted])
        group = SyncGroup(self.layout.data_dir, grouped=len(items) > 1)
        try:
            for n, (index, record, source) in enumerate(wanted):
                try:
                    if n == fits:
                        assert refused is not None
                        raise refused
                    copies.append(self._copy(index, record, source, abort))
                    group.file(copies[-1].staging)
                except IngestError as exc:
                    failed = (record, source, exc)
                    break
            failed = self._into_store(copies, items, failed, group)
            return ready + self._record_staged(copies), failed, self._rest(items, failed)
        except BaseException:
            for copy in copies:
                unlink_quietly(copy.staging)
            raise
        finally:
            group.__exit__()
            self._release(reserved)

    def _copy(self, index: int, record: FileRecord, source: Path, abort: Abort | None) -> _Copy:
        at_rest = self.layout.at_rest
        staging = self.layout.staging_path(record.file_id, encrypted=at_rest.encrypting)
        sm3 = sm3_hasher() if self.config.crypto.suite != DEFAULT_SUITE else None
        try:
            digest, size = copy_hashing(source, staging, record, abort, at_rest, () if sm3 is None else (sm3,))
        except BaseException:
            unlink_quietly(staging)
            raise
        return _Copy(index, record, staging, digest, size, None if sm3 is None else sm3.finalize().hex())

    def _into_store(self, copies: list[_Copy], items: list[Item], failed: tuple[FileRecord, Path, IngestError] | None,
                    group: SyncGroup) -> tuple[FileRecord, Path, IngestError] | None:
        """Make the copies durable, read each back, rename it into the store, make the renames durable.
        A copy that does not read back stops the batch there: it and the copies after it are discarded
        (`copies` keeps the good ones) and it becomes the failure."""
        if not copies:
            return failed
        group.sync()
        for n, copy in enumerate(copies):
            try:
                if self.config.agent.verify_readback:
                    prove_copy(copy.staging, copy.digest, copy.size, copy.record, self.layout.at_rest)
            except CopyMismatch as exc:
                for dropped in copies[n:]:
                    unlink_quietly(dropped.staging)
                del copies[n:]
                failed = (copy.record, items[copy.index][1], exc)
                break
            copy.final = self.layout.media_path(copy.record.file_id, Path(copy.record.original_path).suffix,
                                                encrypted=is_encrypted(copy.staging))
            group.ensure(copy.final.parent)
            os.chmod(copy.staging, 0o444)
            os.replace(copy.staging, copy.final)
            group.touch(copy.final.parent)
        group.touch(self.layout.staging)
        group.sync()
        return failed

    @staticmethod
    def _rest(items: list[Item], failed: tuple[FileRecord, Path, IngestError] | None) -> list[Item]:
        if failed is None:
            return []
        at = next(i for i, (record, _) in enumerate(items) if record.file_id == failed[0].file_id)
        return items[at + 1:]

    def _record_staged(self, copies: list[_Copy]) -> list[FileRecord]:
        """One transaction: every durable copy of the batch becomes `staged` with its hash and media facts."""
        changes = [(copy, self._staged_columns(copy)) for copy in copies]
        staged = []
        with self.catalog.transaction():
            for copy, columns in changes:
                staged.append(self.catalog.transition(
                    copy.record.file_id, State.STAGED, expect=State.DISCOVERED, actor="edge-agent", **columns,
                    audit_detail={"sha256": copy.digest, "size": copy.size}))
        return staged

    def _staged_columns(self, copy: _Copy) -> dict[str, Any]:
        assert copy.final is not None
        record, final = copy.record, copy.final
        plain = (lambda: PlainFile(self.layout.at_rest.reader(final, record.file_id))) if is_encrypted(final) else None
        media = probe_media(final, plain)
        end_ms = record.recorded_end_ms
        if end_ms is None and record.recorded_start_ms is not None and "duration_ms" in media:
            end_ms = record.recorded_start_ms + media["duration_ms"]
        # The SM3 rides with the source's own manifest keys (`extras`), so a manifest sealed later carries it.
        sm3 = {} if copy.sm3 is None else {"extras": canonical_json({**record.source_extras, "sm3": copy.sm3}
                                                                   ).decode("utf-8")}
        return {**sm3, "sha256": copy.digest, "size": copy.size,
                "store_path": str(copy.final.relative_to(self.layout.data_dir)),
                "media": canonical_json(media).decode("utf-8"), "ingested_at_ms": now_ms(),
                "recorded_end_ms": end_ms, "last_error": None}

    # -- ingest ---------------------------------------------------------------------------------

    def ingest(self, record: FileRecord, source: Path, abort: Abort | None = None) -> FileRecord:
        """Stage and seal one discovered file. Raises an IngestError subclass when it cannot."""
        done = self.ingest_batch([(record, source)], abort)
        if done.failed is not None:
            raise done.failed[2]
        return done.sealed[0] if done.sealed else self.catalog.get(record.file_id)

    def ingest_batch(self, items: list[Item], abort: Abort | None = None) -> Ingested:
        """Stage and seal `items` (discovered or staged rows with their sources) as one batch; see `Ingested`.
        Everything before the failed item is sealed; a full disk while recording stops the batch at its
        first item not sealed (IntakePaused), nothing half-done kept."""
        done = Ingested()
        try:
            staged, done.failed, done.rest = self.stage_batch(items, abort)
            done.sealed = self.sealer.seal_batch(staged)
        except (OSError, sqlite3.OperationalError) as exc:
            # The disk filled after the copy (manifest or catalog write): nothing was recorded, so the next
            # pass redoes these files from where the catalog says they are.
            if not disk_full(exc):
                raise
            first = items[0][0]
            done.failed = (first, items[0][1], IntakePaused(
                f"disk full while recording {first.original_path} ({exc}); intake paused, nothing half-done "
                "was kept; it resumes when space returns"))
            done.rest = items[1:]
        return done

    # -- crash recovery ---------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Bring the store in line with the catalog after any stop (see `ingest.recover`)."""
        return recover(self.catalog, self.layout, self.sealer)
