"""Export of a case for court or long-term keeping (R6, R7), as a BagIt bag (RFC 8493).

The bag's payload holds, for every file tagged with the case: the media
copy, its signed manifest, the session manifests of the dockings that brought
it, its signed annotations, the platform's signed receipt (and the receiver key
that signed it), the agent's public key, a verification report
and a short note on how to check it all. Bag-level SHA-256 manifests let a
third party validate the bag with any BagIt tool (`bagit.py --validate`);
the signatures and the manifests' `sha256` prove the media are the originals.

An export needs a reason and an approver, both written into the bag's
bag-info.txt and, with the requester, into the audit log.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bagit
from cryptography.hazmat.primitives import serialization

from edge_agent.atrest import AtRestError
from edge_agent.catalog import Catalog, FileRecord, audit
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.digest import hash_file, hash_stored
from edge_agent.durable import make_dirs
from edge_agent.evidence.keys import KeyHistory, key_history
from edge_agent.evidence.manifest import (
    ManifestError,
    canonical_json,
    key_id_of,
    load_public_key,
    public_pem,
    read_document,
    verify_signature,
)
from edge_agent.evidence.receipts import PinnedKeys, ReceiptError, ReceiptTrust
from edge_agent.evidence.suites import sm3_hasher
from edge_agent.evidence.verify import verify_file, verify_receipt
from edge_agent.i18n import N_, Refusal
from edge_agent.layout import StoreLayout

log = logging.getLogger(__name__)

HOW_TO_CHECK = """\
Evidence export of case {case} from agent {agent} ({unit}), made {made} by {requested_by}, approved by {approved_by}.
Reason: {reason}

How to check this bag:
1. BagIt: `bagit.py --validate {bag}` (or any RFC 8493 tool) proves no payload file changed since export.
2. Each media/<file_id>.* has SHA-256 equal to "sha256" in manifests/<file_id>.json.
3. Keys: keys/key_history.json names the agent's first key (genesis_key_id; compare it with the key the
   agent enrolled at the platform) and lists every later key with the rotation document in rotations/ that
   hands over to it: each rotation is signed by the key before it ("old_key_id") and carries the new key
   ("new_public_key", "new_key_id"). keys/agent/<key id>.pem holds each key; only those keys are trusted.
   Each manifest, session manifest and annotation is signed: "sig" is an Ed25519 signature (base64) by the
   key its "key_id" names, over the document's canonical JSON without "sig" (RFC 8785: UTF-8, sorted keys,
   no whitespace). "prev" links each document to the agent's previous one. Under the 国密 suites a
   document carries "sm2_sig" instead of or beside "sig": SM2 with SM3 (ID 1234567812345678, DER, base64) by
   the SM2 key "sm2_key_id" names (the last PEM block of the key's file), over the canonical JSON without
   "sig" and "sm2_sig"; a manifest's "sm3" is the SM3 of its media file (`openssl dgst -sm3`).
4. Each receipts/<file_id>.json is the platform's signed receipt of a synced file: "sig" is an Ed25519
   signature by the receiver key keys/receivers/<key id>.pem named in "key_id", over the receipt's canonical
   JSON without "sig"; it binds "file_id", "sha256", "size" and "manifest_sha256" (the SHA-256 of
   manifests/<file_id>.json, byte for byte).
5. verification.json is the agent's own check at export time.
Files whose media are not in this bag were purged locally after the platform confirmed them; their
manifests are here and the platform holds the confirmed copy.
"""


class ExportError(Refusal):
    """The export cannot be made as asked; nothing was written to the audit log as exported."""


@dataclass
class ExportResult:
    bag_dir: Path
    case_id: str
    files: int = 0
    media_bytes: int = 0
    not_local: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _copy_hashing(src: Path, dst: Path, file_id: str, layout: StoreLayout) -> tuple[str | None, int]:
    """Copy the plaintext in blocks, hashing it; fsync the copy. An encrypted stored copy is decrypted (the bag
    holds plaintext); a block of it that fails authentication raises `AtRestError`."""
    with open(dst, "wb", buffering=0) as fout:
        digest, size = hash_stored(src, file_id, layout.at_rest, fout.write)
        os.fsync(fout.fileno())
    return digest, size


def _annotations_by_file(catalog: Catalog, layout: StoreLayout, file_ids: set[str]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for relative in catalog.documents.paths("annotation"):
        path = layout.data_dir / relative
        doc = read_document(path)
        if doc.get("file_id") in file_ids:
            found.setdefault(doc["file_id"], []).append(path)
    return found


def export_case(catalog: Catalog, layout: StoreLayout, config: AgentConfig, *, case_id: str,
                dest: Path, reason: str, approved_by: str, requested_by: str | None = None) -> ExportResult:
    """Write the bag for `case_id` at `dest` (new or empty directory) and audit the export."""
    requester = requested_by or audit.os_user()
    if not reason.strip() or not approved_by.strip():
        raise ExportError(N_("an export needs --reason and --approved-by (R7: copying footage is approved and logged)"))
    records = catalog.files.of_case(case_id)
    if not records:
        raise ExportError(N_("no files are tagged with case {case_id!r} (tag them: edge-agent tag FILE --case …)"),
                          case_id=case_id)
    unsealed = [r.file_id for r in records if r.manifest_sha256 is None]
    if unsealed:
        raise ExportError(N_("{count} file(s) of case {case_id} are not sealed yet (first {first}); wait for ingest "
                             "to finish, then export"), count=len(unsealed), case_id=case_id, first=unsealed[0])
    if dest.exists() and any(dest.iterdir()):
        raise ExportError(N_("{dest} is not empty: give a new or empty directory for the bag"), dest=dest)
    make_dirs(dest)
    result = ExportResult(bag_dir=dest, case_id=case_id)
    keys = key_history(catalog, layout)
    try:
        _write_payload(catalog, layout, keys, config, records, dest, result)
        result.problems.extend(f"bag: {p}" for p in check_payload(dest))   # as a third party will check it
        made = now_ms()
        info = {
            "Source-Organization": config.agent.unit,
            "External-Identifier": f"{config.agent.id}/case/{case_id}",
            "External-Description": f"Enforcement audio/video of case {case_id}, exported with signed manifests",
            "Bag-Group-Identifier": case_id,
            "Contact-Name": requester,
            "Export-Requested-By": requester,
            "Export-Approved-By": approved_by,
            "Export-Reason": reason,
            "Agent-Id": config.agent.id,
            "Agent-Key-Id": str(keys.current_key_id),
            "Agent-Genesis-Key-Id": str(keys.genesis_key_id),
            "Export-Verification": "passed" if result.ok else f"{len(result.problems)} problem(s), see "
                                                                 "verification.json",
        }
        (dest / "README.txt").write_text(HOW_TO_CHECK.format(
            case=case_id, agent=config.agent.id, unit=config.agent.unit,
            made=datetime.fromtimestamp(made / 1000, UTC).isoformat(timespec="seconds"),
            requested_by=requester, approved_by=approved_by, reason=reason, bag=dest), encoding="utf-8")
        bag = bagit.make_bag(str(dest), bag_info=info, checksums=["sha256"], processes=1)
        oxum = bag.info.get("Payload-Oxum")
    except (OSError, bagit.BagError) as exc:
        catalog.audit("export.failed", subject=f"case:{case_id}", reason=reason, actor=requester,
                      detail={"approved_by": approved_by, "dest": str(dest), "error": str(exc)})
        raise ExportError(N_("export to {dest} failed: {error}; the partial bag there is not valid, remove it"),
                          dest=dest, error=exc) from exc
    with catalog.transaction() as conn:
        audit.append(conn, "export", subject=f"case:{case_id}", reason=reason, actor=requester,
                     detail={"approved_by": approved_by, "requested_by": requester, "dest": str(dest),
                             "files": result.files, "media_bytes": result.media_bytes, "payload_oxum": oxum,
                             "not_local": result.not_local, "problems": len(result.problems), "made_ms": made})
        for record in records:  # each file's own history shows who copied it, why and on whose approval
            audit.append(conn, "file.exported", subject=record.file_id, reason=reason, actor=requester,
                         detail={"approved_by": approved_by, "case_id": case_id, "dest": str(dest)})
    log.info("exported case=%s files=%d bytes=%d dest=%s problems=%d", case_id, result.files, result.media_bytes,
             dest, len(result.problems))
    return result


def _write_keys(layout: StoreLayout, keys: KeyHistory, config: AgentConfig, dest: Path) -> None:
    """Every key of the signed key history, the rotation documents between them and keys/key_history.json."""
    make_dirs(dest / "keys" / "agent")
    make_dirs(dest / "rotations")
    listed = []
    handed_over = {r.new_key_id: r for r in keys.rotations}
    for key_id, public in keys.keys.items():
        name = f"keys/agent/{key_id.split(':', 1)[1]}.pem"
        (dest / name).write_text(public_pem(public), encoding="ascii")
        rotation = handed_over.get(key_id)
        entry: dict[str, Any] = {"key_id": key_id, "public_key": name, "handed_over_by": None}
        if rotation is not None:
            entry["handed_over_by"] = f"rotations/{rotation.seq:08d}-{key_id.split(':', 1)[1]}.json"
            (dest / entry["handed_over_by"]).write_bytes((layout.data_dir / rotation.path).read_bytes())
        listed.append(entry)
    if keys.current_key_id is not None:
        (dest / "keys" / "agent_ed25519.pub").write_text(public_pem(keys.keys[keys.current_key_id]),
                                                         encoding="ascii")
    history = {"agent_id": config.agent.id, "genesis_key_id": keys.genesis_key_id, "keys": listed}
    (dest / "keys" / "key_history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")


def _write_payload(catalog: Catalog, layout: StoreLayout, keys: KeyHistory, config: AgentConfig,
                   records: list[FileRecord], dest: Path, result: ExportResult) -> None:
    for sub in ("media", "manifests", "sessions", "annotations", "keys", "receipts"):
        make_dirs(dest / sub)
    _write_keys(layout, keys, config, dest)
    result.problems.extend(keys.problems)
    trust = ReceiptTrust(config.agent.id, PinnedKeys(config.mqtt.receiver_keys))
    annotations = _annotations_by_file(catalog, layout, {r.file_id for r in records})
    sessions: set[str] = set()
    entries: list[dict[str, Any]] = []
    for record in records:
        findings = [str(f) for f in verify_file(record, layout, keys, rehash=False)]
        (dest / "manifests" / f"{record.file_id}.json").write_bytes(layout.manifest_path(record.file_id).read_bytes())
        entry: dict[str, Any] = {"file_id": record.file_id, "state": record.state, "sha256": record.sha256,
                                 "size": record.size, "device_id": record.device_id, "officer_id": record.officer_id,
                                 "party": record.party, "original_path": record.original_path}
        if record.state == "purged" or not record.store_path:
            entry["media"] = None
            entry["note"] = "media purged locally after the platform confirmed it; the platform holds the copy"
            result.not_local.append(record.file_id)
        else:
            src = layout.data_dir / record.store_path
            name = f"{record.file_id}{Path(record.store_path).suffix}"
            try:
                digest, size = _copy_hashing(src, dest / "media" / name, record.file_id, layout)
            except AtRestError as exc:
                (dest / "media" / name).unlink(missing_ok=True)
                digest, size = "", 0
                findings.append(f"{record.file_id} [media]: {exc}")
            entry["media"] = f"media/{name}" if digest else None
            if digest and (digest, size) != (record.sha256, record.size):
                findings.append(f"{record.file_id} [media]: stored copy does not match its manifest "
                                f"(sha256 {digest[:16]}…): altered after sealing")
            result.media_bytes += size
        if record.session_id and layout.session_manifest_path(record.session_id).exists():
            sessions.add(record.session_id)
        entry["annotations"] = []
        for path in annotations.get(record.file_id, []):
            (dest / "annotations" / path.name).write_bytes(path.read_bytes())
            entry["annotations"].append(f"annotations/{path.name}")
        entry["receipt"] = _write_receipt(catalog, layout, trust, record, dest, findings)
        entry["findings"] = findings
        result.problems.extend(findings)
        result.files += 1
        entries.append(entry)
    for session_id in sorted(sessions):
        (dest / "sessions" / f"{session_id}.json").write_bytes(
            layout.session_manifest_path(session_id).read_bytes())
    report = {"case_id": result.case_id, "agent_id": config.agent.id, "key_id": keys.current_key_id,
              "exported_at_ms": now_ms(), "host": platform.node(), "ok": result.ok, "files": entries,
              "sessions": sorted(sessions)}
    (dest / "verification.json").write_text(json.dumps(report, ensure_ascii=False, indent=2, sort_keys=True),
                                            encoding="utf-8")


def _write_receipt(catalog: Catalog, layout: StoreLayout, trust: ReceiptTrust, record: FileRecord, dest: Path,
                   findings: list[str]) -> str | None:
    """Put the platform's receipt of `record` (and the receiver key that signed it, if pinned) in the bag;
    what does not verify is added to `findings`. Returns its path in the bag, or None."""
    findings.extend(str(f) for f in verify_receipt(record, catalog, layout, trust))
    receipt = catalog.receipts.get(record.file_id)
    if receipt is None:
        return None
    (dest / "receipts" / f"{record.file_id}.json").write_bytes(canonical_json(receipt))
    key_id = str(receipt.get("key_id"))
    try:
        public = trust.keys.keys().get(key_id)
    except ReceiptError:
        public = None
    if public is not None:
        (dest / "keys" / "receivers").mkdir(exist_ok=True)
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (dest / "keys" / "receivers" / f"{key_id.split(':', 1)[-1]}.pem").write_bytes(pem)
    return f"receipts/{record.file_id}.json"


def check_payload(root: Path) -> list[str]:
    """Check a bag's payload (`<bag>/data`, or the export directory before it is bagged) from its own files
    alone, as docs/OPERATIONS.md tells a third party to: the key history from its genesis key through every
    rotation document, every signed document by a key of that history, every media file against its
    manifest. Returns the problems found (empty: it verifies)."""
    try:
        trusted = _bag_key_history(root)
    except (OSError, ValueError, KeyError, TypeError, ManifestError) as exc:
        return [f"key history: {exc}"]
    return _bag_signatures(root, trusted) + _bag_media(root)


def _bag_key_history(root: Path) -> dict[str, Any]:
    """The keys keys/key_history.json lists, each checked: the genesis key first, then each one handed over
    by a rotation document signed by the key before it."""
    history = json.loads((root / "keys" / "key_history.json").read_text(encoding="utf-8"))
    entries = history["keys"]
    trusted: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        public = load_public_key((root / entry["public_key"]).read_bytes())
        if key_id_of(public) != entry["key_id"]:
            raise ManifestError(f"{entry['public_key']} is {key_id_of(public)}, not {entry['key_id']}")
        if i == 0 and (entry["key_id"] != history["genesis_key_id"] or entry["handed_over_by"] is not None):
            raise ManifestError("the first key listed is not the genesis key")
        if i > 0:
            rotation, previous = read_document(root / entry["handed_over_by"]), entries[i - 1]["key_id"]
            if (rotation.get("type"), rotation.get("old_key_id"), rotation.get("new_key_id")) != (
                    "key_rotation", previous, entry["key_id"]):
                raise ManifestError(f"{entry['handed_over_by']} does not hand {previous} over to {entry['key_id']}")
            verify_signature(rotation, trusted[previous])
            if key_id_of(load_public_key(str(rotation.get("new_public_key")))) != entry["key_id"]:
                raise ManifestError(f"{entry['handed_over_by']} carries another key than {entry['key_id']}")
        trusted[entry["key_id"]] = public
    return trusted


def _bag_signatures(root: Path, trusted: dict[str, Any]) -> list[str]:
    problems = []
    for folder in ("manifests", "sessions", "annotations"):
        for path in sorted((root / folder).glob("*.json")):
            try:
                doc = read_document(path)
                key = trusted.get(str(doc.get("key_id")))
                if key is None:
                    raise ManifestError(f"signed by {str(doc.get('key_id'))[:80]!r}, a key not in the bag's "
                                        "key history")
                verify_signature(doc, key)
            except ManifestError as exc:
                problems.append(f"{folder}/{path.name}: {exc}")
    return problems


def _bag_media(root: Path) -> list[str]:
    problems = []
    for path in sorted((root / "media").glob("*")):
        try:
            manifest = read_document(root / "manifests" / f"{path.stem}.json")
        except ManifestError as exc:
            problems.append(f"media/{path.name}: {exc}")
            continue
        sm3 = sm3_hasher() if "sm3" in manifest else None   # 国密 suites: both digests, one pass
        digest, _size = hash_file(path, also=() if sm3 is None else (sm3,))   # a bag's media are plaintext
        if digest != manifest.get("sha256"):
            problems.append(f"media/{path.name}: SHA-256 {str(digest)[:16]}… is not the manifest's")
        elif sm3 is not None and sm3.finalize().hex() != manifest.get("sm3"):
            problems.append(f"media/{path.name}: SM3 is not the manifest's")
    return problems
