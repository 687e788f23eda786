"""Docking: turns docked recorder volumes into sessions, tagged files and ingest work.

One `VolumeWorker` thread per docked volume (parallel across slots, bounded
by `agent.ingest_workers`); files within one volume go one after another, as
the recorder's own storage is the bottleneck. After the receiver confirms a
file, the worker deletes the recorder's original if the dock's
`clear_after_sync` says so, and only then (G2).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig, DirectoryDock, UsbDock
from edge_agent.digest import hash_file
from edge_agent.durable import fsync_dir
from edge_agent.ingest import IngestError, Ingestor, IntakePaused, Sealer, SourceGone, SourceUnreadable
from edge_agent.sources.recorders import (
    RecorderModel,
    RefusedEntry,
    SourceFile,
    VolumeIdentity,
    identify_volume,
    parse_name,
    walk_volume,
)

log = logging.getLogger(__name__)

# How long a read error waits for the dock driver to report an undock before it counts as the file's own fault.
UNDOCK_GRACE_S = 2.0


@dataclass
class SlotStatus:
    """What a custodian sees for one dock slot (also published in health)."""

    dock: str
    slot: int | None
    label: str
    docked_ms: int
    state: str = "identifying"      # identifying | ingesting | paused | done | error | undocked
    device_id: str | None = None
    model: str | None = None
    serial: str | None = None
    officer_id: str | None = None
    session_id: str | None = None
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_copied: int = 0
    rate_bps: float = 0.0
    last_error: str | None = None
    refused: list[str] = field(default_factory=list)

    @property
    def files_pending(self) -> int:
        return max(self.files_total - self.files_done, 0)


class DockService:
    """Listens to dock drivers and runs one worker per docked volume."""

    def __init__(self, catalog: Catalog, ingestor: Ingestor, sealer: Sealer, config: AgentConfig,
                 models: list[RecorderModel], topic_events: str | None = None):
        self.catalog = catalog
        self.ingestor = ingestor
        self.sealer = sealer
        self.config = config
        self.models = models
        self.tz = config.agent.zone
        self.docks: dict[str, UsbDock | DirectoryDock] = {d.name: d for d in config.docks}
        self.permits = threading.BoundedSemaphore(config.agent.ingest_workers)
        self._workers: dict[tuple[str, str], VolumeWorker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # DockListener
    def docked(self, volume: DockedVolume) -> None:
        with self._lock:
            key = (volume.dock, volume.label)
            old = self._workers.get(key)
            if old is not None and old.is_alive():
                return
            worker = VolumeWorker(self, volume)
            self._workers[key] = worker
        worker.start()

    def undocked(self, volume: DockedVolume) -> None:
        with self._lock:
            worker = self._workers.get((volume.dock, volume.label))
        if worker is not None:
            worker.undock()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.undock(stopping=True)
        for worker in workers:
            worker.join(timeout=30)

    def slots(self) -> list[SlotStatus]:
        with self._lock:
            return [replace(w.status) for w in self._workers.values() if w.status.state != "undocked"]

    def wait_idle(self, timeout: float) -> bool:
        """True once every docked volume has been fully ingested (for tests and the demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [s.state for s in self.slots()]
            if states and all(s in ("done", "error") for s in states):
                return True
            time.sleep(0.05)
        return False


class VolumeWorker(threading.Thread):
    """Ingests one docked volume. With `once`, one pass then return (the `import` command)."""

    def __init__(self, service: DockService, volume: DockedVolume, *, identity: VolumeIdentity | None = None,
                 once: bool = False, on_file: Callable[[FileRecord], None] | None = None):
        super().__init__(name=f"dock-{volume.dock}-{volume.slot or volume.label}", daemon=True)
        self.service = service
        self.volume = volume
        self.identity = identity
        self.once = once
        self.on_file = on_file
        self.dock = service.docks.get(volume.dock)
        self.status = SlotStatus(dock=volume.dock, slot=volume.slot, label=volume.label, docked_ms=now_ms())
        self._gone = threading.Event()
        self._wake = threading.Event()
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}
        self._paused = False

    def undock(self, stopping: bool = False) -> None:
        self._gone.set()
        self._wake.set()
        if not stopping:
            self.status.state = "undocked"

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the fault barrier of one dock slot: it never fails silently
            log.exception("dock worker failed dock=%s label=%s", self.volume.dock, self.volume.label)
            self.status.state, self.status.last_error = "error", f"{type(exc).__name__}: {exc}"
            try:
                self.service.catalog.raise_alarm(
                    f"dock_fault:{self.volume.dock}:{self.volume.label}", "dock_fault", self.volume.label,
                    f"ingest of volume {self.volume.label!r} on dock {self.volume.dock} stopped on an internal "
                    f"error ({type(exc).__name__}: {exc}); nothing was deleted from the recorder. Undock and "
                    "re-dock it to retry, and report the error from the agent's log")
            except sqlite3.Error:
                log.exception("dock fault alarm not recorded dock=%s label=%s", self.volume.dock, self.volume.label)

    def _run(self) -> None:
        catalog = self.service.catalog
        try:
            ident, model = self._identify() if self.identity is None else (self.identity, None)
        except OSError as exc:
            self.status.state, self.status.last_error = "error", f"cannot read volume: {exc.strerror}"
            return
        session_id = catalog.open_session(
            dock=self.volume.dock, slot=self.volume.slot, device_id=ident.device_id, serial=ident.serial,
            model=ident.model, volume_label=self.volume.label, volume_path=str(self.volume.path),
            officer_id=ident.officer_id)
        self.status.session_id = session_id
        if not ident.identified:
            catalog.raise_alarm(f"unidentified:{self.volume.dock}:{self.volume.label}", "recorder_unidentified",
                                ident.device_id,
                                f"recorder volume {self.volume.label!r} on dock {self.volume.dock} could not be "
                                "identified (no USB serial, identity file or known file names); its files are "
                                f"ingested as {ident.device_id}: add its model to recorders.toml or assign it")
        sealed_session = False
        settle_s = self.dock.settle_s if self.dock and not self.once else 0.0
        rescan_s = self.dock.rescan_s if self.dock else 5.0
        while not self._gone.is_set():
            pending, young = self._discover(ident, model, session_id, settle_s)
            self.status.state = "ingesting" if pending else self.status.state
            self._ingest_all(pending)
            if self._gone.is_set():
                break
            outstanding = self._outstanding(ident.device_id)
            if not outstanding and not young and self.status.state != "paused":
                if not sealed_session:
                    self.service.sealer.seal_session(session_id)
                    sealed_session = True
                self.status.state = "done"
            if self.once:
                if not sealed_session:
                    self.service.sealer.seal_session(session_id)
                break
            self._clear_synced(ident.device_id)
            self._wake.wait(rescan_s if not young else min(rescan_s, max(settle_s / 2, 0.05)))
            self._wake.clear()
        catalog.close_session(session_id, "imported" if self.once else "undocked", files_total=self.status.files_total,
                              last_error=self.status.last_error)

    # -- identification and discovery ------------------------------------------------------------

    def _identify(self) -> tuple[VolumeIdentity, RecorderModel | None]:
        sample: list[str] = []
        for entry in walk_volume(self.volume.path):
            if isinstance(entry, SourceFile):
                sample.append(Path(entry.relative).name)
                if len(sample) >= 20:
                    break
        ident, model = identify_volume(self.volume.path, self.volume.label, self.service.models,
                                       serial=self.volume.serial, model_name=self.volume.model,
                                       sample_names=sample, tz=self.service.tz)
        self.status.device_id, self.status.model, self.status.serial = ident.device_id, ident.model, ident.serial
        self.status.officer_id = ident.officer_id
        return ident, model

    def _discover(self, ident: VolumeIdentity, model: RecorderModel | None, session_id: str,
                  settle_s: float) -> tuple[list[tuple[FileRecord, Path]], bool]:
        catalog = self.service.catalog
        globs = model.media_globs if model else ("**/*",)
        skip = (model.identity_file,) if model and model.identity_file else ()
        pending: list[tuple[FileRecord, Path]] = []
        young = False
        now_ns = time.time_ns()
        refused: list[str] = []
        for entry in walk_volume(self.volume.path, globs, skip):
            if isinstance(entry, RefusedEntry):
                refused.append(f"{entry.relative}: {entry.reason}")
                continue
            if settle_s and not self._settled(entry, settle_s, now_ns):
                young = True
                continue
            record = catalog.find_source(ident.device_id, entry.relative, entry.size, entry.mtime_ns)
            if record is None:
                record = self._new_record(entry, ident, model, session_id)
            if record.state == State.DISCOVERED or record.state == State.STAGED:
                pending.append((record, entry.path))
        self._report_refused(refused)
        done = catalog.query(
            "SELECT COUNT(*), COALESCE(SUM(size),0) FROM files WHERE session_id = ? AND state NOT IN"
            " ('discovered','staged')", (session_id,))[0]
        self.status.files_total = int(done[0]) + len(pending)
        self.status.files_done = int(done[0])
        self.status.bytes_total = int(done[1]) + sum(r.source_size or 0 for r, _ in pending)
        return pending, young

    def _settled(self, entry: SourceFile, settle_s: float, now_ns: int) -> bool:
        """Is the file finished? Old enough by its mtime, or unchanged for settle_s by our own clock.

        The second rule matters when a recorder's clock runs ahead: its mtimes lie in the future."""
        if settle_s * 1e9 <= now_ns - entry.mtime_ns:
            return True
        signature, seen = (entry.size, entry.mtime_ns), self._seen.get(entry.relative)
        if seen is None or seen[0] != signature:
            self._seen[entry.relative] = (signature, time.monotonic())
            return False
        return time.monotonic() - seen[1] >= settle_s

    def _new_record(self, entry: SourceFile, ident: VolumeIdentity, model: RecorderModel | None,
                    session_id: str) -> FileRecord:
        catalog = self.service.catalog
        name = parse_name(Path(entry.relative).name, model, self.service.tz)
        start_ms = name.start_ms
        end_ms = None
        if start_ms is None:  # no time in the name: the file's mtime is when the recorder closed it
            start_ms = end_ms = entry.mtime_ns // 1_000_000
        officer = name.officer or ident.officer_id or catalog.officer_at(ident.device_id, start_ms)
        record, created = catalog.discover(
            kind="recorder", device_id=ident.device_id, original_path=entry.relative, source_path=str(entry.path),
            source_size=entry.size, source_mtime_ns=entry.mtime_ns, dock=self.volume.dock, slot=self.volume.slot,
            session_id=session_id, volume_label=self.volume.label, officer_id=officer,
            recorded_start_ms=start_ms, recorded_end_ms=end_ms, actor="edge-agent")
        if created and entry.size == 0:
            catalog.emit_event({"type": "fault", "kind": "zero_byte_file", "device_id": ident.device_id,
                                "file_id": record.file_id, "path": entry.relative, "ts": now_ms(),
                                "message": f"{entry.relative} on {ident.device_id} is empty (0 bytes): ingested "
                                           "as found; check the recorder for a recording fault"})
        return record

    def _report_refused(self, refused: list[str]) -> None:
        new = [r for r in refused if r not in self.status.refused]
        if not new:
            return
        self.status.refused.extend(new)
        for line in new:
            log.warning("refused dock=%s label=%s entry=%r", self.volume.dock, self.volume.label, line)
        self.service.catalog.raise_alarm(
            f"refused:{self.volume.dock}:{self.volume.label}", "volume_refused_entries", self.volume.label,
            f"{len(self.status.refused)} entr(ies) on volume {self.volume.label!r} were not taken "
            f"(symlink, unsafe name or unreadable), first: {self.status.refused[0]}; they are left untouched "
            "on the recorder for inspection")

    def _outstanding(self, device_id: str) -> int:
        """Files still to take in this pass. One that failed with an error (unreadable, copy mismatch) is
        retried on every rescan but does not hold back the session manifest, which lists it as not sealed."""
        rows = self.service.catalog.query(
            "SELECT COUNT(*) FROM files WHERE device_id = ? AND volume_label = ? AND state IN ('discovered','staged')"
            " AND last_error IS NULL", (device_id, self.volume.label))
        return int(rows[0][0])

    # -- ingest -------------------------------------------------------------------------------------

    def _ingest_all(self, pending: list[tuple[FileRecord, Path]]) -> None:
        catalog = self.service.catalog
        started, copied_before = time.monotonic(), self.status.bytes_copied
        for record, path in pending:
            if self._gone.is_set():
                return
            with self.service.permits:
                try:
                    self.service.ingestor.ingest(record, path, abort=self._gone.is_set)
                except IntakePaused as exc:
                    if not self._paused:   # once per pause, not at every rescan
                        log.warning("intake paused dock=%s file=%s: %s", self.volume.dock, record.file_id, exc)
                    self.status.state, self.status.last_error = "paused", str(exc)
                    self._paused = True
                    try:
                        catalog.raise_alarm("disk_full", "disk_full", self.service.config.agent.id, str(exc))
                    except sqlite3.OperationalError as alarm_exc:  # so full that not even the alarm fits
                        log.error("disk_full alarm not recorded dock=%s: %s", self.volume.dock, alarm_exc)
                    return
                except SourceGone as exc:
                    self.status.last_error = str(exc)
                    log.warning("source gone dock=%s file=%s: %s", self.volume.dock, record.file_id, exc)
                    if self._gone.is_set():
                        return
                    if self._read_fault(record, path):
                        cause = exc.__cause__.strerror if isinstance(exc.__cause__, OSError) else str(exc)
                        self._unreadable(record, f"{record.original_path} on {record.device_id}: read failed "
                                                 f"({cause}) while the recorder stayed docked: a storage fault on "
                                                 "the recorder (bad sector?); the file is kept there and retried "
                                                 "at every rescan; check or replace the recorder's card")
                    elif self._gone.is_set():
                        return
                    continue
                except SourceUnreadable as exc:
                    self._unreadable(record, str(exc))
                    continue
                except IngestError as exc:
                    self.status.last_error = str(exc)
                    catalog.update(record.file_id, last_error=str(exc), attempts=record.attempts + 1)
                    log.error("ingest failed file=%s: %s", record.file_id, exc)
                    continue
            if self._paused:  # status.state was already set back to "ingesting" by the next pass
                catalog.clear_alarm("disk_full")
                self._paused = False
            self.status.state = "ingesting"
            self.status.files_done += 1
            self.status.bytes_copied += record.source_size or 0
            if self.on_file is not None:
                self.on_file(record)
            elapsed = time.monotonic() - started
            if elapsed > 0:
                self.status.rate_bps = (self.status.bytes_copied - copied_before) / elapsed

    def _read_fault(self, record: FileRecord, path: Path) -> bool:
        """After a read error: is the recorder still docked and the file unchanged? Then the error is the
        file's, not a recorder pulled out (whose driver reports the undock within a poll or two)."""
        def unchanged() -> bool:
            try:
                st = os.lstat(path)
            except OSError:
                return False
            return (st.st_size, st.st_mtime_ns) == (record.source_size, record.source_mtime_ns)

        return unchanged() and not self._gone.wait(UNDOCK_GRACE_S) and unchanged()

    def _unreadable(self, record: FileRecord, message: str) -> None:
        self.status.last_error = message
        self.service.catalog.update(record.file_id, last_error=message, attempts=record.attempts + 1)
        self.service.catalog.raise_alarm(f"unreadable:{record.file_id}", "file_unreadable", record.device_id,
                                         message)

    # -- verify-then-clear --------------------------------------------------------------------------

    def _clear_synced(self, device_id: str) -> None:
        if self.dock is None or not self.dock.clear_after_sync:
            return
        catalog = self.service.catalog
        for record in catalog.files(states=[State.SYNCED, State.PURGED],
                                    where="device_id = ? AND volume_label = ? AND cleared_ms IS NULL",
                                    params=(device_id, self.volume.label)):
            if self._gone.is_set():
                return
            self._clear_one(record)

    def _clear_one(self, record: FileRecord) -> None:
        catalog = self.service.catalog
        path = self.volume.path / record.original_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            catalog.update(record.file_id, cleared_ms=now_ms(), last_error="original already gone from recorder")
            return
        if (st.st_size, st.st_mtime_ns) != (record.source_size, record.source_mtime_ns):
            catalog.raise_alarm(f"clear_mismatch:{record.file_id}", "clear_refused", record.device_id,
                                f"{record.original_path} on {record.device_id} differs from the copy the platform "
                                "confirmed; it was NOT deleted")
            return
        if self.dock is not None and self.dock.verify_before_clear:
            digest, _ = hash_file(path)
            if digest != record.sha256:
                catalog.raise_alarm(f"clear_mismatch:{record.file_id}", "clear_refused", record.device_id,
                                    f"{record.original_path} on {record.device_id} no longer hashes to the "
                                    "confirmed SHA-256; it was NOT deleted")
                return
        os.unlink(path)
        fsync_dir(path.parent)
        reason = "receiver confirmed matching SHA-256; dock clear_after_sync"
        if record.state == State.SYNCED:
            catalog.transition(record.file_id, State.SOURCE_CLEARED, expect=State.SYNCED, actor="edge-agent",
                               reason=reason, cleared_ms=now_ms())
        else:  # already purged locally: the row keeps its state, the clearing is still audited
            with catalog.transaction():
                catalog.update(record.file_id, cleared_ms=now_ms())
                catalog.audit("recorder.cleared", subject=record.file_id, reason=reason, actor="edge-agent",
                              detail={"device_id": record.device_id, "path": record.original_path})
