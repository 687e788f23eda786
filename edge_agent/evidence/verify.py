"""Tamper detection (G4): re-hash stored files, check every signed document and
both chains (documents and audit), that both still extend the last checkpoint the platform receipted, and the
platform's receipt of every synced file. Used by `edge-agent verify`, the scrub and the export.

A signature is trusted only by a key of the agent's signed key history (evidence/keys.py): the genesis key
and the keys the chain's rotation documents hand over to; in the chain each document must be signed by the
key in force at its place."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.catalog import CONFIRMED, Catalog, FileRecord, State
from edge_agent.catalog.chain_receipts import ChainReceipt
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
from edge_agent.evidence.suites import sm3_hasher
from edge_agent.evidence.timestamps import token_problem
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
    sm3 = sm3_hasher() if "sm3" in doc else None   # 国密 suites: the SM3 beside the SHA-256, in the same pass
    try:
        digest, size = hash_file(stored, also=() if sm3 is None else (sm3,))
    except OSError as exc:
        return [*findings, Finding(record.file_id, "media", f"stored copy unreadable: {exc.strerror}")]
    if digest != doc.get("sha256") or size != doc.get("size"):
        findings.append(Finding(record.file_id, "media",
                                f"stored copy {stored} does not match its manifest (sha256 {digest[:16]}…, "
                                f"{size} bytes): altered after sealing"))
    elif sm3 is not None and sm3.finalize().hex() != doc.get("sm3"):
        findings.append(Finding(record.file_id, "media", f"stored copy {stored} matches its manifest's SHA-256 but "
                                "not its SM3: the manifest's sm3 is wrong; compare with the platform's copy"))
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


def _receipted_checkpoint(catalog: Catalog) -> tuple[ChainReceipt | None, str]:
    """The platform's chain receipt kept, and how findings name what it covers."""
    kept = catalog.chain_receipts.get()
    if kept is None:
        return None, ""
    if kept.checkpoint is not None:
        return kept, (f"checkpoint {kept.checkpoint.get('checkpoint_id')} (chain seq {kept.checkpoint_seq}, "
                      f"receipted by the platform up to chain seq {kept.seq})")
    return kept, f"the platform's chain receipt (chain seq {kept.seq})"


def verify_checkpoint(catalog: Catalog, keys: KeyHistory) -> list[Finding]:
    """The local document chain still extends what the platform receipted: its document at the receipted seq
    is the receipted one, and the last receipted checkpoint is still in it, signed by this agent."""
    kept, label = _receipted_checkpoint(catalog)
    if kept is None:
        return []
    findings: list[Finding] = []
    head = catalog.documents.head() or (0, GENESIS_PREV)
    row = catalog.documents.at(kept.seq)
    if row is None:
        findings.append(Finding(label, "checkpoint", f"the platform holds this agent's chain up to document {kept.seq} "
                                f"(sha256 {kept.sha256[:16]}…), but the local chain ends at {head[0]}: documents "
                                f"{head[0] + 1}..{kept.seq} were removed after the platform received them. Compare "
                                "with the platform's copy of the chain; do not clear recorders meanwhile"))
    elif row["sha256"] != kept.sha256:
        findings.append(Finding(label, "checkpoint", f"the local document {kept.seq} is not the one the platform "
                                f"receipted (sha256 {kept.sha256[:16]}…): the chain was rewritten"))
    cp = kept.checkpoint
    if cp is not None and kept.checkpoint_seq is not None:
        try:
            verify_signature(cp, keys.public_for(cp.get("key_id")))
        except ManifestError as exc:
            findings.append(Finding(label, "checkpoint", f"the receipted checkpoint does not verify: {exc}"))
        cp_row = catalog.documents.at(kept.checkpoint_seq)
        if cp_row is None or cp_row["sha256"] != hashlib.sha256(canonical_json(cp)).hexdigest():
            findings.append(Finding(label, "checkpoint", f"the checkpoint document (chain seq {kept.checkpoint_seq}) "
                                    "is missing from the local chain or differs from the one the platform receipted"))
    return findings


def verify_audit_checkpoint(catalog: Catalog) -> list[Finding]:
    """The local audit log still extends the audit head of the last checkpoint the platform receipted."""
    kept, label = _receipted_checkpoint(catalog)
    if kept is None or kept.checkpoint is None:
        return []
    audit_head = kept.checkpoint.get("audit_head") or {}
    seq, digest = audit_head.get("seq"), audit_head.get("hash")
    if not isinstance(seq, int) or seq < 1:
        return []
    entry = catalog.audit_log.at(seq)
    if entry is None:
        last = catalog.audit_log.last_seq()
        return [Finding(label, "audit", f"the checkpoint holds audit head {seq} (hash {str(digest)[:16]}…), but the "
                        f"local audit log ends at {last}: entries {last + 1}..{seq} were removed after the "
                        "checkpoint was signed and receipted")]
    if entry["hash"] != digest:
        return [Finding(label, "audit", f"audit entry {seq} is not the one the checkpoint holds (hash "
                        f"{str(digest)[:16]}…): the log was rewritten")]
    return []


def verify_timestamps(catalog: Catalog, layout: StoreLayout, tsa_ca: Path | None) -> list[Finding]:
    """Every checkpoint's RFC 3161 token kept beside it time-stamps exactly that checkpoint's bytes (and, with the
    authority's root `tsa_ca`, is signed under it)."""
    findings = []
    for row in catalog.documents.chain():
        if row["kind"] != "checkpoint":
            continue
        try:
            token = layout.checkpoint_token_path(row["doc_id"]).read_bytes()
            data = (layout.data_dir / row["path"]).read_bytes()
        except FileNotFoundError:
            continue   # no token (no authority configured then, or it failed: `timestamp_failed`)
        problem = token_problem(token, data, tsa_ca)
        if problem is not None:
            findings.append(Finding(f"checkpoint {row['doc_id']}", "timestamp", f"RFC 3161 token: {problem}"))
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
               receipts: ReceiptTrust | None = None, tsa_ca: Path | None = None) -> list[Finding]:
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
        findings.extend(verify_checkpoint(catalog, keys))
        findings.extend(verify_timestamps(catalog, layout, tsa_ca))
        findings.extend(verify_audit(catalog))
        findings.extend(verify_audit_checkpoint(catalog))
    return findings
