"""Transfers in progress as objects in a bucket without Object Lock (`[store] transfers = "s3"`).

With these, receivers share nothing but the broker and the object store: any receiver continues any transfer,
and no lock is taken across hosts (docs/SCALING.md "Transfers in progress in the object store"). Keys in
`transfers_bucket`:

    transfers/<agent>/<file_id>/manifest.json       the verified manifest (canonical bytes), a conditional create
    transfers/<agent>/<file_id>/chunks/<sha256>-<chunk_size>/<seq:08d>
                                                    each verified chunk, written with the checksum of its header
                                                    (ChecksumCRC32, or ChecksumSHA256 from older agents: the server
                                                    refuses bytes that do not match) and If-None-Match: *;
                                                    under the file's SHA-256 and chunk size from the manifest, so
                                                    a chunk written late for an earlier manifest of the same id
                                                    (another receiver committed, rejected or restarted it
                                                    meanwhile) is never counted for another file
    rejected/<agent>/<file_id>.json                 a rejected file and why (until a new manifest)

The object is the record: a chunk is held when its PUT returned (that is the durability an ack waits for, so
`sync` has nothing to do), and `have()` is a listing of the transfer's chunks. A receiver killed at any point
leaves only whole objects: the next one lists them and asks for the rest. The commit (any receiver, on the last
chunk, a progress or a query) reads the chunks back in order, hashing the whole file on the way, into the
multipart upload of the committed object in the WORM bucket (`S3Committed.commit_blocks`: one part of at most
16 MiB in memory at a time), which is completed only if the SHA-256 is the manifest's; then the index entry (the
conditional create that makes `complete` exactly once), and only then are the transfer's objects deleted.
A receiver killed mid-commit leaves an incomplete multipart upload (the bucket's lifecycle rule aborts it) and
its transfer objects: the next progress commits again. While a bucket cannot be reached nothing is
acknowledged `complete`: chunks not stored are not recorded (the agent sends them again), and `have()` answers
what this process last saw listed or stored.

Abandoned transfers are not swept by the receiver: the transfer bucket's lifecycle rule expires `transfers/`
after `receiver.incoming_expiry_days` (docs/OPERATIONS.md "Transfers in the object store").
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from edge_agent.clock import now_ms
from edge_agent.i18n import N_
from edge_agent.platform.receiver.objectstore import DigestMismatch, S3Committed, _code, _status, read_object
from edge_agent.platform.receiver.store import ChunkStore, Limits, StoreConfigError, StoreUnavailable
from edge_agent.platform.receiver.supervise import pulse
from edge_agent.protocol.wire import (
    ACK_COMPLETE,
    ACK_RECEIVING,
    ACK_REJECTED,
    CHECK_CRC32,
    REASON_BUSY,
    Ack,
    check_kind,
    chunk_count,
    to_ranges,
)

log = logging.getLogger(__name__)
MAX_TRANSFERS_KNOWN = 4096


class BucketTransfers(ChunkStore):
    """A `ChunkStore` whose transfers in progress are objects in `transfers_bucket` (committed files: the WORM
    bucket of `committed`). `root` keeps only what the local parts of the receiver need (its keys)."""

    def __init__(self, root: Path, committed: S3Committed, transfers_bucket: str, *, limits: Limits | None = None):
        super().__init__(root, sole_writer=False, limits=limits, committed=committed)
        self.s3 = committed.s3
        self.transfers_bucket = transfers_bucket
        # Chunks this process saw in the bucket (listed or stored by it): what `have` answers while the bucket
        # cannot be listed. Every one of them was durable when seen.
        self._seen: OrderedDict[tuple[str, str], set[int]] = OrderedDict()
        self._docs: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()   # manifests read or accepted

    def check_bucket(self) -> None:
        """At start: StoreConfigError if the transfer bucket is missing or has Object Lock (its chunks could not
        be deleted after the commit); a bucket that does not answer only logs."""
        try:
            config = self.s3.get_object_lock_configuration(Bucket=self.transfers_bucket)
        except ClientError as exc:
            if _code(exc) == "ObjectLockConfigurationNotFoundError":
                return
            if _code(exc) == "NoSuchBucket" or _status(exc) == 404:
                raise StoreConfigError(
                    N_("store.transfers_bucket = {bucket!r}: no such bucket; create it without Object Lock (aws "
                       "s3api create-bucket --bucket {bucket}) with the lifecycle rule of docs/OPERATIONS.md "
                       "\"Transfers in the object store\""), bucket=self.transfers_bucket) from exc
            log.warning("transfer bucket check failed bucket=%s: %s", self.transfers_bucket, exc)
            return
        except BotoCoreError as exc:
            log.warning("object store unreachable at start bucket=%s: %s", self.transfers_bucket, exc)
            return
        if config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled":
            raise StoreConfigError(
                N_("store.transfers_bucket = {bucket!r} has Object Lock: the chunks of a committed transfer could "
                   "not be deleted; give a bucket created without Object Lock (not the WORM bucket)"),
                bucket=self.transfers_bucket)

    # -- keys --------------------------------------------------------------------------------------

    @staticmethod
    def prefix(agent: str, file_id: str) -> str:
        return f"transfers/{agent}/{file_id}/"

    def manifest_key(self, agent: str, file_id: str) -> str:
        return self.prefix(agent, file_id) + "manifest.json"

    def chunks_prefix(self, agent: str, file_id: str, doc: dict[str, Any]) -> str:
        return f"{self.prefix(agent, file_id)}chunks/{doc['sha256']}-{int(doc['chunk_size'])}/"

    def chunk_key(self, agent: str, file_id: str, doc: dict[str, Any], seq: int) -> str:
        return f"{self.chunks_prefix(agent, file_id, doc)}{seq:08d}"

    @staticmethod
    def rejected_key(agent: str, file_id: str) -> str:
        return f"rejected/{agent}/{file_id}.json"

    # -- the bucket --------------------------------------------------------------------------------

    def _unavailable(self, what: str, key: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"object store {self.committed.settings.endpoint} bucket {self.transfers_bucket}: "
                                f"{what} {key} failed ({exc}); nothing was acknowledged, it is retried")

    def _get(self, key: str) -> bytes | None:
        return read_object(self.s3, self.transfers_bucket, key, self._unavailable)

    def _put(self, key: str, body: bytes | memoryview, check: str) -> bool:
        """Create `key` with the checksum the server checks (`check`: a chunk header's CRC-32, 8 hex digits, or a
        SHA-256, 64; False: it exists already). StoreUnavailable on any other answer, a refused checksum
        included."""
        digest = base64.b64encode(bytes.fromhex(check)).decode("ascii")
        checksum = {"ChecksumCRC32" if check_kind(check) == CHECK_CRC32 else "ChecksumSHA256": digest}
        try:
            self.s3.put_object(Bucket=self.transfers_bucket, Key=key, Body=bytes(body), IfNoneMatch="*", **checksum)
        except ClientError as exc:
            if _status(exc) == 412 or _code(exc) == "PreconditionFailed":
                return False
            raise self._unavailable("write", key, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("write", key, exc) from exc
        return True

    def _list(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """Every page of a listing of `prefix` (StoreUnavailable if the bucket cannot be listed)."""
        args: dict[str, Any] = {"Bucket": self.transfers_bucket, "Prefix": prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        try:
            while True:
                page = self.s3.list_objects_v2(**args)
                yield page
                if not page.get("IsTruncated"):
                    return
                args["ContinuationToken"] = page["NextContinuationToken"]
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("list", prefix, exc) from exc

    def _delete_transfer(self, agent: str, file_id: str) -> None:
        """Delete every object of a transfer, its manifest last (a receiver that sees the manifest finds the
        chunks it names, or asks for them again)."""
        keys = [obj["Key"] for page in self._list(self.prefix(agent, file_id) + "chunks/")
                for obj in page.get("Contents", [])]
        for key in [*keys, self.manifest_key(agent, file_id)]:
            try:
                self.s3.delete_object(Bucket=self.transfers_bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                raise self._unavailable("delete", key, exc) from exc
        self._forget(agent, file_id)

    def _forget(self, agent: str, file_id: str) -> None:
        with self._known_lock:
            self._seen.pop((agent, file_id), None)
            self._docs.pop((agent, file_id), None)

    def _remember(self, agent: str, file_id: str, doc: dict[str, Any]) -> None:
        with self._known_lock:
            self._docs[(agent, file_id)] = doc
            self._docs.move_to_end((agent, file_id))
            while len(self._docs) > MAX_TRANSFERS_KNOWN:
                self._docs.popitem(last=False)

    def _doc(self, agent: str, file_id: str) -> dict[str, Any] | None:
        """The transfer's manifest: this process's copy, else read from the bucket (None: no transfer).
        StoreUnavailable if it must be read and cannot."""
        with self._known_lock:
            doc = self._docs.get((agent, file_id))
        if doc is None:
            body = self._get(self.manifest_key(agent, file_id))
            if body is None:
                return None
            doc = json.loads(body)
            self._remember(agent, file_id, doc)
        return doc

    def _saw(self, agent: str, file_id: str, seqs: set[int] | int) -> None:
        with self._known_lock:
            key = (agent, file_id)
            held = self._seen.setdefault(key, set())
            held.update(seqs if isinstance(seqs, set) else {seqs})
            self._seen.move_to_end(key)
            while len(self._seen) > MAX_TRANSFERS_KNOWN:
                self._seen.popitem(last=False)

    # -- reading state -----------------------------------------------------------------------------

    def rejection(self, agent: str, file_id: str) -> str | None:
        try:
            body = self._get(self.rejected_key(agent, file_id))
        except StoreUnavailable as exc:
            log.warning("store unreachable agent=%s file=%s: %s", agent, file_id, exc)
            return None
        return None if body is None else str(json.loads(body)["reason"])

    def manifest(self, agent: str, file_id: str) -> dict[str, Any] | None:
        try:
            body = self._get(self.manifest_key(agent, file_id))
        except StoreUnavailable as exc:
            log.warning("store unreachable agent=%s file=%s: %s", agent, file_id, exc)
            return None
        return None if body is None else json.loads(body)

    def have(self, agent: str, file_id: str) -> list[int]:
        """The chunks in the bucket, in order: a listing (while it cannot be listed, those this process saw)."""
        try:
            doc = self._doc(agent, file_id)
            if doc is None:
                return []
            prefix = self.chunks_prefix(agent, file_id, doc)
            listed = {int(obj["Key"][len(prefix):]) for page in self._list(prefix)
                      for obj in page.get("Contents", [])}
        except StoreUnavailable as exc:
            log.warning("transfer not listed agent=%s file=%s: %s", agent, file_id, exc)
            with self._known_lock:
                return sorted(self._seen.get((agent, file_id), ()))
        self._saw(agent, file_id, listed)
        return sorted(listed)

    def open_ids(self, agent: str) -> set[str]:
        prefix = f"transfers/{agent}/"
        try:
            return {p["Prefix"][len(prefix):-1] for page in self._list(prefix, "/")
                    for p in page.get("CommonPrefixes", [])}
        except StoreUnavailable as exc:
            log.warning("transfers not listed agent=%s: %s", agent, exc)
            return set()

    def at_cap(self, agent: str, file_id: str) -> str | None:
        """Only receiver.max_open_transfers_per_agent applies (the bucket's space is not this receiver's)."""
        limits = self.limits
        if limits is None:
            return None
        open_ids = self.open_ids(agent)
        if file_id in open_ids or len(open_ids) < limits.max_open_transfers:
            return None
        return f"{len(open_ids)} transfers open, receiver.max_open_transfers_per_agent is {limits.max_open_transfers}"

    # -- changing state ----------------------------------------------------------------------------

    def accept_manifest(self, agent: str, file_id: str, canonical: bytes, doc: dict[str, Any]) -> Ack:
        """Start (or rejoin) a transfer; `receiving` with reason busy while the bucket cannot be reached."""
        try:
            return self._accept(agent, file_id, canonical, doc)
        except StoreUnavailable as exc:
            log.warning("transfer deferred agent=%s file=%s: %s", agent, file_id, exc)
            return Ack(file_id, ACK_RECEIVING, [], None, REASON_BUSY)

    def _accept(self, agent: str, file_id: str, canonical: bytes, doc: dict[str, Any]) -> Ack:
        assert self.committed is not None
        stored = self.committed.stored(agent, file_id)
        if stored is not None:
            if stored["sha256"] == doc["sha256"]:
                return Ack(file_id, ACK_COMPLETE, [], stored["sha256"])
            return Ack(file_id, ACK_REJECTED, [], None,
                       f"a different file with id {file_id} is already stored (SHA-256 {stored['sha256']})")
        try:
            self.s3.delete_object(Bucket=self.transfers_bucket, Key=self.rejected_key(agent, file_id))
        except (ClientError, BotoCoreError) as exc:   # a new manifest is a new attempt
            raise self._unavailable("delete", self.rejected_key(agent, file_id), exc) from exc
        key = self.manifest_key(agent, file_id)
        if not self._put(key, canonical, hashlib.sha256(canonical).hexdigest()) and self._get(key) != canonical:
            # Another manifest for this id: its chunks are not this file's. Drop them, then start again.
            log.warning("transfer restarted agent=%s file=%s: a new manifest replaces the one in progress",
                        agent, file_id)
            self._delete_transfer(agent, file_id)
            self._put(key, canonical, hashlib.sha256(canonical).hexdigest())
        self._remember(agent, file_id, doc)
        return self.progress(agent, file_id, doc)

    def put_chunk(self, agent: str, file_id: str, seq: int, offset: int, data: bytes | memoryview,
                  check: str) -> bool:
        """Store chunk `seq` (verified by the caller against `check`) as its object; held once the PUT returned. A
        chunk the bucket refuses (unreachable, or a checksum that does not match its bytes) is not recorded: the
        agent sends it again. True unless the transfer is not in progress (never started, or settled)."""
        try:
            doc = self._doc(agent, file_id)
            if doc is None:
                return False
            self._put(self.chunk_key(agent, file_id, doc, seq), data, check)
        except StoreUnavailable as exc:
            log.warning("chunk not stored agent=%s file=%s seq=%d: %s", agent, file_id, seq, exc)
            return True
        self._saw(agent, file_id, seq)
        return True

    def sync(self, transfers: object) -> None:
        """Nothing to do: a chunk is held only once its PUT returned."""

    def progress(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        """What the bucket holds of this file; commits it when every chunk is there."""
        have = self.have(agent, file_id)
        total = chunk_count(doc["size"], doc["chunk_size"])
        settled = self.settled(agent, file_id)
        if settled is not None:
            return settled
        if len(have) < total:
            return Ack(file_id, ACK_RECEIVING, to_ranges(have))
        return self._commit_transfer(agent, file_id, doc)

    def _chunks(self, agent: str, file_id: str, doc: dict[str, Any], lost: list[int]) -> Iterator[bytes]:
        """The transfer's chunks in order, each checked against the checksum stored with it; a chunk that is
        gone or does not match is added to `lost` and ends the stream (StoreUnavailable stops it too)."""
        for seq in range(chunk_count(doc["size"], doc["chunk_size"])):
            key = self.chunk_key(agent, file_id, doc, seq)
            try:
                got = self.s3.get_object(Bucket=self.transfers_bucket, Key=key, ChecksumMode="ENABLED")
                data = got["Body"].read()
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                    lost.append(seq)
                    raise _ChunkLost from exc
                raise self._unavailable("read", key, exc) from exc
            except BotoCoreError as exc:
                raise self._unavailable("read", key, exc) from exc
            if not _matches(got, data):
                lost.append(seq)
                raise _ChunkLost
            if seq % 64 == 0:
                pulse()   # a large file takes minutes: each chunk read is progress for the supervisor
            yield data

    def _commit_transfer(self, agent: str, file_id: str, doc: dict[str, Any]) -> Ack:
        """Stream the chunks into the WORM bucket (`commit_blocks`), then delete the transfer's objects."""
        assert self.committed is not None
        lost: list[int] = []
        try:
            manifest = self._get(self.manifest_key(agent, file_id))
            if manifest is None:   # settled by another receiver meanwhile, or restarted by a new manifest
                return self.settled(agent, file_id) or Ack(file_id, ACK_RECEIVING, [], None,
                                                           "no manifest for this file: send the manifest first")
            entry = self.committed.commit_blocks(agent, file_id, self._chunks(agent, file_id, doc, lost), manifest,
                                                 doc)
        except _ChunkLost:
            settled = self.settled(agent, file_id)
            if settled is not None:   # another receiver committed it and deleted the chunks under this one
                return settled
            log.warning("chunks lost agent=%s file=%s seqs=%s: asking again", agent, file_id, lost)
            for seq in lost:
                try:
                    self.s3.delete_object(Bucket=self.transfers_bucket, Key=self.chunk_key(agent, file_id, doc, seq))
                except (ClientError, BotoCoreError) as exc:
                    log.warning("lost chunk not deleted agent=%s file=%s seq=%d: %s", agent, file_id, seq, exc)
            self._forget(agent, file_id)
            return Ack(file_id, ACK_RECEIVING, to_ranges(self.have(agent, file_id)))
        except DigestMismatch as exc:
            return self._reject_transfer(agent, file_id, str(exc))
        except StoreUnavailable as exc:
            log.warning("commit deferred agent=%s file=%s: %s", agent, file_id, exc)
            return Ack(file_id, ACK_RECEIVING, to_ranges(self.have(agent, file_id)))
        try:
            self._delete_transfer(agent, file_id)
        except StoreUnavailable as exc:   # committed: the lifecycle rule removes what is left
            log.warning("transfer objects not deleted agent=%s file=%s: %s", agent, file_id, exc)
        if entry["sha256"] != doc["sha256"]:
            return Ack(file_id, ACK_REJECTED, [], None,
                       f"a different file with id {file_id} is already stored (SHA-256 {entry['sha256']})")
        log.info("stored agent=%s file=%s size=%d sha256=%s bucket=%s from=transfers", agent, file_id, doc["size"],
                 doc["sha256"], self.committed.bucket)
        return Ack(file_id, ACK_COMPLETE, [], doc["sha256"])

    def reject(self, agent: str, file_id: str, reason: str) -> Ack:
        try:
            return self.settled(agent, file_id) or self._reject_transfer(agent, file_id, reason)
        except StoreUnavailable as exc:
            log.warning("rejection deferred agent=%s file=%s: %s", agent, file_id, exc)
            return Ack(file_id, ACK_RECEIVING, [], None, REASON_BUSY)

    def _reject_transfer(self, agent: str, file_id: str, reason: str) -> Ack:
        """Record the rejection, then drop the transfer's objects (the agent keeps its file). While the bucket
        cannot be reached: `receiving`, never `complete`."""
        body = json.dumps({"reason": reason, "ts_ms": now_ms()}, ensure_ascii=False).encode("utf-8")
        key = self.rejected_key(agent, file_id)
        try:
            self.s3.put_object(Bucket=self.transfers_bucket, Key=key, Body=body,
                               ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode("ascii"))
            self._delete_transfer(agent, file_id)
        except (ClientError, BotoCoreError, StoreUnavailable) as exc:
            log.warning("rejection not recorded agent=%s file=%s reason=%s: %s", agent, file_id, reason, exc)
            return Ack(file_id, ACK_RECEIVING, [], None, reason)
        log.warning("rejected agent=%s file=%s reason=%s", agent, file_id, reason)
        return Ack(file_id, ACK_REJECTED, [], None, reason)

    def expire(self, max_age_s: float) -> list[tuple[str, str, float]]:
        """Nothing: the transfer bucket's lifecycle rule expires abandoned transfers."""
        return []


def _matches(got: dict[str, Any], data: bytes) -> bool:
    """The bytes read match the checksum stored with them (CRC-32 or SHA-256; none stored: nothing to compare)."""
    crc, sha256 = got.get("ChecksumCRC32"), got.get("ChecksumSHA256")
    if crc is not None:
        return base64.b64decode(crc) == zlib.crc32(data).to_bytes(4, "big")
    return sha256 is None or base64.b64decode(sha256) == hashlib.sha256(data).digest()


class _ChunkLost(Exception):
    """A chunk of a transfer being committed is gone or no longer matches its checksum."""
