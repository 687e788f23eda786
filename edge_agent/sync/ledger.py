"""The catalog's side of sending files: which files go next, opening them, and recording the verdicts.

The catalog is the truth (PROTOCOL.md 1): a file becomes `synced` only on a `complete` ack whose receipt,
signed by a pinned receiver key, binds the catalog's SHA-256, size and sealed manifest (sync/receipts.py;
the receipt is kept beside the manifest and in the catalog); a rejection leaves the file in place, raises
`sync_rejected` and waits for a custodian; a file this process cannot send raises `sync_blocked` and is
skipped until `sync now`.
"""

from __future__ import annotations

import json
import logging
import os
import time

from edge_agent.catalog import Catalog, FileRecord, State, TransitionError, UnknownFile
from edge_agent.clock import now_ms
from edge_agent.layout import StoreLayout
from edge_agent.sync.receipts import ReceiptGate
from edge_agent.sync.sender import Outgoing
from edge_agent.sync.transfer import MarkSynced, Transfer, Verdict

log = logging.getLogger(__name__)

ACTOR = "edge-agent"


class SyncLedger:
    """Reads the sync queue from the catalog and writes the outcome of each transfer back."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, receipts: ReceiptGate):
        self.catalog = catalog
        self.layout = layout
        self.receipts = receipts
        self._skipped: set[str] = set()   # files this process cannot send (alarm raised)

    def next_files(self, limit: int, in_flight: set[str]) -> list[FileRecord]:
        """Up to `limit` files to start, in lane order, other than those in flight or blocked."""
        return self.catalog.next_to_send(limit, exclude=in_flight | self._skipped)

    def forgive(self) -> None:
        """`sync now`: try blocked files again."""
        self._skipped.clear()

    def open(self, record: FileRecord) -> Outgoing | None:
        """The file ready to send (manifest read and checked against the catalog, stored copy open), or None
        after raising `sync_blocked` with what to do."""
        try:
            manifest = self.layout.manifest_path(record.file_id).read_bytes()
            doc = json.loads(manifest)
            size, sha256, chunk_size = int(doc["size"]), str(doc["sha256"]), int(doc["chunk_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.blocked(record, f"its manifest cannot be read ({exc}); run: edge-agent verify {record.file_id}")
            return None
        if (size, sha256) != (record.size, record.sha256):
            self.blocked(record, "its manifest does not match the catalog (size or SHA-256); "
                                 f"run: edge-agent verify {record.file_id}")
            return None
        path = self.layout.data_dir / (record.store_path or "")
        try:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as exc:
            self.blocked(record, f"its stored copy cannot be opened ({exc.strerror}); "
                                 f"run: edge-agent verify {record.file_id}")
            return None
        transfer = Transfer(record.file_id, size, sha256, chunk_size, last_heard=time.monotonic())
        return Outgoing(record, manifest, path, fd, transfer)

    def claim(self, record: FileRecord) -> bool:
        """`sealed` -> `sending` (one more attempt); False, logged, if the file moved meanwhile."""
        try:
            self.catalog.transition(record.file_id, State.SENDING, expect=State.SEALED, actor=ACTOR,
                                    attempts=record.attempts + 1)
        except (TransitionError, UnknownFile) as exc:
            log.warning("file=%s not sent: %s", record.file_id, exc)
            return False
        return True

    def blocked(self, record: FileRecord, why: str) -> None:
        """This process cannot send `record`: skip it, and raise `sync_blocked` saying why."""
        self._skipped.add(record.file_id)
        log.error("file=%s cannot be sent: %s", record.file_id, why)
        self.catalog.raise_alarm(f"sync_blocked:{record.file_id}", "sync_blocked", record.file_id,
                                 f"file {record.file_id} ({record.original_path}) cannot be sent: {why}")

    def sending(self, file_id: str) -> FileRecord | None:
        """The file a verdict is about, if it is still `sending` (None for a repeated ack, or an unknown file)."""
        try:
            record = self.catalog.get(file_id)
        except UnknownFile:
            log.warning("ack for a file this agent does not have: %s", file_id)
            return None
        return record if record.state == State.SENDING else None

    def settle(self, record: FileRecord, verdict: Verdict) -> None:
        """Record the receiver's verdict on a `sending` file."""
        file_id = record.file_id
        if isinstance(verdict, MarkSynced):
            if verdict.receipt is None:
                raise ValueError(f"file {file_id}: a file is synced only with the receiver's verified receipt")
            with self.catalog.transaction():
                self.catalog.receipts.put(file_id, verdict.receipt)
                self.catalog.transition(file_id, State.SYNCED, expect=State.SENDING, actor=ACTOR,
                                        reason="receiver's signed receipt binds this file's SHA-256",
                                        synced_ms=now_ms(), last_error=None,
                                        audit_detail={"sha256": verdict.sha256,
                                                      "receiver_key_id": verdict.receipt.get("key_id")})
            self.receipts.keep_copy(file_id, verdict.receipt)   # the catalog holds it: the copy is for readers
            log.info("synced file=%s size=%s receiver_key=%s", file_id, record.size, verdict.receipt.get("key_id"))
            return
        reason = verdict.reason
        self.catalog.transition(file_id, State.REJECTED, expect=State.SENDING, actor=ACTOR,
                                reason=f"receiver rejected: {reason}", last_error=reason[:1000])
        self.catalog.raise_alarm(
            f"sync_rejected:{file_id}", "sync_rejected", file_id,
            f"the platform rejected file {file_id} ({record.original_path} from {record.device_id}): {reason}. "
            "Nothing was deleted; check it with: edge-agent verify " + file_id
            + "; retry with: edge-agent sync now --retry-rejected")
        log.error("rejected file=%s reason=%s", file_id, reason)
