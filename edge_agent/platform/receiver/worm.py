"""The platform's custody record in the WORM bucket, beside the committed files (`[store] backend = "s3"`).

Public surface:
- `BucketRecords(committed)`: the chain documents, the receipts and the legal-hold releases as objects, each a
  conditional create (`If-None-Match: *`) locked in COMPLIANCE mode (objectstore.py writes the files):

      chains/<agent>/docs/<seq:012d>.json          each chain document, its canonical bytes: the first one written
                                                   at a seq holds, for every receiver sharing the bucket
      chains/<agent>/refused/<ms>-<seq>.json       a refused fork or rewind, as received
      chain-receipts/<agent>/<seq:012d>.json       the receiver's signed chain receipt for that head
      receipts/<agent>/<file_id>.json              the signed `complete` receipt of a stored file
      releases/<key_id>/<seq:012d>.json            a signed legal-hold release that was carried out

  Chain documents, refusals, chain receipts and releases are locked for `long_term_years`; a file's receipt as
  the file (its retention class; `evidence`: with a legal hold).
- `CaseReleased(records, key_for).release(agent, file_id)`: the same on the agent's own word, a `case_released`
  annotation in its chain as the bucket holds it, for the file's case.
- `check_bucket(committed)`: `receiver fsck` of the bucket (BucketCheck), a `fsck.FsckReport`.
- `HoldRelease(records, keys).release(request)`: turn a stored evidence file's legal hold off, only on a
  request signed by a platform key (the command format agents already verify, docs/PROTOCOL.md topic
  `commands`: `cmd` = `release_hold`, `id`, `ts`, `seq`, `agent`, `file_id`, `key_id`, `sig`), fresh (`ts`
  within 5 min) and not a replay (`seq` above the last release carried out with that key, in the bucket).
  Raises ReleaseRefused with the reason. COMPLIANCE retention is untouched: a released version still cannot
  be deleted before its retain-until date.

The bucket is the arbiter between receivers on different hosts: a receiver whose local chain is behind learns
the documents from the agent again, and a document written by another receiver at the same seq is the one that
holds (another one is a fork). Everything raises StoreUnavailable when the bucket cannot be reached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.clock import now_ms
from edge_agent.evidence.manifest import GENESIS_PREV, ManifestError, canonical_json, verify_signature
from edge_agent.evidence.receipts import load_pem_keys
from edge_agent.i18n import N_
from edge_agent.platform.receiver.fsck import Finding, FsckReport
from edge_agent.platform.receiver.objectstore import EVIDENCE, LONG_TERM, ROUTINE, S3Committed, _code, _status
from edge_agent.platform.receiver.store import StoreConfigError, StoreUnavailable

log = logging.getLogger(__name__)
RELEASE_CMD = "release_hold"
RELEASE_WINDOW_MS = 5 * 60 * 1000   # as for the commands agents obey (edge_agent/sync/commands.py)
WRITTEN_CACHE = 65536               # keys this process knows are in the bucket (no second PUT for them)


class ReleaseRefused(Exception):
    """Why a legal-hold release was not carried out."""


class BucketRecords:
    """Chain documents, receipts and releases in the bucket of `committed` (layout in the module docstring)."""

    def __init__(self, committed: S3Committed):
        self.committed = committed
        self.s3 = committed.s3
        self.bucket = committed.bucket
        self._written: OrderedDict[str, None] = OrderedDict()   # used by the worker (chain) and syncer (receipts)
        self._written_lock = threading.Lock()

    # -- keys --------------------------------------------------------------------------------------

    @staticmethod
    def chain_doc_key(agent: str, seq: int) -> str:
        return f"chains/{agent}/docs/{seq:012d}.json"

    @staticmethod
    def chain_receipt_key(agent: str, seq: int) -> str:
        return f"chain-receipts/{agent}/{seq:012d}.json"

    @staticmethod
    def receipt_key(agent: str, file_id: str) -> str:
        return f"receipts/{agent}/{file_id}.json"

    @staticmethod
    def release_key(key_id: str, seq: int) -> str:
        return f"releases/{key_id.replace(':', '-')}/{seq:012d}.json"

    # -- writing -----------------------------------------------------------------------------------

    def _create(self, key: str, body: bytes, retention: str = LONG_TERM, stored_ms: int | None = None) -> bool:
        """Create `key`, locked for `retention` (False: it exists already, left as it is)."""
        with self._written_lock:
            if key in self._written:
                return False
        created = self.committed.put_bytes(key, body, self.committed.lock_args(retention, stored_ms or now_ms()))
        with self._written_lock:
            self._written[key] = None
            while len(self._written) > WRITTEN_CACHE:
                self._written.popitem(last=False)
        return created

    def put_chain_doc(self, agent: str, seq: int, canonical: bytes) -> str:
        """Hold `canonical` as the agent's document `seq` unless another receiver wrote one there first; returns
        the SHA-256 of the document the bucket holds at `seq` (this one, or the earlier one: then a fork)."""
        key = self.chain_doc_key(agent, seq)
        digest = hashlib.sha256(canonical).hexdigest()
        with self._written_lock:
            self._written.pop(key, None)   # a document is always checked against the bucket
        if self._create(key, canonical):
            return digest
        held = self.committed.get(key)
        if held is None:
            raise StoreUnavailable(f"chain document {key} exists but cannot be read yet")
        return hashlib.sha256(held).hexdigest()

    def chain_doc(self, agent: str, seq: int) -> bytes | None:
        return self.committed.get(self.chain_doc_key(agent, seq))

    def put_refused(self, agent: str, seq: int, payload: bytes) -> None:
        self._create(f"chains/{agent}/refused/{now_ms()}-{seq}.json", payload)

    def put_chain_receipt(self, agent: str, receipt: dict[str, Any]) -> None:
        self._create(self.chain_receipt_key(agent, int(receipt["seq"])), canonical_json(receipt))

    def put_receipt(self, agent: str, file_id: str, receipt: dict[str, Any], entry: dict[str, Any]) -> None:
        """The `complete` receipt of a stored file, locked like the file (its index `entry`)."""
        self._create(self.receipt_key(agent, file_id), canonical_json(receipt), str(entry.get("retention", "")),
                     int(entry["stored_ms"]))

    # -- legal holds -------------------------------------------------------------------------------

    def file_keys(self, agent: str, file_id: str, entry: dict[str, Any]) -> list[str]:
        """Every key a stored file's legal hold is on: its bytes, manifest, index entry and receipt."""
        sha256 = entry["sha256"]
        return [self.committed.object_key(sha256), self.committed.manifest_key(sha256, agent, file_id),
                self.committed.index_key(agent, file_id), self.receipt_key(agent, file_id)]

    def legal_hold(self, key: str) -> str | None:
        """`ON`/`OFF` of the version of `key` a receiver wrote (the oldest), or None if the key is missing."""
        version = self.first_version(key)
        if version is None:
            return None
        try:
            hold = self.s3.get_object_legal_hold(Bucket=self.bucket, Key=key, VersionId=version)
            return str(hold["LegalHold"]["Status"])
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("NoSuchObjectLockConfiguration", "NoSuchKey"):
                return "OFF"
            raise self.committed.unavailable("read the legal hold of", key, exc) from exc
        except BotoCoreError as exc:
            raise self.committed.unavailable("read the legal hold of", key, exc) from exc

    def first_version(self, key: str) -> str | None:
        """The oldest version of exactly `key` (the one created with If-None-Match), or None."""
        try:
            pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=key)
            versions = [v for page in pages for v in page.get("Versions", []) if v["Key"] == key]
        except (ClientError, BotoCoreError) as exc:
            raise self.committed.unavailable("list the versions of", key, exc) from exc
        if not versions:
            return None
        # Listed newest first (S3): among versions of the same second, the last listed is the oldest.
        return str(min(reversed(versions), key=lambda v: v["LastModified"])["VersionId"])

    def set_legal_hold(self, key: str, status: str) -> None:
        version = self.first_version(key)
        if version is None:
            return
        try:
            self.s3.put_object_legal_hold(Bucket=self.bucket, Key=key, VersionId=version,
                                          LegalHold={"Status": status})
        except (ClientError, BotoCoreError) as exc:
            raise self.committed.unavailable(f"set the legal hold {status} on", key, exc) from exc

    def last_release_seq(self, key_id: str) -> int:
        """The highest seq of a release carried out with `key_id` (0: none)."""
        prefix = self.release_key(key_id, 0).rsplit("/", 1)[0] + "/"
        names = [key.rsplit("/", 1)[1] for key in self.committed.keys(prefix)]
        return max((int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()), default=0)


class HoldRelease:
    """Carries out signed legal-hold releases (module docstring). `keys_path`: the platform's public keys, a PEM
    file or a directory of `*.pem` (`[store] release_keys`)."""

    def __init__(self, records: BucketRecords, keys_path: Path | None, window_ms: int = RELEASE_WINDOW_MS):
        self.records = records
        self.window_ms = window_ms
        if keys_path is None:
            raise StoreConfigError(N_("store.release_keys is not set: give the platform's public key file (PEM) that "
                                      "signs legal-hold releases; without it no release is possible"))
        try:
            self.keys: dict[str, Ed25519PublicKey] = load_pem_keys(Path(keys_path))
        except (OSError, ValueError, ManifestError) as exc:
            raise StoreConfigError(N_("store.release_keys = {path!r}: cannot load the platform's keys ({error}); give "
                                      "a PEM file or a directory of *.pem"), path=str(keys_path), error=exc) from exc
        if not self.keys:
            raise StoreConfigError(N_("store.release_keys = {path!r} holds no Ed25519 public key (PEM 'BEGIN PUBLIC "
                                      "KEY')"), path=str(keys_path))

    def release(self, request: dict[str, Any]) -> dict[str, Any]:
        """Turn the legal hold of the file `request` names OFF; returns what was done. Raises ReleaseRefused
        (unsigned, forged, stale, replayed, not a stored evidence file) or StoreUnavailable."""
        self._check_signed(request)
        agent, file_id, seq, key_id = request["agent"], request["file_id"], request["seq"], request["key_id"]
        last = self.records.last_release_seq(key_id)
        if seq <= last:
            raise ReleaseRefused(f"seq {seq} is not above {last}, the last release carried out with {key_id}: a "
                                 "replay (the platform numbers each request it signs higher than the last)")
        entry = self.records.committed.stored(agent, file_id)
        if entry is None:
            raise ReleaseRefused(f"no file {agent}/{file_id} is stored in bucket {self.records.bucket}")
        if entry.get("retention") != EVIDENCE:
            raise ReleaseRefused(f"{agent}/{file_id} is {entry.get('retention')!r}, not evidence: it has no legal "
                                 "hold to release")
        keys = self.records.file_keys(agent, file_id, entry)
        for key in keys:   # idempotent: a request cut short by an outage is carried out again in full
            self.records.set_legal_hold(key, "OFF")
        record = {"request": request, "released_ms": now_ms(), "keys": keys}
        if not self.records._create(self.records.release_key(key_id, seq), canonical_json(record)):
            raise ReleaseRefused(f"seq {seq} of {key_id} was carried out already: a replay")
        log.warning("event=legal_hold_released agent=%s file=%s key_id=%s seq=%d id=%s", agent, file_id, key_id,
                    seq, request["id"])
        return {"agent_id": agent, "file_id": file_id, "sha256": entry["sha256"], "keys": keys, "key_id": key_id,
                "seq": seq, "id": request["id"]}

    def _check_signed(self, request: dict[str, Any]) -> None:
        if request.get("cmd") != RELEASE_CMD:
            raise ReleaseRefused(f"cmd is {str(request.get('cmd'))[:64]!r}, not {RELEASE_CMD!r}")
        key = self.keys.get(request.get("key_id"))  # type: ignore[arg-type]
        if key is None:
            raise ReleaseRefused("not signed by a platform key in store.release_keys (key_id missing or unknown)")
        try:
            verify_signature(request, key)
        except ManifestError as exc:
            raise ReleaseRefused(f"bad signature: {exc}") from None
        for name in ("agent", "file_id", "id"):
            if not isinstance(request.get(name), str) or not request[name]:
                raise ReleaseRefused(f"the request names no {name}")
        seq, ts = request.get("seq"), request.get("ts")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ReleaseRefused("no seq: the platform numbers each request it signs (a positive integer, higher "
                                 "every time)")
        if not isinstance(ts, int) or isinstance(ts, bool) or abs(now_ms() - ts) > self.window_ms:
            raise ReleaseRefused(f"ts {ts!r} is not within {self.window_ms // 1000} s of this host's clock: stale "
                                 "or replayed; have the platform sign a new request")


class CaseReleased:
    """Releases an evidence file's legal hold on the agent's own word: its chain, as the bucket holds it, has a
    `case_released` annotation for the case the file belongs to (`edge-agent hold release --case C` on the
    agent signs one). The whole chain is read from seq 1 and checked link by link (`prev`) and signature by
    signature against the agent's keys (`key_for(agent, key_id, chain_seq=seq)`: KeyRing), so a document
    written into the bucket by anything but a receiver that verified it counts for nothing."""

    def __init__(self, records: BucketRecords, key_for: Callable[..., Ed25519PublicKey]):
        self.records = records
        self.key_for = key_for

    def release(self, agent: str, file_id: str) -> dict[str, Any]:
        entry = self.records.committed.stored(agent, file_id)
        if entry is None:
            raise ReleaseRefused(f"no file {agent}/{file_id} is stored in bucket {self.records.bucket}")
        if entry.get("retention") != EVIDENCE:
            raise ReleaseRefused(f"{agent}/{file_id} is {entry.get('retention')!r}, not evidence: it has no legal "
                                 "hold to release")
        found = self._released_in_chain(agent, file_id)
        keys = self.records.file_keys(agent, file_id, entry)
        for key in keys:
            self.records.set_legal_hold(key, "OFF")
        seq, digest, case_id = found
        record = {"agent": agent, "file_id": file_id, "case_id": case_id, "chain_seq": seq, "chain_sha256": digest,
                  "released_ms": now_ms(), "keys": keys}
        self.records._create(f"releases/chain/{agent}/{file_id}.json", canonical_json(record))
        log.warning("event=legal_hold_released agent=%s file=%s case=%s chain_seq=%d", agent, file_id, case_id, seq)
        return {"agent_id": agent, "file_id": file_id, "sha256": entry["sha256"], "keys": keys, "case_id": case_id,
                "chain_seq": seq, "id": f"chain:{seq}", "seq": seq, "key_id": f"the agent's chain ({case_id})"}

    def _released_in_chain(self, agent: str, file_id: str) -> tuple[int, str, str]:
        """(seq, SHA-256, case) of the `case_released` annotation that covers the file's case at the chain's end."""
        prev, case, released, seq = GENESIS_PREV, None, None, 0
        while (canonical := self.records.chain_doc(agent, seq + 1)) is not None:
            seq += 1
            doc = json.loads(canonical)
            try:
                verify_signature(doc, self.key_for(agent, doc.get("key_id"), chain_seq=seq))
            except ManifestError as exc:
                raise ReleaseRefused(f"the chain of {agent} in the bucket does not verify at seq {seq} ({exc}): "
                                     "investigate; nothing was released") from None
            if doc.get("prev") != prev or canonical_json(doc) != canonical:
                raise ReleaseRefused(f"the chain of {agent} in the bucket is broken at seq {seq}: investigate; "
                                     "nothing was released")
            prev = hashlib.sha256(canonical).hexdigest()
            if doc.get("file_id") == file_id and doc.get("case_id"):   # the file's manifest or a tag
                case, released = doc["case_id"], None   # (a new tag after a release holds it again)
            elif doc.get("case_released") is True and case is not None and doc.get("case_id") == case:
                released = (seq, prev, case)
        if case is None:
            raise ReleaseRefused(f"the chain of {agent} (up to seq {seq}) puts {file_id} in no case: only a signed "
                                 "platform request (--request) can release its hold")
        if released is None:
            raise ReleaseRefused(f"the chain of {agent} (up to seq {seq}) holds no case_released annotation for case "
                                 f"{case} of {file_id}: the case is not released on the agent")
        return released


def read_request(path: Path) -> dict[str, Any]:
    """A signed release request from a JSON file (ReleaseRefused if it is not one)."""
    try:
        request = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ReleaseRefused(f"cannot read the request {path}: {exc}") from exc
    if not isinstance(request, dict):
        raise ReleaseRefused(f"{path} holds no JSON object")
    return request


# -- fsck of the bucket --------------------------------------------------------------------------------------------

BUCKET_FINDINGS = ("bad_index", "missing_object", "bad_checksum", "missing_manifest", "wrong_lock", "no_legal_hold")


class BucketCheck:
    """`receiver fsck` of a bucket: every index entry's object exists and the SHA-256 checksum the server keeps for
    it is the index's (a multipart object, whose checksum is one of its parts' checksums, is read and hashed,
    streamed), its manifest exists, and its bytes are locked as its class demands (COMPLIANCE until at least
    stored + the class's duration; `evidence` with a legal hold unless a signed release was carried out).
    Nothing is repaired: nothing in a WORM bucket can be; each finding names what to restore or investigate."""

    def __init__(self, committed: S3Committed):
        self.committed = committed
        self.records = BucketRecords(committed)
        self.s3 = committed.s3
        self.report = FsckReport(f"s3://{committed.bucket} at {committed.settings.endpoint}")

    def run(self) -> FsckReport:
        released = self._released()
        for key in self.committed.keys("index/"):
            self._entry(key, released)
        return self.report

    def _found(self, kind: str, key: str, detail: str) -> None:
        self.report.findings.append(Finding(kind, key, detail))
        log.warning("fsck finding kind=%s key=%s detail=%s", kind, key, detail)

    def _released(self) -> set[tuple[str, str]]:
        """(agent, file id) of every signed release carried out (their legal hold is off by right)."""
        done = set()
        for key in self.committed.keys("releases/"):
            body = json.loads(self.committed.get(key) or b"{}")
            said = body.get("request") or body   # a signed request, or the agent's chain (CaseReleased)
            done.add((str(said.get("agent")), str(said.get("file_id"))))
        return done

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.s3.head_object(Bucket=self.committed.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self.committed.unavailable("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self.committed.unavailable("read", key, exc) from exc

    def _entry(self, index_key: str, released: set[tuple[str, str]]) -> None:
        try:
            entry = json.loads(self.committed.get(index_key) or b"")
            agent, file_id, sha256 = str(entry["agent_id"]), str(entry["file_id"]), str(entry["sha256"])
            stored_ms, retention = int(entry["stored_ms"]), str(entry.get("retention", ""))
        except (ValueError, KeyError, TypeError) as exc:
            self._found("bad_index", index_key, f"an unreadable index entry ({exc}): restore it from the agent's "
                        "manifest and receipt, or investigate who wrote it")
            return
        object_key = self.committed.object_key(sha256)
        head = self._head(object_key)
        self.report.objects_checked += 1
        if head is None:
            self._found("missing_object", index_key, f"names {object_key}, which is not in the bucket: restore it from "
                        "a backup or from the agent (it still holds the file if its recorder was not cleared)")
            return
        self._checksum(index_key, object_key, sha256, head)
        if self._head(self.committed.manifest_key(sha256, agent, file_id)) is None:
            self._found("missing_manifest", index_key, f"the signed manifest of {agent}/{file_id} is not in the "
                        "bucket: restore it from the agent (manifests/ in its data dir)")
        self._lock(index_key, object_key, head, retention, stored_ms, (agent, file_id) in released)

    def _checksum(self, index_key: str, object_key: str, sha256: str, head: dict[str, Any]) -> None:
        reported = str(head.get("ChecksumSHA256") or "")
        if reported and "-" not in reported:   # one PUT: the server's checksum is the whole object's SHA-256
            actual = base64.b64decode(reported).hex()
        else:   # multipart (a checksum of the parts' checksums) or none kept: read the bytes and hash them
            digest = hashlib.sha256()
            try:
                body = self.s3.get_object(Bucket=self.committed.bucket, Key=object_key)["Body"]
                for block in body.iter_chunks(1 << 20):
                    digest.update(block)
            except (ClientError, BotoCoreError) as exc:
                raise self.committed.unavailable("read", object_key, exc) from exc
            actual = digest.hexdigest()
        if actual != sha256:
            self._found("bad_checksum", index_key, f"{object_key} has SHA-256 {actual} on the server, the index says "
                        f"{sha256}: a newer version was written over the locked one, or the store lost it; the "
                        "locked version is in the object's version history")

    def _lock(self, index_key: str, object_key: str, head: dict[str, Any], retention: str, stored_ms: int,
              released: bool) -> None:
        demanded = self.committed.lock_args(retention, stored_ms)
        until = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockMode") != "COMPLIANCE" or until is None \
                or until < demanded["ObjectLockRetainUntilDate"] - timedelta(seconds=1):
            self._found("wrong_lock", index_key, f"{object_key} is locked {head.get('ObjectLockMode')} until {until}; "
                        f"a {retention or ROUTINE} file needs COMPLIANCE until "
                        f"{demanded['ObjectLockRetainUntilDate']:%Y-%m-%d}: check the bucket's settings and who "
                        "changed them")
        if retention == EVIDENCE and not released and head.get("ObjectLockLegalHoldStatus") != "ON":
            self._found("no_legal_hold", index_key, f"{object_key} is evidence without a legal hold and no signed "
                        "release was carried out: investigate, then set it again (put-object-legal-hold ON)")


def check_bucket(committed: S3Committed) -> FsckReport:
    """Check the bucket of `committed`; see BucketCheck."""
    return BucketCheck(committed).run()
