"""Verify-then-clear (G2): deleting a recorder's original only after the platform confirmed its copy.

A module of its own because it is the one place the agent deletes evidence from a recorder. A file is
cleared only if its dock says `clear_after_sync`, the receiver confirmed it (synced, or since purged
locally), and the original on the volume is still the file that was copied: same size and content
fingerprint (same mtime for a row recorded without one; the full SHA-256 too when other content of the device
shares that fingerprint) and, with `verify_before_clear`, the same SHA-256,
and, checked again just before the deletion, the receiver's receipt kept in the catalog still verifies
against the pinned receiver keys and binds this file (a key removed from `mqtt.receiver_keys` since, or a
receipt altered in the catalog, stops the clearing). Anything else is an alarm and the original stays. The
deletion is audited (`recorder.clearing`) before it happens, so an agent killed between the deletion and its
record finishes the record after its restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog, FileRecord
from edge_agent.catalog.docking import DockingRecords
from edge_agent.config import Dock
from edge_agent.digest import fingerprint, fingerprint_base, fingerprint_covers_all, fingerprint_sha256, hash_file
from edge_agent.durable import fsync_dir
from edge_agent.evidence.receipts import PinnedKeys, ReceiptTrust
from edge_agent.sources.docks import policy

CLEAR_REASON = "receiver's verified receipt binds this SHA-256; dock clear_after_sync"
CLEARING = "recorder.clearing"   # audited just before the original is deleted


class ReceiptCheck:
    """Whether the platform's receipt of a file, as the catalog keeps it, proves the file is stored."""

    def __init__(self, catalog: Catalog, agent_id: str, keys: PinnedKeys):
        self.catalog = catalog
        self.trust = ReceiptTrust(agent_id, keys)

    def problem(self, record: FileRecord) -> str | None:
        """None if the stored receipt verifies now (the pinned keys read afresh); else why not, for a person."""
        return self.trust.problem(self.catalog.receipts.get(record.file_id), record)


class Clearing:
    """Clears the confirmed originals on one docked volume, per its dock's configuration."""

    def __init__(self, catalog: Catalog, records: DockingRecords, volume: DockedVolume,
                 dock: Dock | None, *, receipts: ReceiptCheck,
                 checkpoint: Callable[..., object] | None = None):
        self.catalog = catalog
        self.records = records
        self.volume = volume
        self.dock = dock
        self.receipts = receipts
        self.checkpoint = checkpoint   # signs a checkpoint of both chains (ingest.Sealer.checkpoint)
        self._checkpointed = False     # in this pass

    @property
    def enabled(self) -> bool:
        return self.dock is not None and self.dock.clear_after_sync

    def clear_synced(self, device_id: str, gone: Callable[[], bool]) -> None:
        """Clear every confirmed original of `device_id` on this volume; stops as soon as `gone()`."""
        if not self.enabled:
            return
        self._checkpointed = False
        for record in self.records.clearable(device_id, self.volume.label):
            if gone():
                return
            self.clear_one(record)

    def clear_one(self, record: FileRecord) -> None:
        path = self.volume.path / record.original_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if self._was_deleting(record):   # killed between the deletion and its record: finish the record
                self.records.cleared(record, reason=CLEAR_REASON + "; recorded after a restart", actor="edge-agent")
            else:
                self.records.original_gone(record)
            return
        # With a content fingerprint, the content decides (the same bytes re-docked with another mtime are
        # cleared); without one (a row from before fingerprints), size and mtime must still match.
        if st.st_size != record.source_size or (
                record.source_fingerprint is None and st.st_mtime_ns != record.source_mtime_ns):
            policy.clear_refused(record, "differs from the copy the platform confirmed").raise_on(self.catalog)
            return
        if record.source_fingerprint is not None and not self._same_recording(record, path, st.st_size):
            # Another recording has this name, size and mtime (a twin, its own row): this original is gone.
            self.records.original_gone(record)
            return
        if self.dock is not None and self.dock.verify_before_clear:
            digest, _ = hash_file(path)
            if digest != record.sha256:
                policy.clear_refused(record, "no longer hashes to the confirmed SHA-256").raise_on(self.catalog)
                return
        problem = self.receipts.problem(record)   # checked last, just before the deletion
        if problem is not None:
            policy.clear_refused(record, f"has no verified receipt from the platform ({problem}); check "
                                         "mqtt.receiver_keys and run: edge-agent verify " + record.file_id
                                 ).raise_on(self.catalog)
            return
        if self.checkpoint is not None and not self._checkpointed:
            # Before a recorder loses anything, both chains are checkpointed (the checkpoint goes to the
            # platform on the chain stream): the history that led here can no longer be quietly cut.
            self.checkpoint(f"before clearing {record.device_id} on {self.volume.dock}/{self.volume.slot}",
                            force=True)
            self._checkpointed = True
        # The intent is durable before the deletion, so a crash in between still ends in `source_cleared`.
        self.catalog.audit(CLEARING, subject=record.file_id, reason=CLEAR_REASON, actor="edge-agent",
                           detail={"device_id": record.device_id, "path": record.original_path})
        os.unlink(path)
        fsync_dir(path.parent)
        self.records.cleared(record, reason=CLEAR_REASON, actor="edge-agent")

    def _same_recording(self, record: FileRecord, path: os.PathLike[str], size: int) -> bool:
        """Is the file at `path` the content of `record`? Its fingerprint must match; when other content of the
        device shares that fingerprint (recordings differing only in their middle), the full SHA-256 decides."""
        assert record.source_fingerprint is not None
        base = fingerprint_base(record.source_fingerprint)
        if fingerprint(path) != base:
            return False
        if fingerprint_covers_all(size):
            return True
        shared = (fingerprint_sha256(record.source_fingerprint) is not None
                  or len(self.catalog.files.with_fingerprint(record.device_id, base)) > 1)
        return not shared or hash_file(path)[0] == record.sha256

    def _was_deleting(self, record: FileRecord) -> bool:
        """True if this file's last audit entry says its original was about to be deleted by us."""
        last = self.catalog.audit_log.entries(record.file_id, limit=1, newest_first=True)
        return bool(last) and last[0]["action"] == CLEARING
