"""Sealing: sign a staged file's manifest, write it durably, link it into the agent's document chain.

The manifest is built from the catalog row alone (`evidence.manifest.file_manifest`): the keys a source
adds (a camera segment's camera and the gaps before it) were stored on the row at discovery (`extras`),
so a file sealed by crash recovery carries them too, and sealing never calls back into a source.
Session manifests, annotations and key rotations are signed into the same chain by `sign_document`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.config import AgentConfig
from edge_agent.durable import SyncGroup, atomic_write_many
from edge_agent.evidence.manifest import (
    GENESIS_PREV,
    MANIFEST_VERSION,
    AgentKey,
    canonical_json,
    file_manifest,
    session_manifest,
    write_document,
)
from edge_agent.layout import StoreLayout


def _loads(text: str | None) -> dict[str, Any]:
    """A JSON object column (media, extras); anything else reads as no keys."""
    value = json.loads(text) if text else None
    return value if isinstance(value, dict) else {}


@dataclass(eq=False)
class Sealer:
    """Signs documents and links them into the agent's single hash chain, one at a time."""

    catalog: Catalog
    key: AgentKey
    layout: StoreLayout
    config: AgentConfig
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _head(self) -> tuple[int, str]:
        return self.catalog.documents.head() or (0, GENESIS_PREV)

    def manifest_body(self, record: FileRecord, model_serial: tuple[Any, Any] | None = None) -> dict[str, Any]:
        """The signed fields of `record`'s manifest, from its row and its device's row."""
        model, serial = model_serial or self.catalog.devices.model_serial(record.device_id)
        return file_manifest(record, _loads(record.media), _loads(record.extras), agent=self.config.agent,
                             model=model, serial=serial, chunk_size=self.config.mqtt.chunk_kib * 1024)

    def _signed(self, conn: Any, kind: str, doc_id: str, body: dict[str, Any],
                path: Path) -> tuple[dict[str, Any], str]:
        """Sign `body` after the chain head, write it durably and chain it; inside the caller's transaction."""
        seq, prev = self._head()
        doc = self.key.sign({**body, "prev": prev})
        digest = hashlib.sha256(write_document(path, doc)).hexdigest()
        self.catalog.documents.append(seq + 1, kind, doc_id, digest, prev, str(path.relative_to(self.layout.data_dir)))
        return doc, digest

    def seal(self, record: FileRecord) -> dict[str, Any]:
        """staged -> sealed: sign the manifest, write it durably, then record it. Returns the manifest."""
        return self._seal([record])[0][0]

    def seal_batch(self, records: list[FileRecord]) -> list[FileRecord]:
        """staged -> sealed for every row of `records`, chained in their order: each manifest is signed
        (after the previous one), all are written and fsynced, their directories fsynced once, and only then
        one transaction records every document and every `sealed`. Returns the sealed rows."""
        return [row for _, row in self._seal(records)]

    def _seal(self, records: list[FileRecord]) -> list[tuple[dict[str, Any], FileRecord]]:
        if not records:
            return []
        devices = {r.device_id: self.catalog.devices.model_serial(r.device_id) for r in records}
        bodies = [(record, self.manifest_body(record, devices[record.device_id])) for record in records]
        # The write transaction is held while the documents are written, so the chain stays linear even
        # when another process (a custodian's CLI) signs at the same time.
        with self._lock, self.catalog.transaction():
            seq, prev = self._head()
            signed = []
            for record, body in bodies:
                doc = self.key.sign({**body, "prev": prev})
                data = canonical_json(doc)
                signed.append((record, doc, data, prev, self.layout.manifest_path(record.file_id)))
                prev = hashlib.sha256(data).hexdigest()
            with SyncGroup(self.layout.manifests, grouped=len(signed) > 1) as group:
                atomic_write_many([(path, data, 0o444) for _, _, data, _, path in signed], group)
                group.sync()
            done = []
            for record, doc, data, before, path in signed:
                seq, digest = seq + 1, hashlib.sha256(data).hexdigest()
                self.catalog.documents.append(seq, "file", record.file_id, digest, before,
                                              str(path.relative_to(self.layout.data_dir)))
                done.append((doc, self.catalog.transition(
                    record.file_id, State.SEALED, expect=State.STAGED, actor="edge-agent", manifest_sha256=digest,
                    audit_detail={"manifest_sha256": digest})))
        return done

    def sign_document(self, kind: str, doc_id: str, body: dict[str, Any], path: Path,
                      after: Callable[[Any, str], None] | None = None) -> dict[str, Any]:
        """Sign and chain a session manifest or annotation. `after(conn, digest)` runs in the same transaction."""
        with self._lock, self.catalog.transaction() as conn:
            doc, digest = self._signed(conn, kind, doc_id, {"v": MANIFEST_VERSION, "type": kind,
                                                            "agent_id": self.config.agent.id, **body}, path)
            if after is not None:
                after(conn, digest)
        return doc

    def seal_session(self, session_id: str,
                     volume_files: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Sign the batch manifest of one docking session: every file it brought, with hash and size, and
        (`volume_files`, from the dock's last pass) every file found on the volume, collected or not and why."""
        rows = self.catalog.sessions.files(session_id)
        session = self.catalog.sessions.get(session_id)
        if session is None:
            return None
        body = session_manifest(session, rows, self.config.agent.zone, volume_files)
        path = self.layout.session_manifest_path(session_id)

        def record(_conn: Any, digest: str) -> None:
            self.catalog.sessions.set_manifest(session_id, digest, len(rows))

        return self.sign_document("session", session_id, body, path, after=record)
