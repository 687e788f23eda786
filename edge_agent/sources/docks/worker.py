"""The thread of one dock slot: it sequences a docked volume's steps, and owns no step itself.

Identify the recorder, open the dock session, then pass after pass: discover (`discovery`), copy what
was found, one file after another (the recorder's own storage is the bottleneck; small files in batches,
`next_batch`; the copy itself is `Ingestor.ingest_batch`, its failures judged by `policy.IngestFaults`),
seal the session once nothing is left to take, clear confirmed originals (`clearing`), wait for the next
rescan. Undocking ends the passes and closes the session. Parallel across slots, bounded by
`agent.ingest_workers` (the shared permits).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog, FileRecord
from edge_agent.catalog.docking import DockingRecords
from edge_agent.clock import now_ms
from edge_agent.config import Dock
from edge_agent.evidence.receipts import PinnedKeys
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.protocol.heartbeat import Heartbeat
from edge_agent.sources.docks import policy
from edge_agent.sources.docks.clearing import Clearing, ReceiptCheck
from edge_agent.sources.docks.discovery import Discovery, Found, identify
from edge_agent.sources.docks.policy import IngestFaults, Step
from edge_agent.sources.docks.slots import SlotState, SlotStatus
from edge_agent.sources.recorders import RecorderModel, VolumeIdentity

log = logging.getLogger(__name__)

# Rescan interval of a volume whose dock is not configured (the `import` command's one pass never waits).
DEFAULT_RESCAN_S = 5.0

Progress = Callable[[int, int], None]   # (bytes copied, bytes to copy in all) of one volume

# Files up to BATCH_FILE_BYTES are taken in batches (one fsync round and two transactions for the batch, not
# per file); a batch ends at BATCH_FILES files or BATCH_BYTES bytes. A larger file is taken on its own.
BATCH_FILE_BYTES = 4 * 1024 * 1024
BATCH_FILES = 64
BATCH_BYTES = 32 * 1024 * 1024


def next_batch(pending: list[tuple[FileRecord, Path]]) -> int:
    """How many of the first `pending` files make the next batch: a run of small files, or one large one."""
    taken = size = 0
    for record, _ in pending[:BATCH_FILES]:
        n = record.source_size or 0
        if n > BATCH_FILE_BYTES or size + n > BATCH_BYTES:
            break
        taken, size = taken + 1, size + n
    return max(taken, 1)


@dataclass(frozen=True)
class DockContext:
    """What every slot's worker shares; built once by `DockService`."""

    catalog: Catalog
    records: DockingRecords
    ingestor: Ingestor
    sealer: Sealer
    models: list[RecorderModel]
    zone: ZoneInfo
    agent_id: str
    permits: threading.BoundedSemaphore
    receiver_keys: PinnedKeys = PinnedKeys(None)   # a recorder is cleared only with a verified receipt


class VolumeWorker(threading.Thread):
    """Ingests one docked volume until it is undocked. With `once`, one pass then return (the `import`
    command, which also calls `run()` in its own thread); `identity` then says who the recorder is.
    `on_progress(bytes_copied, bytes_total)` is called after each pass's discovery and each file."""

    def __init__(self, context: DockContext, volume: DockedVolume, dock: Dock | None, *,
                 identity: VolumeIdentity | None = None, once: bool = False, on_progress: Progress | None = None):
        super().__init__(name=f"dock-{volume.dock}-{volume.slot or volume.label}", daemon=True)
        self.context = context
        self.volume = volume
        self.dock = dock
        self.identity = identity
        self.once = once
        self.on_progress = on_progress
        self.status = SlotStatus(dock=volume.dock, slot=volume.slot, label=volume.label, docked_ms=now_ms())
        self._gone = threading.Event()
        self._wake = threading.Event()
        self.heartbeat = Heartbeat(self.name)   # beats per pass and per block copied; idle between rescans
        self._left_behind: bool | None = None   # files left uncollected at the last pass (None: not known yet)

    def undock(self, stopping: bool = False) -> None:
        """End the passes (from the driver's thread). `stopping`: the agent stops, the recorder stays docked."""
        if not stopping:
            self.status.set_state(SlotState.UNDOCKED)
        self._gone.set()
        self._wake.set()

    @property
    def ended_early(self) -> bool:
        """The thread ended while the volume is still docked and the agent runs (a fault, an unreadable volume)."""
        return self.ident is not None and not self.is_alive() and not self._gone.is_set()

    @property
    def undocking(self) -> bool:
        return self._gone.is_set()

    def _should_stop(self) -> bool:
        """The `abort` of long steps (a copy, a clearing): a beat, since the step makes progress, then whether
        the passes end."""
        self.heartbeat.beat()
        return self._gone.is_set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # the fault barrier of one dock slot: it never fails silently
            log.exception("dock worker failed dock=%s label=%s", self.volume.dock, self.volume.label)
            self.status.set_state(SlotState.ERROR, error=f"{type(exc).__name__}: {exc}")
            try:
                policy.dock_fault(self.volume, exc).raise_on(self.context.catalog)
            except sqlite3.Error:
                log.exception("dock fault alarm not recorded dock=%s label=%s", self.volume.dock, self.volume.label)

    def _run(self) -> None:
        ctx = self.context
        try:
            ident, model = identify(self.volume, ctx.models, ctx.zone) if self.identity is None else (
                self.identity, None)
        except OSError as exc:
            self.status.set_state(SlotState.ERROR, error=f"cannot read volume: {exc.strerror}")
            return
        st = self.status
        st.device_id, st.model, st.serial, st.officer_id = ident.device_id, ident.model, ident.serial, ident.officer_id
        st.officer_name = ident.officer_name
        handshake = self.volume.handshake
        if handshake is not None:
            st.battery_percent, st.clock_offset_ms = handshake.battery_percent, handshake.clock_offset_ms
        session_id = ctx.catalog.open_session(
            dock=self.volume.dock, slot=self.volume.slot, device_id=ident.device_id, serial=ident.serial,
            model=ident.model, volume_label=self.volume.label, volume_path=str(self.volume.path),
            officer_id=ident.officer_id,
            recorder=None if handshake is None else {**handshake.as_dict(), "usb_serial": self.volume.serial})
        st.session_id = session_id
        if not ident.identified:
            policy.unidentified(self.volume, ident).raise_on(ctx.catalog)
        settle_s = self.dock.settle_s if self.dock and not self.once else 0.0
        self._passes(ident, Discovery(ctx.catalog, self.volume, ident, model, session_id, ctx.zone, settle_s))
        ctx.catalog.close_session(session_id, "imported" if self.once else "undocked", files_total=st.files_total,
                                  last_error=st.last_error)

    def _passes(self, ident: VolumeIdentity, discovery: Discovery) -> None:
        ctx, session_id = self.context, discovery.session_id
        clearing = Clearing(ctx.catalog, ctx.records, self.volume, self.dock,
                            receipts=ReceiptCheck(ctx.catalog, ctx.agent_id, ctx.receiver_keys),
                            checkpoint=ctx.sealer.checkpoint)
        faults = IngestFaults(ctx.catalog, ctx.records, self.status, self.volume, ctx.agent_id, self._gone)
        rescan_s = self.dock.rescan_s if self.dock else DEFAULT_RESCAN_S
        sealed = False
        while not self._gone.is_set():
            self.heartbeat.beat()
            found = discovery.scan()
            self._account(found, session_id)
            if found.pending:
                self.status.set_state(SlotState.INGESTING)
            self._copy_all(found.pending, faults, discovery.copied)
            complete = (not found.young and self.status.state is not SlotState.PAUSED
                        and not ctx.records.outstanding(ident.device_id, self.volume.label))
            if self._gone.is_set():
                if complete:   # pulled right after its last file was sealed: the session is signed all the same
                    self._seal_once(discovery, found, sealed)
                break
            left = self._uncollected(discovery, found, ident)
            if complete:
                sealed = self._seal_once(discovery, found, sealed)
                self._finished(left)
            if self.once:
                self._seal_once(discovery, found, sealed)
                break
            if not left:  # a recorder with files left behind is not cleared at all, so it is not reused
                clearing.clear_synced(ident.device_id, self._should_stop)
            self.heartbeat.idle()
            self._wake.wait(rescan_s if not found.young else min(rescan_s, max(discovery.settle_s / 2, 0.05)))
            self._wake.clear()

    def _seal_once(self, discovery: Discovery, found: Found, sealed: bool) -> bool:
        """Seal the session's manifest (with every file of the volume accounted for) unless it was sealed
        already; True from then on."""
        if not sealed:
            self.context.sealer.seal_session(discovery.session_id, volume_files=discovery.inventory(found))
        return True

    def _uncollected(self, discovery: Discovery, found: Found, ident: VolumeIdentity) -> list[tuple[str, str]]:
        """The files of this pass that could not be collected; raises `uncollected_files` while there are any
        and clears it once there are none."""
        left = discovery.uncollected(found)
        if left:
            if policy.uncollected_files(self.volume, ident.device_id, left).raise_on(self.context.catalog):
                log.warning("uncollected files dock=%s label=%s count=%d first=%r", self.volume.dock,
                            self.volume.label, len(left), left[0][0])
        elif self._left_behind is not False:   # raised before (or by an earlier run): clear it
            self.context.catalog.clear_alarm(policy.uncollected_key(self.volume))
        self._left_behind = bool(left)
        return left

    def _finished(self, left: list[tuple[str, str]]) -> None:
        """Everything that can be taken is taken: done, unless files are left behind (then an error: a
        recorder is never reported done while one of its files is not collected)."""
        if left:
            first, error = left[0]
            self.status.set_state(SlotState.ERROR, error=f"{len(left)} file(s) not collected, first: {first} "
                                                         f"({error}); see the uncollected_files alarm")
        else:
            self.status.set_state(SlotState.DONE)

    def _account(self, found: Found, session_id: str) -> None:
        """The slot's counts after a discovery pass: what the session took so far plus what is pending."""
        self._report_refused(found.refused)
        done_files, done_bytes = self.context.records.session_taken(session_id)
        self.status.files_total = done_files + len(found.pending)
        self.status.files_done = done_files
        self.status.bytes_total = done_bytes + sum(r.source_size or 0 for r, _ in found.pending)
        self._progress()

    def _report_refused(self, refused: list[str]) -> None:
        new = [r for r in refused if r not in self.status.refused]
        if not new:
            return
        self.status.refused.extend(new)
        for line in new:
            log.warning("refused dock=%s label=%s entry=%r", self.volume.dock, self.volume.label, line)
        policy.refused_entries(self.volume, self.status.refused).raise_on(self.context.catalog)

    def _copy_all(self, pending: list[tuple[FileRecord, Path]], faults: IngestFaults,
                  copied: Callable[[FileRecord], None]) -> None:
        ctx, st = self.context, self.status
        started, copied_before = time.monotonic(), st.bytes_copied
        while pending and not self._gone.is_set():
            n = next_batch(pending)
            batch, pending = pending[:n], pending[n:]
            with ctx.permits:
                done = ctx.ingestor.ingest_batch(batch, abort=self._should_stop)
            for record in done.sealed:
                copied(record)
                faults.succeeded()
                st.set_state(SlotState.INGESTING)
                st.files_done += 1
                st.bytes_copied += record.source_size or 0
            if done.sealed:
                self._progress()
                elapsed = time.monotonic() - started
                if elapsed > 0:
                    st.rate_bps = (st.bytes_copied - copied_before) / elapsed
            if done.failed is not None:
                record, path, exc = done.failed
                if faults.failed(record, path, exc) is Step.STOP:
                    return
                pending = done.rest + pending

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.status.bytes_copied, self.status.bytes_total)
