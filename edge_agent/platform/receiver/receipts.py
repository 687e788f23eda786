"""The receiver's receipts: its Ed25519 key, and the signed receipt every `complete` and `rejected` ack carries.

Public surface:
- `ReceiverKey.load_or_create(keys_dir)`: the receipt key, kept 0600 as `receiver_ed25519.pem` in
  `receiver.signing_key_dir` (default `<store_dir>/keys`), its public half beside it as `receiver_ed25519.pub`
  (what agents pin). `rotate(keys_dir)` replaces it (docs/PROTOCOL.md, "Receipts", for the order of steps).
- `Receipts(key, store, records).attach(agent_id, ack, manifest=...)`: the ack with its receipt; acks in other
  states pass unchanged. With `records` (the S3 backend, worm.py `BucketRecords`), a `complete` receipt is
  created in the bucket before the ack carries it; while the bucket cannot be reached the ack goes without one.

A `complete` receipt is built from the store's index entry (SHA-256, size, stored time) and the SHA-256 of
the manifest bytes stored beside the object (the exact bytes whose signature the receiver verified), so the
same stored file always gets the same receipt (Ed25519 signatures are deterministic). The document itself
is `evidence.receipts.receipt_body`, the one definition both ends share.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.clock import now_ms
from edge_agent.durable import atomic_write, fsync_dir
from edge_agent.evidence.manifest import AgentKey, load_private_key
from edge_agent.evidence.receipts import VERDICT_COMPLETE, VERDICT_REJECTED, receipt_body
from edge_agent.platform.receiver.store import ChunkStore, StoreUnavailable
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_REJECTED, Ack

log = logging.getLogger(__name__)

KEY_FILE = "receiver_ed25519.pem"
PUB_FILE = "receiver_ed25519.pub"


class ReceiverKey:
    """Loading, creating and rotating the receiver's receipt key (an `AgentKey`: the same signing)."""

    @staticmethod
    def load_or_create(keys_dir: Path) -> AgentKey:
        """The receipt key in `keys_dir`, created (0600, directory 0700) on first start."""
        path = Path(keys_dir) / KEY_FILE
        if not path.exists():
            ReceiverKey._write(Path(keys_dir), Ed25519PrivateKey.generate(), replace=False)
        return AgentKey(load_private_key(path))   # receivers sharing a store that started together: one key

    @staticmethod
    def rotate(keys_dir: Path) -> tuple[AgentKey, AgentKey]:
        """Replace the receipt key with a new one; returns (old, new). The old public key is kept as
        `retired/<key id>.pub`, so an operator can still hand it to auditors. A running receiver signs with the
        new key after its restart: pin the new public key on every agent first (docs/PROTOCOL.md)."""
        keys_dir = Path(keys_dir)
        old = ReceiverKey.load_or_create(keys_dir)
        atomic_write(keys_dir / "retired" / f"{old.key_id.split(':', 1)[1]}.pub", old.public_pem().encode("ascii"))
        return old, ReceiverKey._write(keys_dir, Ed25519PrivateKey.generate(), replace=True)

    @staticmethod
    def _write(keys_dir: Path, private: Ed25519PrivateKey, *, replace: bool) -> AgentKey:
        """Write the key (and its public half); without `replace`, a key another process wrote first wins."""
        key = AgentKey(private)
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(keys_dir, 0o700)
        staged = keys_dir / f".{KEY_FILE}.new-{os.getpid()}"
        atomic_write(staged, key.private_pem(), mode=0o600)
        try:
            if replace:
                os.replace(staged, keys_dir / KEY_FILE)
            else:
                os.link(staged, keys_dir / KEY_FILE)   # fails if another receiver made one meanwhile
        except FileExistsError:
            return AgentKey(load_private_key(keys_dir / KEY_FILE))
        finally:
            staged.unlink(missing_ok=True)
        atomic_write(keys_dir / PUB_FILE, key.public_pem().encode("ascii"), mode=0o644)
        fsync_dir(keys_dir)
        return key


class ReceiptRecords(Protocol):
    """Where `complete` receipts are kept (worm.py `BucketRecords`); raises StoreUnavailable."""

    def put_receipt(self, agent: str, file_id: str, receipt: dict[str, Any], entry: dict[str, Any]) -> None: ...


class Receipts:
    """Signs the receipt of each settled ack with the receiver's key."""

    def __init__(self, key: AgentKey, store: ChunkStore, records: ReceiptRecords | None = None):
        self.key = key
        self.store = store
        self.records = records

    def attach(self, agent_id: str, ack: Ack, *, manifest: bytes | None = None) -> Ack:
        """`ack` with its signed receipt (`complete`, `rejected`); other states and acks that carry one already
        are returned as they are. `manifest`: the bytes of a refused manifest, bound by a rejection's receipt."""
        if ack.receipt is not None or ack.state not in (ACK_COMPLETE, ACK_REJECTED):
            return ack
        if ack.state == ACK_COMPLETE:
            stored = self._stored(agent_id, ack)
            if stored is None:   # not in the index, or its manifest is unreadable: sent without a receipt
                log.error("complete ack sent without a receipt agent=%s file=%s", agent_id, ack.file_id)
                return ack
            body, entry = stored
            receipt = self.key.sign(body)
            if self.records is not None:
                try:
                    self.records.put_receipt(agent_id, ack.file_id, receipt, entry)
                except StoreUnavailable as exc:   # not kept: not sent (the agent asks again, clears nothing)
                    log.warning("complete ack sent without a receipt agent=%s file=%s: %s", agent_id, ack.file_id,
                                exc)
                    return ack
            return replace(ack, receipt=receipt)
        else:
            digest = hashlib.sha256(manifest).hexdigest() if manifest is not None else None
            body = receipt_body(VERDICT_REJECTED, agent_id=agent_id, file_id=ack.file_id, sha256=ack.sha256,
                                size=None, manifest_sha256=digest, ts_ms=now_ms(), reason=ack.reason)
        return replace(ack, receipt=self.key.sign(body))

    def _stored(self, agent_id: str, ack: Ack) -> tuple[dict, dict] | None:
        entry = self.store.stored(agent_id, ack.file_id)
        if entry is None:
            return None
        try:
            manifest = self.store.stored_manifest(entry["sha256"], agent_id, ack.file_id)
        except (OSError, StoreUnavailable) as exc:   # damaged or unreachable: no receipt, no recorder cleared
            log.error("stored manifest unreadable agent=%s file=%s: %s", agent_id, ack.file_id, exc)
            return None
        return receipt_body(VERDICT_COMPLETE, agent_id=agent_id, file_id=ack.file_id, sha256=entry["sha256"],
                            size=int(entry["size"]), manifest_sha256=hashlib.sha256(manifest).hexdigest(),
                            ts_ms=int(entry["stored_ms"])), entry
