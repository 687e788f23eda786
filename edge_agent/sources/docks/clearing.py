"""Verify-then-clear (G2): deleting a recorder's original only after the platform confirmed its copy.

A module of its own because it is the one place the agent deletes evidence from a recorder. A file is
cleared only if its dock says `clear_after_sync`, the receiver confirmed it (synced, or since purged
locally), and the original on the volume is still the file that was copied: same size and content
fingerprint (same mtime for a row recorded without one) and, with `verify_before_clear`, the same SHA-256.
Anything else is an alarm and the original stays.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog, FileRecord
from edge_agent.catalog.docking import DockingRecords
from edge_agent.config import Dock
from edge_agent.digest import fingerprint, hash_file
from edge_agent.durable import fsync_dir
from edge_agent.sources.docks import policy

CLEAR_REASON = "receiver confirmed matching SHA-256; dock clear_after_sync"


class Clearing:
    """Clears the confirmed originals on one docked volume, per its dock's configuration."""

    def __init__(self, catalog: Catalog, records: DockingRecords, volume: DockedVolume,
                 dock: Dock | None):
        self.catalog = catalog
        self.records = records
        self.volume = volume
        self.dock = dock

    @property
    def enabled(self) -> bool:
        return self.dock is not None and self.dock.clear_after_sync

    def clear_synced(self, device_id: str, gone: Callable[[], bool]) -> None:
        """Clear every confirmed original of `device_id` on this volume; stops as soon as `gone()`."""
        if not self.enabled:
            return
        for record in self.records.clearable(device_id, self.volume.label):
            if gone():
                return
            self.clear_one(record)

    def clear_one(self, record: FileRecord) -> None:
        path = self.volume.path / record.original_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self.records.original_gone(record)
            return
        # With a content fingerprint, the content decides (the same bytes re-docked with another mtime are
        # cleared); without one (a row from before fingerprints), size and mtime must still match.
        if st.st_size != record.source_size or (
                record.source_fingerprint is None and st.st_mtime_ns != record.source_mtime_ns):
            policy.clear_refused(record, "differs from the copy the platform confirmed").raise_on(self.catalog)
            return
        if record.source_fingerprint is not None and fingerprint(path) != record.source_fingerprint:
            # Another recording has this name, size and mtime (a twin, its own row): this original is gone.
            self.records.original_gone(record)
            return
        if self.dock is not None and self.dock.verify_before_clear:
            digest, _ = hash_file(path)
            if digest != record.sha256:
                policy.clear_refused(record, "no longer hashes to the confirmed SHA-256").raise_on(self.catalog)
                return
        os.unlink(path)
        fsync_dir(path.parent)
        self.records.cleared(record, reason=CLEAR_REASON, actor="edge-agent")
