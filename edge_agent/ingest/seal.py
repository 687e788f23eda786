"""Sealing: sign a staged file's manifest, write it durably, link it into the agent's document chain.

The manifest is built from the catalog row alone (`evidence.manifest.file_manifest`): the keys a source
adds (a camera segment's camera and the gaps before it) were stored on the row at discovery (`extras`),
so a file sealed by crash recovery carries them too, and sealing never calls back into a source.
Session manifests, annotations and key rotations are signed into the same chain by `sign_document`,
checkpoints of the audit head and the chain head by `checkpoint`.

The key that signs is the one in force by the catalog (meta `signing_key_id`), checked inside every signing
transaction: a rotation (`rotate_key`, here or in another process) swaps it under the same lock and write
transaction that chains the rotation document, so no document is signed by the old key after it. The first
signing records the genesis key (evidence/keys.py), from which the rotation chain is trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog, FileRecord, State, audit, new_id
from edge_agent.clock import now_ms, read_kernel_clock
from edge_agent.config import AgentConfig
from edge_agent.durable import SyncGroup, atomic_write, atomic_write_many
from edge_agent.evidence.keys import GENESIS_KEY, KEY_IN_FORCE, ROTATION_KIND, legacy_genesis
from edge_agent.evidence.manifest import (
    GENESIS_PREV,
    MANIFEST_VERSION,
    AgentKey,
    ManifestError,
    begin_rotation,
    canonical_json,
    file_manifest,
    finish_rotation,
    session_manifest,
    write_document,
)
from edge_agent.evidence.timestamps import TimestampError, request_token
from edge_agent.layout import StoreLayout

LAST_CHECKPOINT_KEY = "last_checkpoint"   # meta: "<chain seq>:<audit seq>" right after the last checkpoint


def _loads(text: str | None) -> dict[str, Any]:
    """A JSON object column (media, extras); anything else reads as no keys."""
    value = json.loads(text) if text else None
    return value if isinstance(value, dict) else {}


def sealing_clock() -> dict[str, Any] | None:
    """The `clock` object of a file manifest: the agent's clock as the kernel sees it at sealing (R9)."""
    kernel = read_kernel_clock()
    if kernel is None:
        return None
    return {"source": "kernel", "synchronized": kernel.synchronized, "maxerror_us": kernel.maxerror_us,
            "esterror_us": kernel.esterror_us}


@dataclass(eq=False)
class Sealer:
    """Signs documents and links them into the agent's single hash chain, one at a time."""

    catalog: Catalog
    key: AgentKey
    layout: StoreLayout
    config: AgentConfig
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _anchored: bool = field(default=False, init=False, repr=False)

    def _head(self) -> tuple[int, str]:
        """The chain head, with the key in force and the genesis key settled: call inside the signing
        transaction (it may swap `key` and write the genesis key into it)."""
        head = self.catalog.documents.head()
        self._key_in_force(head)
        return head or (0, GENESIS_PREV)

    def _key_in_force(self, head: tuple[int, str] | None) -> None:
        meta = self.catalog.meta
        in_force = meta.get(KEY_IN_FORCE)
        if in_force is not None and in_force != self.key.key_id:   # rotated by another process meanwhile
            self.key = AgentKey.load_in_force(self.layout.keys, in_force)
        if self._anchored:
            return
        if meta.get(GENESIS_KEY) is None:
            genesis = self.key.public if head is None else legacy_genesis(self.catalog, self.layout, self.key)
            if genesis is None:
                raise ManifestError("the chain's first document was not signed by this agent's key or a key in "
                                    "keys/retired/: its genesis key cannot be recorded; restore keys/ from backup")
            meta.set(GENESIS_KEY, AgentKey.raw_b64(genesis))
        if in_force is None:
            meta.set(KEY_IN_FORCE, self.key.key_id)
        self._anchored = True

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
        clock = sealing_clock()
        if clock is not None:
            bodies = [(record, {**body, "clock": clock}) for record, body in bodies]
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

    def checkpoint(self, reason: str, *, force: bool = False) -> dict[str, Any] | None:
        """Sign a checkpoint of the audit head and the chain head (docs/PROTOCOL.md section 10), chained like
        every document and audited (`checkpoint`) in the same transaction. Unless `force`, None and nothing
        signed when neither head moved since the last checkpoint but by that checkpoint itself."""
        with self._lock, self.catalog.transaction() as conn:
            audit_head = self.catalog.meta.get(audit.HEAD_KEY)
            audit_seq, _, audit_hash = (audit_head or f"0:{audit.GENESIS}").partition(":")
            chain_seq, chain_sha = self._head()
            if not force and self.catalog.meta.get(LAST_CHECKPOINT_KEY) == f"{chain_seq}:{audit_seq}":
                return None
            checkpoint_id = new_id()
            body = {"v": MANIFEST_VERSION, "type": "checkpoint", "agent_id": self.config.agent.id,
                    "checkpoint_id": checkpoint_id, "reason": reason, "ts_ms": now_ms(),
                    "audit_head": {"seq": int(audit_seq), "hash": audit_hash},
                    "chain_head": {"seq": chain_seq, "sha256": chain_sha}, **self._previous_timestamp(chain_seq)}
            doc, digest = self._signed(conn, "checkpoint", checkpoint_id, body,
                                       self.layout.checkpoint_path(checkpoint_id))
            entry = audit.append(conn, "checkpoint", subject=checkpoint_id, reason=reason, actor="edge-agent",
                                 detail={"chain_seq": chain_seq + 1, "sha256": digest, "audit_seq": int(audit_seq)})
            self.catalog.meta.set(LAST_CHECKPOINT_KEY, f"{chain_seq + 1}:{entry}")
        if self.config.evidence.tsa_url is not None:
            self._timestamp(checkpoint_id, canonical_json(doc))
        return doc

    def _timestamp(self, checkpoint_id: str, data: bytes) -> None:
        """Time-stamp a signed checkpoint (outside any transaction: a network call) and keep the token beside it;
        a failure is the alarm `timestamp_failed`, the checkpoint stands without a token."""
        evidence = self.config.evidence
        try:
            token = request_token(str(evidence.tsa_url), data, evidence.tsa_timeout_s)
        except TimestampError as exc:
            self.catalog.raise_alarm("timestamp_failed", "timestamp_failed", checkpoint_id,
                                     f"checkpoint {checkpoint_id} has no RFC 3161 time-stamp: {exc}")
            return
        atomic_write(self.layout.checkpoint_token_path(checkpoint_id), token, mode=0o444)
        self.catalog.clear_alarm("timestamp_failed")

    def _previous_timestamp(self, upto: int) -> dict[str, Any]:
        """`previous_timestamp` for the next checkpoint: the last checkpoint's token, so it reaches the platform
        inside the chain (a checkpoint cannot carry its own: the token is over its signed bytes)."""
        row = self.catalog.documents.latest("checkpoint", upto)
        if row is None:
            return {}
        try:
            token = self.layout.checkpoint_token_path(row["doc_id"]).read_bytes()
        except OSError:
            return {}
        return {"previous_timestamp": {"checkpoint_id": row["doc_id"], "seq": row["seq"], "sha256": row["sha256"],
                                       "token": base64.b64encode(token).decode("ascii")}}

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

    def follow_suite(self) -> tuple[str, str] | None:
        """When the key in force is of another suite than `[crypto] suite` (the operator changed it), rotate to a
        key of the configured suite (audited `keys.rotated`, via "config"); returns (old, new) key ids, else None.
        The data dir's owner only, like `rotate_key`."""
        in_force = self.catalog.meta.get(KEY_IN_FORCE)
        if in_force is not None and in_force != self.key.key_id:
            self.key = AgentKey.load_in_force(self.layout.keys, in_force)
        suite = self.config.crypto.suite
        if self.key.suite == suite:
            return None
        return self.rotate_key(reason=f"crypto suite changed from {self.key.suite} to {suite}", actor="edge-agent",
                               via="config")

    def rotate_key(self, *, reason: str, actor: str, via: str) -> tuple[str, str]:
        """Replace the signing key: the old key signs a `key_rotation` document naming the new one (its
        public key included), chained, with the new key recorded as the one in force and `keys.rotated`
        audited as `actor`, in one transaction after the next key's file and the document are durable; then
        the key files are swapped and this sealer signs with the new key. Returns (old, new) key ids. The
        data dir's owner only (it runs `recover_rotation` after a crash)."""
        with self._lock, self.catalog.transaction() as conn:
            self._head()   # the key in force and the genesis key, settled before the old key signs
            old = self.key
            new = begin_rotation(self.layout.keys, self.config.crypto.suite)
            body = {"v": MANIFEST_VERSION, "type": ROTATION_KIND, "agent_id": self.config.agent.id,
                    "old_key_id": old.key_id, "new_key_id": new.key_id, "new_public_key": new.public_pem(),
                    "reason": reason, "by": actor}
            path = self.layout.data_dir / "rotations" / f"{new.key_id.split(':', 1)[1]}.json"
            self._signed(conn, ROTATION_KIND, new.key_id, body, path)
            self.catalog.meta.set(KEY_IN_FORCE, new.key_id)
            audit.append(conn, "keys.rotated", subject=new.key_id, reason=reason, actor=actor,
                         detail={"old_key_id": old.key_id, "via": via})
            self.key = new
        finish_rotation(self.layout.keys)
        return old.key_id, new.key_id
