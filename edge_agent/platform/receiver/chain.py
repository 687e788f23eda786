"""Each agent's document chain, held by the platform (docs/PROTOCOL.md section 10).

Public surface:
- `ChainStore(root)`: the chains in the receiver's store, durable and shared by every receiver on that store
  (an exclusive `flock` per agent around each append, as for transfers):

      chains/<agent>/head                   "<seq> <sha256>\\n": the commit point of an append
      chains/<agent>/docs/<seq:012d>.json   the document at seq, its canonical bytes
      chains/<agent>/files/<file_id>        "<seq> <sha256>\\n": where a file manifest sits in the chain
      chains/<agent>/refused/<ms>-<seq>.json  what was refused (fork, rewind), kept for an investigator
      chains/<agent>/lock                   flock, exclusive around an append

  `append` stages a document and its file index (written to temporary files, nothing renamed yet) and keeps
  the agent's lock; `sync` (the service calls it before it sends any chain answer) makes every staged file
  and each agent's new head durable with one flush, renames them (documents, then indexes, then heads), flushes
  the directories with a second one and releases the locks: two flushes for a burst of documents, not one per
  document. Until then nothing is held: other receivers wait on the lock (or, should one wait on a lock of
  ours, `locked` flushes ours first), and a process killed before the head's rename leaves documents the head
  does not cover, which the next append of their seq overwrites. A power cut may keep the head's rename
  and lose an earlier one: the first lock of an agent's chain in a process checks the head against the
  document it names (and that document's file index) and steps back to the last one held (`_recover`).
- `ChainKeeper(store, keys, sign, publish_event)`: the rules. `offer(agent, payload)` for a `chain/doc`
  message and `query(agent, payload)` for a `chain/query`, each returning the answer for `chain_acks`
  (None: dropped, counted in `dropped`); `manifest_problem(agent, file_id, canonical)` for the file lane.
  `on_rotation(agent_id, doc, seq)` is called with every `key_rotation` document the chain holds: the
  receiver wires it to `KeyRing.learn_rotation`, so the next document may carry the new key.

The rules: the document at head+1 must verify against the agent's enrolled key and name the held head in
`prev`; a document beyond head+1 is a gap (answered with the head, the agent sends from there); the same
document again is a duplicate (answered with the head); another document at a seq already held, or one
whose `prev` is not the held head, is a fork; a head lower than the one held (in a query) is a rewind. A
fork and a rewind are refused with a reason and published as platform events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from edge_agent.clock import now_ms
from edge_agent.durable import SyncGroup, atomic_write, discard_temps, lock_file, replace_temps, write_temps
from edge_agent.evidence.manifest import GENESIS_PREV, ManifestError, canonical_json, verify_signature
from edge_agent.evidence.receipts import chain_receipt_body
from edge_agent.evidence.suites import PublicKey
from edge_agent.platform.receiver.store import StoreUnavailable
from edge_agent.protocol.wire import FILE_ID_PATTERN, WireError, decode_json

log = logging.getLogger(__name__)

MAX_CHAIN_MESSAGE = 4 * 1024**2   # a session manifest of a volume with thousands of files fits
STATE_HELD, STATE_GAP, STATE_REFUSED = "held", "gap", "refused"
REFUSAL_FORK, REFUSAL_REWIND, REFUSAL_INVALID = "fork", "rewind", "invalid"
EVENT_FORK, EVENT_REWIND = "chain_fork", "chain_rewind"
EVENT_REPEAT_S = 60.0   # the same event (agent, kind, seq) is published at most once a minute

Head = tuple[int, str | None]   # (seq, sha256 of the document at seq); (0, None): nothing held


class ChainRecords(Protocol):
    """The chain's copy in the WORM bucket (worm.py `BucketRecords`); each raises StoreUnavailable."""

    def put_chain_doc(self, agent: str, seq: int, canonical: bytes) -> str:
        """Create the document at `seq`; the SHA-256 of the one the bucket holds there (this one, or a fork)."""

    def put_refused(self, agent: str, seq: int, payload: bytes) -> None: ...

    def put_chain_receipt(self, agent: str, receipt: dict[str, Any]) -> None: ...


class ForkInBucket(Exception):
    """The bucket holds another document at this seq (written by a receiver on another host)."""


class ChainStore:
    """The agents' chains in the receiver's store (layout in the module docstring); with `bucket`, in the WORM
    bucket too."""

    def __init__(self, root: Path, bucket: ChainRecords | None = None):
        self.root = Path(root)
        self.bucket = bucket
        self._checked: set[str] = set()   # agents whose head this process has checked (`_recover`)
        self._mutex = threading.RLock()   # this process's threads: what is staged and the locks it keeps
        self._group: SyncGroup | None = None          # staged since the last `sync`
        self._temps: list[tuple[Path, Path]] = []     # documents and file indexes written, not renamed
        self._heads: dict[str, tuple[int, str]] = {}  # agent -> its staged head
        self._docs: dict[tuple[str, int], str] = {}   # (agent, seq) -> SHA-256 of the staged document
        self._kept: dict[str, int] = {}               # agent -> its lock's descriptor, kept until `sync`
        self._staged_at = 0.0                         # monotonic time of the first staging since `sync`

    def _dir(self, agent: str) -> Path:
        return self.root / "chains" / agent

    def doc_path(self, agent: str, seq: int) -> Path:
        return self._dir(agent) / "docs" / f"{seq:012d}.json"

    @contextmanager
    def locked(self, agent: str) -> Iterator[None]:
        """The agent's chain, exclusively (other receivers on this store wait)."""
        # Not under locks/: the sweeper expires old lock files there (transfers'), and this one is never idle.
        with self._mutex:
            if agent in self._kept:   # ours since an append not yet synced
                yield
                return
            path = self._dir(agent) / "lock"
            fd = lock_file(path, wait=False)
            if fd is None:
                # Another receiver holds it, and it may be waiting for one we keep: flush ours first.
                self.sync()
                fd = lock_file(path, wait=True)
            try:
                if agent not in self._checked:
                    self._recover(agent)
                    self._checked.add(agent)
                yield
            finally:
                if agent in self._heads:
                    self._kept[agent] = fd   # what was staged must not be overtaken before `sync`
                else:
                    os.close(fd)

    def _recover(self, agent: str) -> None:
        """The head names a document held whole, whose file index is there: after a power cut that kept the
        head's rename but not the document's, step back to the last document held (its successor is sent
        again by the agent, which was never answered for it); a lost index entry is written again."""
        seq, digest = self.head(agent)
        found, data = seq, None
        while found > 0:
            try:
                data = self.doc_path(agent, found).read_bytes()
            except FileNotFoundError:
                data = None
            if data is not None and (found < seq or hashlib.sha256(data).hexdigest() == digest):
                break
            found -= 1   # missing, or another (uncovered) document than the head names: not held
        if found != seq:
            log.error("chain head stepped back agent=%s from=%d to=%d reason=the document the head named was "
                      "not on disk (power cut)", agent, seq, found)
            if found == 0:
                (self._dir(agent) / "head").unlink(missing_ok=True)
                return
            digest = hashlib.sha256(data or b"").hexdigest()
            atomic_write(self._dir(agent) / "head", f"{found} {digest}\n".encode("ascii"))
        if data is not None:
            doc = json.loads(data)
            entry = self._file_index_entry(agent, found, digest, doc)
            if entry is not None and (not entry[0].exists() or entry[0].read_bytes() != entry[1]):
                atomic_write(*entry)

    def _file_index_entry(self, agent: str, seq: int, digest: str,
                          doc: dict[str, Any]) -> tuple[Path, bytes, int] | None:
        file_id = doc.get("file_id")
        if doc.get("type") == "file" and isinstance(file_id, str) and FILE_ID_PATTERN.match(file_id):
            return self._dir(agent) / "files" / file_id, f"{seq} {digest}\n".encode("ascii"), 0o644
        return None

    def head(self, agent: str) -> Head:
        staged = self._heads.get(agent)
        if staged is not None:
            return staged
        try:
            seq, digest = (self._dir(agent) / "head").read_text(encoding="ascii").split()
        except FileNotFoundError:
            return 0, None
        return int(seq), digest

    def sha256_at(self, agent: str, seq: int) -> str | None:
        """SHA-256 of the held document at `seq` (None if not held)."""
        if seq < 1 or seq > self.head(agent)[0]:
            return None
        staged = self._docs.get((agent, seq))
        if staged is not None:
            return staged
        try:
            return hashlib.sha256(self.doc_path(agent, seq).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def append(self, agent: str, seq: int, canonical: bytes, doc: dict[str, Any]) -> str:
        """Hold `canonical` as document `seq` (call under `locked`, with seq = head + 1); returns its SHA-256.
        With a bucket, the document is created there first (ForkInBucket: it holds another one at `seq`;
        StoreUnavailable: nothing changed here)."""
        digest = hashlib.sha256(canonical).hexdigest()
        if self.bucket is not None:
            held = self.bucket.put_chain_doc(agent, seq, canonical)
            if held != digest:
                raise ForkInBucket(held)
        entries = [(self.doc_path(agent, seq), canonical, 0o444)]
        index = self._file_index_entry(agent, seq, digest, doc)
        if index is not None:
            entries.append(index)
        with self._mutex:
            if self._group is None:
                self._group = SyncGroup(self.root, grouped=True)
                self._staged_at = time.monotonic()
            self._temps += write_temps(entries, self._group)
            self._heads[agent] = (seq, digest)
            self._docs[(agent, seq)] = digest
        return digest

    def staged_for(self) -> float:
        """Seconds since the oldest document not yet synced was staged (0.0: none)."""
        return time.monotonic() - self._staged_at if self._heads else 0.0

    def sync(self) -> None:
        """Make every document staged since the last call held: the files and each agent's new head durable
        (one flush), renamed in order (documents and indexes, then the heads), their directories durable (a
        second flush); then the agents' locks are released. Nothing may be answered about a document (held,
        a receipt covering it) before this returns. On an error nothing staged is held (the agents send again)."""
        with self._mutex:
            group, temps, heads = self._group, self._temps, self._heads
            self._group, self._temps, self._heads, self._docs = None, [], {}, {}
            kept, self._kept = self._kept, {}
            try:
                if group is None:
                    return
                with group:
                    heads_temps: list[tuple[Path, Path]] = []
                    try:
                        heads_temps = write_temps([(self._dir(agent) / "head", f"{seq} {digest}\n".encode("ascii"),
                                                    0o644) for agent, (seq, digest) in heads.items()], group)
                        group.sync()
                        replace_temps(temps, group)
                        replace_temps(heads_temps, group)
                        group.sync()
                    except BaseException:
                        discard_temps(temps + heads_temps)
                        raise
            finally:
                for fd in kept.values():
                    os.close(fd)

    def file_entry(self, agent: str, file_id: str) -> tuple[int, str] | None:
        """(seq, sha256) of `file_id`'s manifest in the held chain, if the chain holds it."""
        try:
            seq, digest = (self._dir(agent) / "files" / file_id).read_text(encoding="ascii").split()
        except FileNotFoundError:
            return None
        return (int(seq), digest) if int(seq) <= self.head(agent)[0] else None

    def keep_refused(self, agent: str, seq: int, payload: bytes) -> None:
        atomic_write(self._dir(agent) / "refused" / f"{now_ms()}-{seq}.json", payload, mode=0o444)
        if self.bucket is not None:
            try:
                self.bucket.put_refused(agent, seq, payload)
            except StoreUnavailable as exc:   # kept here all the same, for an investigator
                log.error("refused chain message not copied to the bucket agent=%s seq=%d: %s", agent, seq, exc)

    def keep_receipt(self, agent: str, receipt: dict[str, Any]) -> bool:
        """Copy a chain receipt into the bucket before it is sent (True; or no bucket). False: the bucket cannot
        be reached, and the answer goes without a receipt (the agent asks again)."""
        if self.bucket is None:
            return True
        try:
            self.bucket.put_chain_receipt(agent, receipt)
        except StoreUnavailable as exc:
            log.warning("chain receipt not kept agent=%s seq=%s: %s", agent, receipt.get("seq"), exc)
            return False
        return True


class ChainKeeper:
    """Applies the chain rules to what agents send; answers are dicts for `{root}/{a}/chain_acks`."""

    def __init__(self, store: ChainStore, public_key: Callable[[str, object, int], PublicKey],
                 sign: Callable[[dict[str, Any]], dict[str, Any]],
                 publish_event: Callable[[dict[str, Any]], None], *, receiver: str = ""):
        self.store = store
        self.public_key = public_key
        self.sign = sign
        self.publish_event = publish_event
        self.receiver = receiver
        # Called with (agent, key_rotation document, its seq) once the chain holds it: the key learning.
        self.on_rotation: Callable[[str, dict[str, Any], int], object] | None = None
        self.dropped = 0        # unusable chain messages (malformed, oversized, wrong agent, bad signature)
        self.duplicates = 0     # documents already held, sent again (replays, resends)
        self._events: dict[tuple[str, str, int], float] = {}

    # -- messages ------------------------------------------------------------------------------

    def query(self, agent: str, payload: bytes) -> dict[str, Any] | None:
        """A `chain/query`: the held head, or a refusal if the agent's head is behind it (rewind) or is
        another document at a held seq (fork)."""
        try:
            message = decode_json(payload, "chain-query", MAX_CHAIN_MESSAGE)
        except WireError as exc:
            return self._drop(agent, str(exc))
        held = self.store.head(agent)
        theirs = message["head"]
        seq, digest = (0, None) if theirs is None else (theirs["seq"], theirs["sha256"])
        if not isinstance(seq, int):
            return self._drop(agent, f"chain-query: seq {seq!r} is not an integer")
        if seq < held[0]:
            return self._refuse(agent, REFUSAL_REWIND, seq, digest, held,
                                f"the agent presents chain head {seq}, but the platform holds its chain up to "
                                f"{held[0]}: documents were removed on the agent (restored from a backup, or "
                                "truncated); investigate before it may send its chain again", payload)
        if seq >= 1 and seq == held[0] and digest != held[1]:
            return self._refuse(agent, REFUSAL_FORK, seq, digest, held,
                                f"the agent's document {seq} is not the one the platform holds at {seq}", payload)
        return self._answer(agent, STATE_HELD, held)

    def offer(self, agent: str, payload: bytes) -> dict[str, Any] | None:
        """A `chain/doc`: hold the document, or say why not."""
        try:
            message = decode_json(payload, "chain-doc", MAX_CHAIN_MESSAGE)
            seq, doc = message["seq"], message["doc"]
            if not isinstance(seq, int):   # JSON Schema counts 2.0 as an integer; a position is not a float
                raise WireError(f"chain-doc: seq {seq!r} is not an integer")
            if doc["agent_id"] != agent:
                raise WireError(f"a document of agent {doc['agent_id']!r} on the chain of {agent!r}")
            # ManifestError (KeyRefused) for an agent not enrolled or a key its rotation retired before seq.
            verify_signature(doc, self.public_key(agent, doc.get("key_id"), seq))
            canonical = canonical_json(doc)
        except (WireError, ManifestError) as exc:
            return self._drop(agent, str(exc))
        digest = hashlib.sha256(canonical).hexdigest()
        with self.store.locked(agent):
            held = self.store.head(agent)
            if seq <= held[0]:
                if self.store.sha256_at(agent, seq) == digest:
                    self.duplicates += 1
                    return self._answer(agent, STATE_HELD, held)
                return self._refuse(agent, REFUSAL_FORK, seq, digest, held,
                                    f"document {seq} ({doc['type']}) differs from the one the platform holds at "
                                    f"{seq}: two documents claim the same place in the chain", payload)
            if seq > held[0] + 1:
                return self._answer(agent, STATE_GAP, held)
            if doc["prev"] != (held[1] or GENESIS_PREV):
                return self._refuse(agent, REFUSAL_FORK, seq, digest, held,
                                    f"document {seq} ({doc['type']}) follows a document the platform does not "
                                    f"hold at {held[0]} (prev {doc['prev'][:16]}…)", payload)
            try:
                self.store.append(agent, seq, canonical, doc)
            except ForkInBucket as fork:
                return self._refuse(agent, REFUSAL_FORK, seq, digest, held,
                                    f"document {seq} ({doc['type']}) differs from the one the platform's bucket "
                                    f"holds at {seq} (sha256 {str(fork)[:16]}…, written by another receiver): "
                                    "two documents claim the same place in the chain", payload)
            except StoreUnavailable as exc:   # not held: no answer, the agent queries again after its timeout
                log.warning("chain document not held agent=%s seq=%d: %s", agent, seq, exc)
                return None
            held = (seq, digest)
        if doc["type"] == "key_rotation" and self.on_rotation is not None:
            try:
                self.on_rotation(agent, doc, seq)
            except ManifestError as exc:   # held in the chain all the same: it is the agent's signed word
                log.error("key rotation in the chain not learned agent=%s seq=%d: %s", agent, seq, exc)
        return self._answer(agent, STATE_HELD, held)

    def manifest_problem(self, agent: str, file_id: str, canonical: bytes) -> str | None:
        """Why a manifest on the file lane is not the one the held chain has for this file, or None (also
        when the chain does not hold it yet: the file lane does not wait for the chain)."""
        entry = self.store.file_entry(agent, file_id)
        if entry is None or entry[1] == hashlib.sha256(canonical).hexdigest():
            return None
        return (f"this manifest is not the one in the agent's chain at seq {entry[0]} "
                f"(sha256 {entry[1][:16]}…): refused")

    # -- answers -------------------------------------------------------------------------------

    def _answer(self, agent: str, state: str, held: Head, **extra: Any) -> dict[str, Any]:
        seq, digest = held
        receipt = self.sign(chain_receipt_body(agent, seq, digest)) if seq >= 1 and digest else None
        if receipt is not None and not self.store.keep_receipt(agent, receipt):
            receipt = None
        return {"state": state, "seq": seq, "sha256": digest, "receipt": receipt, **extra}

    def _drop(self, agent: str, reason: str) -> None:
        self.dropped += 1
        log.warning("chain message dropped agent=%r dropped=%d reason=%s", agent[:64], self.dropped, reason[:300])
        return None

    def _refuse(self, agent: str, refusal: str, seq: int, digest: str | None, held: Head, reason: str,
                payload: bytes) -> dict[str, Any]:
        kind = EVENT_FORK if refusal == REFUSAL_FORK else EVENT_REWIND
        log.error("event=%s agent=%s seq=%d held=%d reason=%s", kind, agent, seq, held[0], reason)
        key, now = (agent, kind, seq), time.monotonic()
        if now - self._events.get(key, -EVENT_REPEAT_S) >= EVENT_REPEAT_S:
            if len(self._events) > 10_000:
                self._events.clear()
            self._events[key] = now
            self.store.keep_refused(agent, seq, payload)
            self.publish_event({"type": kind, "agent_id": agent, "receiver": self.receiver, "ts_ms": now_ms(),
                                "held_seq": held[0], "held_sha256": held[1], "offered_seq": seq,
                                "offered_sha256": digest, "reason": reason})
        return self._answer(agent, STATE_REFUSED, held, refusal=refusal, offered_seq=seq, reason=reason)
