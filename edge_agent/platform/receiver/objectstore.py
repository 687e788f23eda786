"""Committed files in S3-compatible object storage with Object Lock (`[store] backend = "s3"`).

What a receiver commits goes to one bucket; transfers in progress stay in the local `incoming/` of
`ChunkStore`, or with `[store] transfers = "s3"` are objects in a second bucket (transfers.py, which commits
through `commit_blocks`). Keys:

    objects/<sha256>                                the bytes, once per content
    manifests/<agent>/<file_id>.<sha256>.json       each signed manifest
    index/<agent>/<file_id>.json                    a stored file: the commit point of `complete`

Every object is written with a SHA-256 checksum the server verifies (`ChecksumSHA256`; a large file is
uploaded in parts, each part with its own checksum, so memory stays flat) and, on a bucket created with
Object Lock, `COMPLIANCE` mode until a date from the file's retention class (`routine`: stored +
`routine_days`; `long_term`: stored + `long_term_years`; `evidence`: the same as routine plus a legal hold).
Every write is a conditional create (`If-None-Match: *`): the first receiver to write an index entry wins and
every other one reads the winner's entry, so `complete` is exactly once across receivers sharing a bucket,
and no receiver ever writes a second version of a key. A file uploaded in parts is first claimed
(`claims/objects/<sha256>/<generation>`, see `_claim`): a receiver that finds another's live claim answers
`receiving` and commits on its next attempt, once the holder has stored the bytes. A store that cannot be reached raises
`StoreUnavailable`: the caller answers `receiving` and commits again later.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import stat
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from edge_agent.clock import now_ms
from edge_agent.i18n import N_
from edge_agent.platform.receiver.store import StoreConfigError, StoreUnavailable, crash_point

log = logging.getLogger(__name__)
PART_BYTES = 16 * 1024**2   # a multipart upload's part: what the upload holds in memory at once
ROUTINE, EVIDENCE, LONG_TERM = "routine", "evidence", "long_term"
CLAIM_SLACK_S = 120                 # an upload claim lasts this long plus the time its bytes take at
CLAIM_MIN_RATE = 4 * 1024**2        # this slow a rate (bytes/s); then another receiver may take it over
CLAIM_GENERATIONS = 64
BUCKET_COMMIT_STEPS = ("part_uploaded",)   # fault injection (store.CRASH_AT_ENV) in a commit from transfers


@dataclass(frozen=True)
class S3Settings:
    """[store] of the receiver's config, for backend = "s3" (docs/OPERATIONS.md "Receiver store")."""

    endpoint: str
    bucket: str
    credentials_file: Path
    region: str = "us-east-1"
    tls_ca: Path | None = None
    routine_days: float = 180   # [store] takes whole days; a test may lock for seconds
    long_term_years: int = 10
    connect_timeout_s: float = 5
    read_timeout_s: float = 60

    @classmethod
    def from_config(cls, store: Any) -> S3Settings:
        return cls(endpoint=store.endpoint, bucket=store.bucket, credentials_file=store.credentials_file,
                   region=store.region, tls_ca=store.tls_ca, routine_days=store.routine_days,
                   long_term_years=store.long_term_years)


def read_credentials(path: Path) -> tuple[str, str]:
    """The access key and secret from `path`: two lines, `access_key_id = …` and `secret_access_key = …`,
    readable by its owner only (0600)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise StoreConfigError(N_("store.credentials_file = {path!r}: no such file; create it with access_key_id "
                                  "and secret_access_key lines, mode 0600"), path=str(path)) from None
    if mode & 0o077:
        raise StoreConfigError(N_("store.credentials_file = {path!r}: mode {mode} lets others read the store's "
                                  "secret; run: chmod 600 {path}"), path=str(path), mode=f"{mode:04o}")
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    missing = [k for k in ("access_key_id", "secret_access_key") if not values.get(k)]
    if missing:
        raise StoreConfigError(N_("store.credentials_file = {path!r}: missing {missing}; write one `key = value` "
                                  "line for each"), path=str(path), missing=", ".join(missing))
    return values["access_key_id"], values["secret_access_key"]


class DigestMismatch(Exception):
    """The bytes streamed into a commit do not hash to the manifest's SHA-256; nothing was stored."""

    def __init__(self, actual: str, expected: str):
        super().__init__(f"the assembled file has SHA-256 {actual}, the manifest says {expected}: its bytes were "
                         "altered after sealing or in transit")
        self.actual = actual


def _check_digest(digest: Any, expected: str) -> None:
    if digest.hexdigest() != expected:
        raise DigestMismatch(digest.hexdigest(), expected)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def read_object(s3: Any, bucket: str, key: str,
                unavailable: Callable[[str, str, Exception], StoreUnavailable]) -> bytes | None:
    """The bytes of `key` in `bucket`, None when there is no such object; any other failure raises
    `unavailable("read", key, exc)` (the caller's StoreUnavailable, naming its bucket)."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
            return None
        raise unavailable("read", key, exc) from exc
    except BotoCoreError as exc:
        raise unavailable("read", key, exc) from exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class S3Committed:
    """The committed files of every receiver sharing one bucket."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.bucket = settings.bucket
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        access, secret = read_credentials(settings.credentials_file)
        if settings.tls_ca is not None and not settings.tls_ca.is_file():
            raise StoreConfigError(N_("store.tls_ca = {path!r}: no such file; give the PEM of the CA that signed the "
                                      "object store's certificate"), path=str(settings.tls_ca))
        self.s3 = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region, aws_access_key_id=access,
            aws_secret_access_key=secret, verify=str(settings.tls_ca) if settings.tls_ca else None,
            config=BotoConfig(connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
                              retries={"max_attempts": 2, "mode": "standard"}, s3={"addressing_style": "path"}))

    def check_bucket(self) -> None:
        """At start: StoreConfigError if the bucket is missing or has no Object Lock (every commit would be
        refused, files would stay `receiving`); a store that does not answer only logs (commits wait for it)."""
        try:
            config = self.s3.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
        except ClientError as exc:
            if _code(exc) in ("NoSuchBucket", "ObjectLockConfigurationNotFoundError", "AccessDenied") \
                    or _status(exc) in (403, 404):
                raise StoreConfigError(
                    N_("store.bucket = {bucket!r} at {endpoint}: no bucket with Object Lock there ({code}); create "
                       "it with Object Lock enabled (aws s3api create-bucket --bucket {bucket} "
                       "--object-lock-enabled-for-bucket) and give the receiver's credentials access"),
                    bucket=self.bucket, endpoint=self.settings.endpoint, code=_code(exc)
                ) from exc
            log.warning("object store check failed bucket=%s endpoint=%s: %s", self.bucket, self.settings.endpoint, exc)
            return
        except BotoCoreError as exc:
            log.warning("object store unreachable at start bucket=%s endpoint=%s: %s; commits wait for it",
                        self.bucket, self.settings.endpoint, exc)
            return
        if config.get("ObjectLockEnabled") != "Enabled":
            raise StoreConfigError(N_("store.bucket = {bucket!r}: Object Lock is not enabled on it; create a bucket "
                                      "with --object-lock-enabled-for-bucket (it cannot be turned on later on every "
                                      "server)"), bucket=self.bucket)

    # -- keys --------------------------------------------------------------------------------------

    @staticmethod
    def object_key(sha256: str) -> str:
        return f"objects/{sha256}"

    @staticmethod
    def manifest_key(sha256: str, agent: str, file_id: str) -> str:
        return f"manifests/{agent}/{file_id}.{sha256}.json"

    @staticmethod
    def index_key(agent: str, file_id: str) -> str:
        return f"index/{agent}/{file_id}.json"

    # -- reading -----------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The object at `key` in the committed bucket (None: there is none)."""
        return read_object(self.s3, self.bucket, key, self.unavailable)

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` in the committed bucket."""
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self.unavailable("list", prefix, exc) from exc

    def stored(self, agent: str, file_id: str) -> dict[str, Any] | None:
        body = self.get(self.index_key(agent, file_id))
        return None if body is None else json.loads(body)

    def manifest(self, sha256: str, agent: str, file_id: str) -> bytes | None:
        return self.get(self.manifest_key(sha256, agent, file_id))

    # -- committing --------------------------------------------------------------------------------

    def lock_args(self, retention: str, stored_ms: int) -> dict[str, Any]:
        """Object Lock headers for a file of `retention` class stored at `stored_ms`."""
        stored = datetime.fromtimestamp(stored_ms / 1000, UTC)
        if retention == LONG_TERM:
            until = stored + timedelta(days=365 * self.settings.long_term_years)
        else:
            until = stored + timedelta(days=self.settings.routine_days)
        args: dict[str, Any] = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
        if retention == EVIDENCE:
            args["ObjectLockLegalHoldStatus"] = "ON"
        return args

    def commit(self, agent: str, file_id: str, data: Path, manifest: bytes, doc: dict[str, Any]) -> dict[str, Any]:
        """Store the verified bytes at `data`, the manifest and the index entry; returns the index entry that
        holds (this receiver's, or an earlier one's: the first to write it wins). Raises StoreUnavailable."""
        stored_ms = now_ms()
        lock = self.lock_args(str(doc.get("retention", ROUTINE)), stored_ms)
        self._put_file(self.object_key(doc["sha256"]), data, lock)
        return self._record(agent, file_id, manifest, doc, lock, stored_ms)

    def _record(self, agent: str, file_id: str, manifest: bytes, doc: dict[str, Any], lock: dict[str, Any],
                stored_ms: int) -> dict[str, Any]:
        """The bytes are in the bucket: the manifest, then the index entry (the commit point); returns the entry
        that holds (this receiver's, or the one another receiver wrote first)."""
        sha256 = doc["sha256"]
        self.put_bytes(self.manifest_key(sha256, agent, file_id), manifest, lock)
        entry = {"agent_id": agent, "file_id": file_id, "sha256": sha256, "size": doc["size"], "stored_ms": stored_ms,
                 "object": self.object_key(sha256), "retention": doc.get("retention", ROUTINE)}
        if self.put_bytes(self.index_key(agent, file_id), json.dumps(entry).encode(), lock):
            return entry
        winner = self.stored(agent, file_id)   # another receiver committed it first
        if winner is None:
            raise StoreUnavailable(f"index {self.index_key(agent, file_id)} exists but cannot be read yet")
        return winner

    def commit_blocks(self, agent: str, file_id: str, blocks: Iterable[bytes], manifest: bytes,
                      doc: dict[str, Any]) -> dict[str, Any]:
        """`commit` from the file's bytes in order (transfers.py: the chunk objects of a transfer), hashing
        them on the way: parts of at most PART_BYTES are uploaded one at a time, and the upload is completed
        only if the whole file's SHA-256 is the manifest's (else it is aborted and DigestMismatch raised).
        Nothing is uploaded when the object is there already; the bytes are still hashed."""
        sha256 = doc["sha256"]
        stored_ms = now_ms()
        lock = self.lock_args(str(doc.get("retention", ROUTINE)), stored_ms)
        key = self.object_key(sha256)
        if int(doc["size"]) <= PART_BYTES:
            body = b"".join(blocks)
            _check_digest(hashlib.sha256(body), sha256)
            self.put_bytes(key, body, lock)
        elif self._exists(key) or not self._claim(key, int(doc["size"])):
            digest = hashlib.sha256()
            for block in blocks:
                digest.update(block)
            _check_digest(digest, sha256)
        else:
            self._put_parts(key, blocks, lock, sha256)
        return self._record(agent, file_id, manifest, doc, lock, stored_ms)

    def _put_parts(self, key: str, blocks: Iterable[bytes], lock: dict[str, Any], sha256: str | None) -> bool:
        """Create `key` as a multipart upload of `blocks` gathered into parts of PART_BYTES (the last one
        shorter), one part in memory at a time; completed only if the bytes hash to `sha256` (None: bytes
        verified already, not hashed again). False: the key exists already."""
        upload = None
        try:
            upload = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256",
                                                     **lock)["UploadId"]
            parts: list[dict[str, Any]] = []
            digest, part = (hashlib.sha256() if sha256 is not None else None), bytearray()

            def send(body: bytes) -> None:
                checksum = _b64(hashlib.sha256(body).digest())
                number = len(parts) + 1
                etag = self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number,
                                           Body=body, ChecksumSHA256=checksum)["ETag"]
                parts.append({"PartNumber": number, "ETag": etag, "ChecksumSHA256": checksum})
                crash_point("part_uploaded")

            for block in blocks:
                if digest is not None:
                    digest.update(block)
                part += block
                while len(part) >= PART_BYTES:
                    send(bytes(part[:PART_BYTES]))
                    del part[:PART_BYTES]
            if part:
                send(bytes(part))
            if digest is not None and sha256 is not None:
                _check_digest(digest, sha256)
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                              MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except ClientError as exc:
            self._abort(key, upload)
            if _status(exc) == 412 or _code(exc) == "PreconditionFailed":
                return False
            raise self.unavailable("write", key, exc) from exc
        except BotoCoreError as exc:
            self._abort(key, upload)
            raise self.unavailable("write", key, exc) from exc
        except Exception:   # a mismatch, or the blocks' source failed: nothing completed
            self._abort(key, upload)
            raise
        return True

    def put_bytes(self, key: str, body: bytes, lock: dict[str, Any]) -> bool:
        """Create `key` (False: it exists already, left as it is)."""
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*",
                               ChecksumSHA256=_b64(hashlib.sha256(body).digest()), **lock)
        except ClientError as exc:
            if _status(exc) == 412 or _code(exc) == "PreconditionFailed":
                return False
            raise self.unavailable("write", key, exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable("write", key, exc) from exc
        return True

    def _put_file(self, key: str, path: Path, lock: dict[str, Any]) -> bool:
        """Create `key` from the file at `path`, streamed in parts of PART_BYTES with a checksum each."""
        size = path.stat().st_size
        if size <= PART_BYTES:
            return self.put_bytes(key, path.read_bytes(), lock)
        if self._exists(key) or not self._claim(key, size):   # content-addressed: stored already
            return False
        with path.open("rb") as f:   # verified against the manifest before the commit: not hashed again
            return self._put_parts(key, iter(lambda: f.read(PART_BYTES), b""), lock, None)

    def _exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("NoSuchKey", "404"):
                return False
            raise self.unavailable("read", key, exc) from exc
        except BotoCoreError as exc:
            raise self.unavailable("read", key, exc) from exc
        return True

    def _claim(self, key: str, size: int) -> bool:
        """Become the one receiver that uploads `key` in parts: True when this receiver holds the claim, False
        when the object has been stored meanwhile; StoreUnavailable while another receiver's claim is live.

        A multipart completion's `If-None-Match` is not atomic on every server (SeaweedFS 4.x checks it, then
        completes: two receivers racing both won). A single PUT with `If-None-Match: *` is, so the right to
        upload is a small claim object created that way: `claims/<key>/<generation>`, with its holder and an
        expiry long enough for the upload. A receiver killed mid-upload leaves its claim to expire; the next
        generation is then claimed by whoever commits next."""
        for generation in range(CLAIM_GENERATIONS):
            claim_key = f"claims/{key}/{generation}"
            expires_ms = now_ms() + int((CLAIM_SLACK_S + size / CLAIM_MIN_RATE) * 1000)
            claim = {"key": key, "holder": self.holder, "expires_ms": expires_ms}
            if self.put_bytes(claim_key, json.dumps(claim).encode(), {}):
                if generation and self._exists(key):   # the expired holder finished after all
                    return False
                return True
            body = self.get(claim_key)
            held = json.loads(body) if body else {}
            if held.get("holder") == self.holder:   # this receiver's own, from an attempt that failed
                return not self._exists(key)
            if held.get("expires_ms", 0) > now_ms():
                if self._exists(key):
                    return False
                raise StoreUnavailable(
                    f"object store bucket {self.bucket}: {key} is being uploaded by receiver "
                    f"{held.get('holder', '?')} (claim {claim_key} until {held['expires_ms']} ms); nothing was "
                    "acknowledged, the commit is retried")
        raise StoreUnavailable(f"object store bucket {self.bucket}: {CLAIM_GENERATIONS} abandoned upload claims "
                               f"under claims/{key}/; look for receivers that crash while uploading it")

    def _abort(self, key: str, upload: str | None) -> None:
        if upload is None:
            return
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except (ClientError, BotoCoreError) as exc:   # the bucket's lifecycle rule removes it later
            log.warning("multipart upload not aborted key=%s upload=%s: %s", key, upload, exc)

    def unavailable(self, what: str, key: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"object store {self.settings.endpoint} bucket {self.bucket}: {what} {key} "
                                f"failed ({exc}); nothing was acknowledged, the commit is retried")
