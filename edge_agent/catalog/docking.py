"""The catalog as a dock slot reads and writes it: a session's progress, what a volume still owes, which
recorder originals may be cleared, and the bookkeeping of a failed copy or a cleared original.

A repository over `Catalog`'s public methods (`query`, `files`, `update`, `transaction`, `audit`); the dock
code in `edge_agent/sources/docks/` speaks no SQL of its own.
"""

from __future__ import annotations

from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.clock import now_ms

# A file still to be taken from its recorder: found, perhaps copied, not yet sealed.
_INTAKE = (State.DISCOVERED, State.STAGED)
# A file whose copy the platform confirmed: its recorder original may be cleared.
_CONFIRMED = [State.SYNCED, State.PURGED]


class DockingRecords:
    """Reads and writes of the `files` table on behalf of one agent's dock slots."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def session_taken(self, session_id: str) -> tuple[int, int]:
        """(files, bytes) of a dock session that are past intake (sealed or later)."""
        row = self.catalog.query(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE session_id = ? AND state NOT IN (?, ?)",
            (session_id, *_INTAKE))[0]
        return int(row[0]), int(row[1])

    def outstanding(self, device_id: str, volume_label: str) -> int:
        """Files of this recorder volume still to take that have not failed with an error. One that failed
        (unreadable, copy mismatch) is retried at every rescan but does not hold back the session manifest."""
        row = self.catalog.query(
            "SELECT COUNT(*) FROM files WHERE device_id = ? AND volume_label = ? AND state IN (?, ?)"
            " AND last_error IS NULL", (device_id, volume_label, *_INTAKE))[0]
        return int(row[0])

    def clearable(self, device_id: str, volume_label: str) -> list[FileRecord]:
        """Files of this recorder volume the platform confirmed whose original is not cleared yet."""
        return self.catalog.files(states=list(_CONFIRMED), where="device_id = ? AND volume_label = ?"
                                  " AND cleared_ms IS NULL", params=(device_id, volume_label))

    def record_failure(self, record: FileRecord, message: str) -> None:
        """A copy attempt failed: its error is kept on the row (shown, and it stops holding back the session)."""
        self.catalog.update(record.file_id, last_error=message, attempts=record.attempts + 1)

    def original_gone(self, record: FileRecord) -> None:
        """The original vanished from the recorder before we cleared it: nothing left to clear."""
        self.catalog.update(record.file_id, cleared_ms=now_ms(), last_error="original already gone from recorder")

    def cleared(self, record: FileRecord, *, reason: str, actor: str) -> None:
        """The original was deleted from the recorder. A synced file moves to source_cleared; one already
        purged locally keeps its state and the clearing is audited all the same. The state is read in the
        transaction that records the clearing: retention may purge the file while its original is being
        re-hashed, and that race must not lose the record of the deletion."""
        with self.catalog.transaction():
            if self.catalog.files.state_of(record.file_id) == State.SYNCED:
                self.catalog.transition(record.file_id, State.SOURCE_CLEARED, expect=State.SYNCED, actor=actor,
                                        reason=reason, cleared_ms=now_ms())
                return
            self.catalog.update(record.file_id, cleared_ms=now_ms())
            self.catalog.audit("recorder.cleared", subject=record.file_id, reason=reason, actor=actor,
                               detail={"device_id": record.device_id, "path": record.original_path})
