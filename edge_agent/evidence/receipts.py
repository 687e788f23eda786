"""Receipts: a receiver's signed word that it stored (or rejected) one file (docs/PROTOCOL.md, "Receipts").

Pure and shared: the receiver builds receipts with `receipt_body` and signs them with its Ed25519 key (the
same signing as every document: canonical JSON without `sig`, `key_id` inside the signed body); the agent
checks them with `check_receipt` against the receiver keys it pins (`PinnedKeys`), when the ack comes, again
just before a recorder's original is deleted, in `verify` and in an export bag.

A receipt is bound to one agent, one file, the file's SHA-256 and size, and the SHA-256 of the exact
manifest bytes the receiver verified: replayed for another file, another agent or another version of the
file, it does not verify.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.evidence.manifest import ManifestError, canonical_json, key_id_of, verify_signature
from edge_agent.evidence.suites import PublicKey, load_public_keys

if TYPE_CHECKING:
    from edge_agent.catalog import FileRecord

RECEIPT_VERSION = 1
RECEIPT_TYPE = "receipt"
CHAIN_RECEIPT_TYPE = "chain_receipt"
VERDICT_COMPLETE, VERDICT_REJECTED = "complete", "rejected"
_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


class ReceiptError(Exception):
    """A receipt that does not prove what it is asked to prove; the text says what is wrong with it."""


def receipt_body(verdict: str, *, agent_id: str, file_id: str, sha256: str | None, size: int | None,
                 manifest_sha256: str | None, ts_ms: int, reason: str | None = None) -> dict[str, Any]:
    """The signed fields of a receipt (without `key_id` and `sig`, which signing adds). `ts_ms` is when the
    file was stored (`stored_ms`, verdict complete) or rejected (`rejected_ms`, with `reason`)."""
    body: dict[str, Any] = {"v": RECEIPT_VERSION, "type": RECEIPT_TYPE, "verdict": verdict, "agent_id": agent_id,
                            "file_id": file_id, "sha256": sha256, "size": size, "manifest_sha256": manifest_sha256}
    if verdict == VERDICT_COMPLETE:
        body["stored_ms"] = ts_ms
    else:
        body["rejected_ms"] = ts_ms
        body["reason"] = reason
    return body


def load_pem_keys(path: Path) -> dict[str, PublicKey]:
    """Every public key set (PEM `BEGIN PUBLIC KEY` blocks: Ed25519, SM2, or an Ed25519 block then an SM2 block,
    evidence/suites.py) in a file, or in the `*.pem` files of a directory, by key id. Raises OSError, ValueError
    or ManifestError for what cannot be read."""
    files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
    keys: dict[str, PublicKey] = {}
    for file in files:
        blocks = b"\n".join(_PEM_BLOCK.findall(file.read_bytes()))
        for key in load_public_keys(blocks) if blocks else ():
            keys[key_id_of(key)] = key
    return keys


def _stat_signature(path: Path) -> tuple:
    """What changes when a pinned key file is added, removed, replaced or edited."""
    files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
    return tuple((str(f), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for f in files
                 for st in (f.stat(),))


@dataclass(frozen=True)
class PinnedKeys:
    """The receiver public keys an agent trusts (`mqtt.receiver_keys`: a PEM file or a directory of `*.pem`).

    Read afresh at every check, so that a key added to the directory is trusted at once and a key removed is
    distrusted at once, by the running daemon too (the rotation procedure in docs/PROTOCOL.md relies on it)."""

    path: Path | None
    _cache: dict[tuple, dict[str, PublicKey]] = field(default_factory=dict, compare=False, repr=False)

    def keys(self) -> dict[str, PublicKey]:
        """The pinned keys now; raises ReceiptError saying what to fix when there are none to use. The files are
        parsed again whenever any of them (or the directory) changed since the last read: stat, not trust."""
        if self.path is None:
            raise ReceiptError("no receiver key is pinned (mqtt.receiver_keys is not set); set it to the "
                               "platform's receiver public key(s)")
        try:
            state = _stat_signature(self.path)
            keys = self._cache.get(state)
            if keys is None:
                keys = load_pem_keys(self.path)
                self._cache.clear()
                self._cache[state] = keys
        except (OSError, ValueError, ManifestError) as exc:
            raise ReceiptError(f"the pinned receiver keys {self.path} cannot be read ({exc}); "
                               "check mqtt.receiver_keys") from None
        if not keys:
            raise ReceiptError(f"no receiver public key (PEM) is pinned in {self.path}; install the platform's "
                               "receiver key there (mqtt.receiver_keys)")
        return keys


@dataclass(frozen=True)
class Expected:
    """What a receipt must bind: this agent, this file as the catalog holds it, the manifest it sealed."""

    agent_id: str
    file_id: str
    sha256: str | None
    size: int | None
    manifest_sha256: str | None

    @classmethod
    def of(cls, record: FileRecord, agent_id: str) -> Expected:
        """What a receipt of `record` must bind: the catalog's SHA-256 and size, the manifest it sealed."""
        return cls(agent_id, record.file_id, record.sha256, record.size, record.manifest_sha256)


def receipt_sha256(receipt: dict[str, Any]) -> str:
    """SHA-256 of a receipt's canonical bytes (signature included): how the catalog names one."""
    return hashlib.sha256(canonical_json(receipt)).hexdigest()


def chain_receipt_body(agent_id: str, seq: int, sha256: str) -> dict[str, Any]:
    """The signed fields of a chain receipt: "I hold `agent_id`'s document chain up to `seq`, whose document
    has this SHA-256" (docs/PROTOCOL.md section 10). No time in it: the same head gets the same bytes."""
    return {"v": RECEIPT_VERSION, "type": CHAIN_RECEIPT_TYPE, "agent_id": agent_id, "seq": seq, "sha256": sha256}


def verify_chain_receipt(receipt: object, keys: PinnedKeys, agent_id: str) -> dict[str, Any]:
    """The chain receipt, once its signature verifies against a pinned receiver key and it names this agent
    with an integer seq and a SHA-256; raises ReceiptError otherwise. The caller compares seq and sha256
    with its own chain."""
    doc = _signed_by_pinned(receipt, keys, CHAIN_RECEIPT_TYPE, agent_id)
    if not isinstance(doc.get("seq"), int) or doc["seq"] < 1 or not isinstance(doc.get("sha256"), str):
        raise ReceiptError("the chain receipt has no seq and sha256")
    return doc


def _signed_by_pinned(receipt: object, keys: PinnedKeys, kind: str, agent_id: str) -> dict[str, Any]:
    """`receipt` if it is a version-1 document of type `kind` signed by a pinned key for `agent_id`."""
    if not isinstance(receipt, dict):
        raise ReceiptError("the ack carries no receipt")
    if receipt.get("v") != RECEIPT_VERSION or receipt.get("type") != kind:
        raise ReceiptError(f"not a version {RECEIPT_VERSION} {kind} (v={receipt.get('v')!r}, "
                           f"type={receipt.get('type')!r})")
    key_id = receipt.get("key_id")
    key = keys.keys().get(key_id) if isinstance(key_id, str) else None
    if key is None:
        raise ReceiptError(f"signed by {key_id!r}, which is not a pinned receiver key")
    try:
        verify_signature(receipt, key)
    except ManifestError as exc:
        raise ReceiptError(f"receipt: {exc}") from None
    if receipt.get("agent_id") != agent_id:
        raise ReceiptError(f"the receipt is for agent {receipt.get('agent_id')!r}, not this agent ({agent_id})")
    return receipt


def verify_receipt(receipt: object, keys: PinnedKeys, agent_id: str, file_id: str) -> dict[str, Any]:
    """The receipt, once its signature verifies against a pinned key and it names this agent and file;
    raises ReceiptError otherwise. Says nothing yet about the verdict or the file's bytes."""
    doc = _signed_by_pinned(receipt, keys, RECEIPT_TYPE, agent_id)
    if doc.get("file_id") != file_id:
        raise ReceiptError(f"the receipt is for file {doc.get('file_id')!r}, not {file_id}")
    return doc


def check_receipt(receipt: object, keys: PinnedKeys, expected: Expected) -> dict[str, Any]:
    """The receipt, if it proves the receiver stored exactly this file: signed by a pinned key, verdict
    complete, and bound to this agent, file, SHA-256, size and manifest. Raises ReceiptError naming the
    first thing that does not hold."""
    return check_bindings(verify_receipt(receipt, keys, expected.agent_id, expected.file_id), expected)


def check_bindings(doc: dict[str, Any], expected: Expected) -> dict[str, Any]:
    """`check_receipt` for a receipt whose signature `verify_receipt` already checked."""
    if doc.get("verdict") != VERDICT_COMPLETE:
        raise ReceiptError(f"the receipt's verdict is {doc.get('verdict')!r}, not complete")
    for name in ("sha256", "size", "manifest_sha256"):
        want = getattr(expected, name)
        if want is None or doc.get(name) != want:
            raise ReceiptError(f"the receipt binds {name} {doc.get(name)!r}; this file has {want!r}")
    if not isinstance(doc.get("stored_ms"), int):
        raise ReceiptError("the receipt has no stored_ms")
    return doc


@dataclass(frozen=True)
class ReceiptTrust:
    """The agent's view of receipts: its own id and the receiver keys it pins."""

    agent_id: str
    keys: PinnedKeys

    def problem(self, receipt: object, record: FileRecord) -> str | None:
        """None if `receipt` proves the platform stores `record` as the catalog holds it; else why not."""
        try:
            check_receipt(receipt, self.keys, Expected.of(record, self.agent_id))
        except ReceiptError as exc:
            return str(exc)
        return None
