"""Finding a docked volume's files: who the recorder is, which files are finished, and their catalog rows.

`identify` names the recorder from the volume (DESIGN.md section 9). `Discovery` walks the volume once per
pass: entries that cannot be taken come back as refused, the model's system files as excluded (with the
rule), files still being written (not settled) are left for a later pass, and every other file gets its
`files` row (tagged with device, officer, session and the time its name tells) the first time its content
is seen. It copies nothing; the worker takes what it returns, in the model's order of priority.

Identity is by content: a file's row is found by its fingerprint (`digest.fingerprint`: size and SHA-256 of
its first and last MiB). The same bytes docked again (another mtime, another session) are the row already
there; a file with the name, size and mtime of a known one but other bytes (a recorder whose clock was reset,
a card reformatted and reused) is a new file, and an `identity_collision` event names both rows. A fingerprint
match of a file larger than the 2 MiB it hashes is confirmed with the full SHA-256 before the row is taken for
known: two recordings that differ only in their middle are two files (the second keeps its full SHA-256 in its
fingerprint, `digest.confirmed_fingerprint`). A row found before fingerprints existed is confirmed by the full
SHA-256 of its copy before it takes the fingerprint.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.digest import (
    confirmed_fingerprint,
    fingerprint,
    fingerprint_covers_all,
    fingerprint_sha256,
    hash_file,
)
from edge_agent.sources.recorders import (
    RecorderModel,
    RefusedEntry,
    SourceFile,
    VolumeIdentity,
    excluded_by,
    identify_volume,
    parse_name,
    priority,
    walk_volume,
)

log = logging.getLogger(__name__)

_INTAKE = (State.DISCOVERED, State.STAGED)

# How many file names identification reads when neither USB nor an identity file names the recorder.
SAMPLE_NAMES = 20
# New rows are recorded this many to a transaction (one commit, not one per file, for a card of photos).
DISCOVER_BATCH = 64
# Files up to this size are discovered in batches (their fingerprint is a read of the whole small file).
BATCHED_DISCOVERY_BYTES = 256 * 1024


class Chunked(ExitStack):
    """Transactions of at most `size` steps: `step()` before each write joins the open one, or opens one;
    the `size`-th step's transaction commits at the next step or at the end of the `with`."""

    def __init__(self, catalog: Catalog, size: int):
        super().__init__()
        self.catalog, self.size, self.steps = catalog, size, 0

    def step(self) -> None:
        if self.steps % self.size == 0:
            self.close()
            self.enter_context(self.catalog.transaction())
        self.steps += 1

    def flush(self) -> None:
        """Commit what is open now; the next `step` opens a new transaction."""
        self.close()
        self.steps = 0


def identify(volume: DockedVolume, models: list[RecorderModel],
             zone: ZoneInfo) -> tuple[VolumeIdentity, RecorderModel | None]:
    """The recorder behind `volume` and its model (None if unknown). Raises OSError if the volume is unreadable."""
    sample: list[str] = []
    for entry in walk_volume(volume.path):
        if isinstance(entry, SourceFile):
            sample.append(Path(entry.relative).name)
            if len(sample) >= SAMPLE_NAMES:
                break
    ident, model = identify_volume(volume.path, volume.label, models, serial=volume.serial,
                                   model_name=volume.model, sample_names=sample, tz=zone)
    told = volume.handshake
    if told is not None and told.serial:   # the recorder named itself through its vendor handshake (R5)
        ident = VolumeIdentity(device_id=told.serial, method="gat947", model=ident.model, serial=told.serial,
                               officer_id=told.officer_id or ident.officer_id)
    return ident, model


@dataclass
class Found:
    """One pass over a volume."""

    pending: list[tuple[FileRecord, Path]] = field(default_factory=list)  # rows still to take, with their source
    refused: list[str] = field(default_factory=list)                      # "path: reason", in walk order
    excluded: list[tuple[str, str]] = field(default_factory=list)         # (path, rule) of the system files
    taken: list[tuple[str, str]] = field(default_factory=list)            # (path, file_id) of every other file
    young: bool = False                                                   # some file is not settled yet


def _key(entry: SourceFile) -> tuple[str, int, int, int]:
    """What a file read once per docking is remembered by: a file rewritten since has another ctime."""
    return (entry.relative, entry.size, entry.mtime_ns, entry.ctime_ns)


class Discovery:
    """The walk of one docked volume, pass after pass, for one dock session."""

    def __init__(self, catalog: Catalog, volume: DockedVolume, ident: VolumeIdentity, model: RecorderModel | None,
                 session_id: str, zone: ZoneInfo, settle_s: float):
        self.catalog = catalog
        self.volume = volume
        self.ident = ident
        self.model = model
        self.session_id = session_id
        self.zone = zone
        self.settle_s = settle_s
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}
        # Fingerprints taken this session, by (path, size, mtime, ctime): a file is read once per docking.
        self._fingerprints: dict[tuple[str, int, int, int], str | None] = {}
        self._full_hashes: dict[tuple[str, int, int, int], str] = {}   # likewise, when a fingerprint is shared
        self._listed: dict[str, tuple[str, int, int, int]] = {}   # file_id -> key of the entry a pass listed it at

    def scan(self) -> Found:
        """Walk the volume once: refused entries, excluded system files, unsettled files, and the rows of the
        files to take (highest priority first)."""
        found, now_ns = Found(), time.time_ns()
        ranked: list[tuple[int, FileRecord, Path]] = []
        ranked_ids: set[str] = set()   # one content can sit at two paths: it is taken once
        with Chunked(self.catalog, DISCOVER_BATCH) as batch:
            for entry in walk_volume(self.volume.path):
                if isinstance(entry, RefusedEntry):
                    found.refused.append(f"{entry.relative}: {entry.reason}")
                elif (rule := excluded_by(entry.relative, self.model)) is not None:
                    found.excluded.append((entry.relative, rule))
                elif self.settle_s and not self._settled(entry, now_ns):
                    found.young = True
                else:
                    # Rows of small files are written 64 to a transaction; a larger file's fingerprint reads up
                    # to 2 MiB off the recorder, which must not happen while the catalog is held for writing.
                    if entry.size <= BATCHED_DISCOVERY_BYTES:
                        batch.step()
                    else:
                        batch.flush()
                    record = self._record_for(entry)
                    found.taken.append((entry.relative, record.file_id))
                    if record.state in _INTAKE and record.file_id not in ranked_ids:
                        ranked_ids.add(record.file_id)
                        self._listed[record.file_id] = _key(entry)
                        ranked.append((priority(entry.relative, self.model), record, entry.path))
        ranked.sort(key=lambda item: item[0])   # stable: walk order within one priority
        found.pending = [(record, path) for _, record, path in ranked]
        return found

    def copied(self, record: FileRecord) -> None:
        """`record` (sealed) was copied from the entry this session's last pass listed it at: the copy read that
        file whole (same size and mtime before and after, `ingest.stage.copy_hashing`) and hashed it, so its
        SHA-256 is the entry's full hash and the next pass need not read the recorder a third time to know it.
        Kept under the entry's (path, size, mtime, ctime): a file rewritten since has another ctime and is read."""
        key = self._listed.pop(record.file_id, None)
        if key is not None and record.sha256 is not None and (key[1], key[2]) == (record.size,
                                                                                 record.source_mtime_ns):
            self._full_hashes[key] = record.sha256

    def inventory(self, found: Found) -> list[dict[str, Any]]:
        """Every entry of a pass as the session manifest lists it: `collected` (its content is sealed in the
        catalog: file_id, sha256, size), `uncollected` (with the error that kept it), `pending`, `excluded`
        (with the rule) or `refused` (with the reason), by path."""
        out: list[dict[str, Any]] = []
        for path, file_id in found.taken:
            record = self.catalog.get(file_id)
            if record.state not in _INTAKE:
                out.append({"path": path, "status": "collected", "file_id": file_id, "sha256": record.sha256,
                            "size": record.size})
            else:
                status = "uncollected" if record.last_error else "pending"
                out.append({"path": path, "status": status, "file_id": file_id, "reason": record.last_error})
        out += [{"path": path, "status": "excluded", "rule": rule} for path, rule in found.excluded]
        for line in found.refused:
            path, _, reason = line.partition(": ")
            out.append({"path": path, "status": "refused", "reason": reason})
        return sorted(out, key=lambda item: item["path"])

    def uncollected(self, found: Found) -> list[tuple[str, str]]:
        """(path, error) of the files of a pass whose copy failed: still to take, with an error on the row."""
        left = []
        for record, path in found.pending:
            now = self.catalog.get(record.file_id)
            if now.state in _INTAKE and now.last_error:
                left.append((path.relative_to(self.volume.path).as_posix(), now.last_error))
        return left

    def _settled(self, entry: SourceFile, now_ns: int) -> bool:
        """Is the file finished? Old enough by its mtime, or unchanged for settle_s by our own clock.

        The second rule matters when a recorder's clock runs ahead: its mtimes lie in the future."""
        if self.settle_s * 1e9 <= now_ns - entry.mtime_ns:
            return True
        signature, seen = (entry.size, entry.mtime_ns), self._seen.get(entry.relative)
        if seen is None or seen[0] != signature:
            self._seen[entry.relative] = (signature, time.monotonic())
            return False
        return time.monotonic() - seen[1] >= self.settle_s

    def _fingerprint(self, entry: SourceFile) -> str | None:
        """The entry's fingerprint, None if it cannot be read (its copy then says why, and it is retried)."""
        key = _key(entry)
        if key not in self._fingerprints:
            try:
                self._fingerprints[key] = fingerprint(entry.path)
            except OSError as exc:
                log.warning("fingerprint failed device=%s path=%r: %s", self.ident.device_id, entry.relative, exc)
                return None
        return self._fingerprints[key]

    def _record_for(self, entry: SourceFile) -> FileRecord:
        """The row of `entry`'s content on this device, made if the catalog does not hold that content."""
        files, device = self.catalog.files, self.ident.device_id
        fp = self._fingerprint(entry)
        here = files.at_source(device, entry.relative, entry.size, entry.mtime_ns)
        if fp is None:
            return here[0] if here else self._new_record(entry, None, [])
        rows = files.with_fingerprint(device, fp)
        known = self._known_content(entry, rows)
        if known is not None:
            return known
        for row in (r for r in here if r.source_fingerprint is None):   # found before fingerprints existed
            if row.sha256 is None or self._full_hash(entry) == row.sha256:
                files.update(row.file_id, source_fingerprint=fp)
                return files.get(row.file_id)
        if rows and not fingerprint_covers_all(entry.size):
            # Other content shares this fingerprint (it differs only in the middle): the row keeps the full
            # SHA-256 beside it, so the two stay two source identities.
            full = self._full_hash(entry)
            fp = confirmed_fingerprint(fp, full) if full is not None else fp
        followed = self._follow_path(entry, fp)
        if followed is not None:
            return followed
        twins = {r.file_id: r for r in [*here, *rows]}
        return self._new_record(entry, fp, list(twins.values()))

    def _follow_path(self, entry: SourceFile, fp: str) -> FileRecord | None:
        """The row made at this path for content that was never copied, brought up to what the path holds now.

        A file listed while the recorder still wrote it (a vendor's drop folder, settle_s = 0) gets a row for
        the size it had then; its copy is refused as changed since listed, and the next pass finds other
        content at the path. That row stood for a moment of the file, not for a recording: it follows the file
        (size, mtime, fingerprint) instead of staying behind as a second row that nothing will ever copy, and
        that would keep the recorder 'collecting' for good."""
        # Only a row of this docking that no copy failed on: one left by an earlier docking, or with a read
        # error on it (its alarm raised), stands for a recording the recorder held then, and stays as it is.
        row = next((r for r in self.catalog.files.uncopied_at(self.ident.device_id, entry.relative)
                    if r.session_id == self.session_id and not r.last_error), None)
        if row is None:
            return None
        log.info("file changed before its copy device=%s path=%r file=%s size=%s->%d", self.ident.device_id,
                 entry.relative, row.file_id, row.source_size, entry.size)
        return self._changed_before_copy(row, entry, source_fingerprint=fp)

    def _changed_before_copy(self, row: FileRecord, entry: SourceFile, **more: Any) -> FileRecord:
        """`row` (not copied yet) now stands for the entry as listed: its size, mtime and where it is. The row
        as it is now."""
        update: dict[str, Any] = {"source_size": entry.size, "source_mtime_ns": entry.mtime_ns,
                                  "source_path": str(entry.path), **more}
        if row.recorded_start_ms is not None and row.recorded_start_ms == row.recorded_end_ms == (
                (row.source_mtime_ns or 0) // 1_000_000):   # its times came from the mtime: they follow it
            update["recorded_start_ms"] = update["recorded_end_ms"] = entry.mtime_ns // 1_000_000
        self.catalog.files.update(row.file_id, **update)
        return self.catalog.files.get(row.file_id)

    def _known_content(self, entry: SourceFile, rows: list[FileRecord]) -> FileRecord | None:
        """The row holding this content among `rows` (those with its fingerprint): at the same path (its size and mtime
        brought up to date while it is still to be copied), else a collected one anywhere on the device.

        A fingerprint hashes the first and last MiB only: for a larger file, a row whose SHA-256 is known is
        this content only if the file's full SHA-256 (streamed off the recorder, outside any catalog
        transaction) is the same; a row not copied yet at this path stands for whatever the path holds."""
        if not rows:
            return None
        if not fingerprint_covers_all(entry.size):
            full = self._full_hash(entry)
            if full is not None:
                rows = [r for r in rows if _content_sha256(r) in (None, full)]
                rows = [r for r in rows if _content_sha256(r) is not None or r.original_path == entry.relative]
        same_path = [r for r in rows if r.original_path == entry.relative]
        if same_path:
            row = same_path[-1]
            if row.state in _INTAKE and (row.source_size, row.source_mtime_ns, row.source_path) != (
                    entry.size, entry.mtime_ns, str(entry.path)):
                # The size too: a row made while the file grew between the walk's stat and its fingerprint
                # holds the walk's size, and its copy would be refused as changed at every pass.
                row = self._changed_before_copy(row, entry)
            return row
        return next((r for r in rows if r.state not in _INTAKE), None)

    def _full_hash(self, entry: SourceFile) -> str | None:
        """The entry's full SHA-256 (read once per docking), None if it cannot be read."""
        key = _key(entry)
        if key not in self._full_hashes:
            try:
                self._full_hashes[key] = hash_file(entry.path)[0]
            except OSError as exc:
                log.warning("full hash failed device=%s path=%r: %s", self.ident.device_id, entry.relative, exc)
                return None
        return self._full_hashes[key]

    def _new_record(self, entry: SourceFile, fp: str | None, twins: list[FileRecord]) -> FileRecord:
        catalog, ident = self.catalog, self.ident
        name = parse_name(Path(entry.relative).name, self.model, self.zone)
        start_ms = name.start_ms
        end_ms = None
        if start_ms is None:  # no time in the name: the file's mtime is when the recorder closed it
            start_ms = end_ms = entry.mtime_ns // 1_000_000
        officer = name.officer or ident.officer_id or catalog.officer_at(ident.device_id, start_ms)
        # The recorder's clock offset as its vendor handshake read it at docking, before 校时 (R9).
        offset = self.volume.handshake.clock_offset_ms if self.volume.handshake is not None else None
        with catalog.transaction():
            record, created = catalog.discover(
                kind="recorder", device_id=ident.device_id, original_path=entry.relative,
                source_path=str(entry.path), source_size=entry.size, source_mtime_ns=entry.mtime_ns,
                dock=self.volume.dock, slot=self.volume.slot, session_id=self.session_id,
                volume_label=self.volume.label, officer_id=officer, recorded_start_ms=start_ms,
                recorded_end_ms=end_ms, clock_offset_ms=offset, actor="edge-agent", source_fingerprint=fp)
            if created and twins:
                self._collision(record, twins)
        if created and entry.size == 0:
            catalog.emit_event({"type": "fault", "kind": "zero_byte_file", "device_id": ident.device_id,
                                "file_id": record.file_id, "path": entry.relative, "ts": now_ms(),
                                "message": f"{entry.relative} on {ident.device_id} is empty (0 bytes): ingested "
                                           "as found; check the recorder for a recording fault"})
        return record

    def _collision(self, record: FileRecord, twins: list[FileRecord]) -> None:
        """A new file has the name, size and mtime of known ones but other bytes: event and audit name both."""
        others = [t.file_id for t in twins]
        message = (f"{record.original_path} on {record.device_id} has the name, size and time of file(s) "
                   f"{', '.join(others)} already in the catalog but other content (recorder clock reset or card "
                   f"reused?): ingested as new file {record.file_id}; check the recorder's clock")
        log.warning("identity collision device=%s path=%r file=%s twins=%s", record.device_id,
                    record.original_path, record.file_id, ",".join(others))
        self.catalog.emit_event({"type": "fault", "kind": "identity_collision", "device_id": record.device_id,
                                 "file_id": record.file_id, "twin_file_ids": others, "path": record.original_path,
                                 "fingerprint": record.source_fingerprint,
                                 "twin_fingerprints": [t.source_fingerprint for t in twins],
                                 "ts": now_ms(), "message": message})
        self.catalog.audit("file.identity_collision", subject=record.file_id, actor="edge-agent",
                           reason="same device, path, size and mtime as a known file, other content",
                           detail={"twins": others, "path": record.original_path})


def _content_sha256(row: FileRecord) -> str | None:
    """The full SHA-256 of a row's content as far as it is known: its copy's, else its confirmed fingerprint's."""
    if row.sha256 is not None:
        return row.sha256
    return fingerprint_sha256(row.source_fingerprint) if row.source_fingerprint else None
