"""Tamper detection (G4): re-hash stored files, check every signed document and
both chains (documents and audit), and the platform's receipt of every synced file. Used by
`edge-agent verify`, the scrub and the export.

A signature is trusted only by a key of the agent's signed key history (evidence/keys.py): the genesis key
and the keys the chain's rotation documents hand over to; in the chain each document must be signed by the
key in force at its place."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edge_agent.catalog import CONFIRMED, Catalog, FileRecord, State
from edge_agent.digest import hash_file
from edge_agent.evidence.keys import KeyHistory, key_history
from edge_agent.evidence.manifest import (
    GENESIS_PREV,
    ManifestError,
    canonical_json,
    read_document,
    verify_signature,
)
from edge_agent.evidence.receipts import ReceiptTrust
from edge_agent.layout import StoreLayout


@dataclass(frozen=True)
class Finding:
    subject: str      # file id, document id or "audit"
    what: str         # media | manifest | chain | audit
    message: str

    def __str__(self) -> str:
        return f"{self.subject} [{self.what}]: {self.message}"


def verify_file(record: FileRecord, layout: StoreLayout, keys: KeyHistory,
                rehash: bool = True) -> list[Finding]:
    findings: list[Finding] = []
    manifest_path = layout.manifest_path(record.file_id)
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        return [Finding(record.file_id, "manifest", f"manifest missing: {exc.strerror}")]
    if hashlib.sha256(raw).hexdigest() != record.manifest_sha256:
        findings.append(Finding(record.file_id, "manifest", "manifest bytes differ from the hash recorded at sealing"))
    try:
        doc = read_document(manifest_path)
        verify_signature(doc, keys.public_for(doc.get("key_id")))
    except ManifestError as exc:
        return [*findings, Finding(record.file_id, "manifest", str(exc))]
    if doc.get("sha256") != record.sha256 or doc.get("size") != record.size:
        findings.append(Finding(record.file_id, "manifest", "manifest hash/size differ from the catalog"))
    if record.state == State.PURGED or not rehash:
        return findings
    stored = layout.data_dir / (record.store_path or "")
    try:
        digest, size = hash_file(stored)
    except OSError as exc:
        return [*findings, Finding(record.file_id, "media", f"stored copy unreadable: {exc.strerror}")]
    if digest != doc.get("sha256") or size != doc.get("size"):
        findings.append(Finding(record.file_id, "media",
                                f"stored copy {stored} does not match its manifest (sha256 {digest[:16]}…, "
                                f"{size} bytes): altered after sealing"))
    return findings


def verify_receipt(record: FileRecord, catalog: Catalog, layout: StoreLayout, trust: ReceiptTrust) -> list[Finding]:
    """A file the platform confirmed (synced, cleared, purged) has the receiver's receipt, in the catalog and
    beside its manifest, byte for byte the same, and it verifies against the pinned receiver keys."""
    if record.state not in CONFIRMED:
        return []
    receipt = catalog.receipts.get(record.file_id)
    if receipt is None:
        return [Finding(record.file_id, "receipt", "marked synced, but the catalog holds no receipt from the platform")]
    findings = []
    try:
        copy = layout.receipt_path(record.file_id).read_bytes()
    except OSError as exc:
        findings.append(Finding(record.file_id, "receipt", f"the receipt's copy beside the manifest is missing: "
                                                           f"{exc.strerror}"))
    else:
        if copy != canonical_json(receipt):
            findings.append(Finding(record.file_id, "receipt", "the receipt's copy differs from the catalog's"))
    problem = trust.problem(receipt, record)
    if problem is not None:
        findings.append(Finding(record.file_id, "receipt", problem))
    return findings


def verify_chain(catalog: Catalog, layout: StoreLayout, keys: KeyHistory) -> list[Finding]:
    """Walk the signed-document chain: every link, every document's bytes, and its signature by the key in
    force at its place (the rotation documents decide which)."""
    findings = [Finding("keys", "chain", problem) for problem in keys.problems]
    prev, expected = GENESIS_PREV, 1
    for row in catalog.documents.chain():
        if row["seq"] != expected:
            findings.append(Finding(row["doc_id"], "chain", f"document seq {expected} is missing"))
        if row["prev"] != prev:
            findings.append(Finding(row["doc_id"], "chain", "link to the previous document is broken"))
        path = layout.data_dir / row["path"]
        try:
            raw = path.read_bytes()
        except OSError as exc:
            findings.append(Finding(row["doc_id"], "chain", f"{row['kind']} document missing: {exc.strerror}"))
        else:
            if hashlib.sha256(raw).hexdigest() != row["sha256"]:
                findings.append(Finding(row["doc_id"], "chain", f"{row['kind']} document was altered"))
            else:
                try:
                    doc = read_document(path)
                    expected = keys.in_force_at(row["seq"])
                    if doc.get("key_id") != expected:
                        raise ManifestError(f"signed by {str(doc.get('key_id'))[:80]!r}, but the key in force at "
                                            f"chain seq {row['seq']} is {expected} ({keys.describe()}); a public "
                                            "key file (e.g. in keys/retired/) is not trusted")
                    verify_signature(doc, keys.public_for(expected))
                    if doc.get("prev") != row["prev"]:
                        findings.append(Finding(row["doc_id"], "chain", "document's prev differs from the chain"))
                except ManifestError as exc:
                    findings.append(Finding(row["doc_id"], "chain", str(exc)))
        prev, expected = row["sha256"], row["seq"] + 1
    head = catalog.documents.head()
    if head is not None and head != (expected - 1, prev):
        findings.append(Finding("chain", "chain", "the chain ends before its recorded head (documents removed)"))
    return findings


def verify_audit(catalog: Catalog) -> list[Finding]:
    _count, problems = catalog.audit_log.verify()
    return [Finding("audit", "audit", str(p)) for p in problems]


def iter_files(catalog: Catalog, file_ids: list[str] | None = None) -> Iterator[FileRecord]:
    if file_ids:
        for file_id in file_ids:
            yield catalog.get(file_id)
        return
    last = ""
    while True:
        batch = catalog.files.sealed_after(last, 500)
        if not batch:
            return
        yield from batch
        last = batch[-1].file_id


def verify_all(catalog: Catalog, layout: StoreLayout, file_ids: list[str] | None = None,
               progress: Callable[[FileRecord], None] | None = None,
               receipts: ReceiptTrust | None = None) -> list[Finding]:
    """Every finding about these files (default: all, then the chain and the audit log); with `receipts`, the
    platform's receipt of every confirmed file too. Keys are trusted by the signed key history only."""
    keys = key_history(catalog, layout)
    findings: list[Finding] = []
    for record in iter_files(catalog, file_ids):
        findings.extend(verify_file(record, layout, keys))
        if receipts is not None:
            findings.extend(verify_receipt(record, catalog, layout, receipts))
        if progress is not None:
            progress(record)
    if not file_ids:
        findings.extend(verify_chain(catalog, layout, keys))
        findings.extend(verify_audit(catalog))
    return findings
