"""The reference receiver: the central side of wire protocol v1 (DESIGN.md section 5).

It takes every agent's `files/#` messages (optionally as one of several
receivers behind an MQTT 5 shared subscription), checks each against its JSON
Schema, the manifest's Ed25519 signature against the agent's enrolled key,
each chunk's transport check (CRC-32, or SHA-256 from older agents) and finally the whole file's SHA-256, stores files
content-addressed (`ChunkStore`), and acks: `receiving` with what it holds, at
least every `ack_every_chunks` chunks or `ack_interval_ms`; `complete` once
stored; `rejected` with a reason; both carry a receipt signed with the receiver's key
(`receipts`, docs/PROTOCOL.md "Receipts"). A malformed message is logged with its
reason and answered, never allowed to stop the receiver. Messages are PUBACKed
only after they were handled, so a receiver killed mid-message gets it again.

Four threads do the work, so hashing, writing and syncing overlap: the
checker checks each chunk's bytes as paho hands it over; the worker checks
and writes chunks (the store's hasher thread adds them to the whole-file
hash); the syncer makes them durable (an fdatasync of each transfer's data
file) and sends the acks. An ack names only chunks that were written before
the sync that preceded it began, and chunk writes go on while the disk
flushes, so the ack cadence costs no throughput.

Nothing in the message path waits. Behind a shared subscription a chunk may
come before its manifest reached the store (another receiver took it): such
an orphan chunk is parked in memory and retried as the worker idles, for at
most PARK_WAIT_S, within PARK_AGENT_BYTES per agent and PARK_MAX_BYTES in all,
so one agent flooding orphan chunks cannot hold up another's. It is PUBACKed
at once (the broker's in-flight window stays open): no ack has named it, so a
parked chunk lost with its process is only sent again. Beyond the caps it is
answered `receiving` with NO_MANIFEST at once. A sweeper thread drops transfers
untouched for `incoming_expiry_days` (an `incoming_expired` event in the log),
and the store answers `busy` to new transfers beyond the limits.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edge_agent.config import ReceiverConfig
from edge_agent.evidence.manifest import ManifestError, canonical_json, verify_signature
from edge_agent.platform.receiver.chain import ChainKeeper, ChainStore
from edge_agent.platform.receiver.fair import FairQueue
from edge_agent.platform.receiver.keyring import KeyRing
from edge_agent.platform.receiver.receipts import Receipts, ReceiverKey
from edge_agent.platform.receiver.store import ChunkStore, CommittedFiles, Limits
from edge_agent.platform.receiver.supervise import Loop, Supervisor
from edge_agent.protocol import sdnotify
from edge_agent.protocol.connection import Connection, build_client
from edge_agent.protocol.heartbeat import Heartbeat, Vital
from edge_agent.protocol.wire import (
    ACK_RECEIVING,
    ACK_REJECTED,
    CHUNK_CHECKS,
    HEADER_LENGTH,
    MAX_HEADER_BYTES,
    REASON_BUSY,
    Ack,
    FileTopic,
    WireError,
    chunk_check,
    chunk_count,
    chunk_data_check,
    chunk_span,
    decode_chunk,
    decode_json,
    parse_chain_topic,
    parse_file_topic,
    platform_events,
    to_ranges,
)

if TYPE_CHECKING:
    from edge_agent.platform.receiver.worm import BucketRecords

log = logging.getLogger(__name__)

NO_MANIFEST = "no manifest for this file: send the manifest first"
LEARNED_KEYS = Path("keys") / "learned"   # in the store: agents' keys learned from their rotation documents
Key = tuple[str, str]   # (agent id, file id)
PARK_WAIT_S = 1.0                  # how long an orphan chunk waits for its manifest (shared subscription only)
PARK_AGENT_BYTES = 32 * 1024**2    # orphan chunks' bytes kept per agent
PARK_MAX_BYTES = 128 * 1024**2     # and in all
PARK_POLL_S = 0.02                 # how often parked chunks look for their manifest
CHAIN_GROUP_MAX = 32               # chain answers held for one shared flush while more messages wait
CHAIN_GROUP_S = 0.2                # ... and for at most this long while files keep the worker busy
SWEEP_INTERVAL_S = 3600.0
# The fair queue (taken round-robin): per agent at most this many messages and `max_queued_mib_per_agent` of bytes,
# beyond which its messages are dropped; every ack tells the agent both (`max_queued`, `max_queued_bytes`), and it
# keeps its unacknowledged chunks within them (docs/PROTOCOL.md 4).
INBOUND_AGENT_MESSAGES = 512
INBOUND_TOTAL_BYTES = 384 * 1024**2   # in all (at least two agents' shares): beyond, paho waits (backpressure)
LOG_EVERY_S = 10.0                  # a per-message warning, per event and agent, at most this often
Parked = tuple[float, str, bytes, "str | None"]   # (deadline, topic, payload, data sha256)


def _committed_files(config: ReceiverConfig) -> CommittedFiles | None:
    """The bucket committed files go to ([store] backend = "s3"), or None: under receiver.store_dir."""
    if config.store.backend != "s3":
        return None
    # boto3 is the receiver-s3 extra: loaded only by a receiver that uses it.
    from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings

    committed = S3Committed(S3Settings.from_config(config.store))
    committed.check_bucket()
    return committed


def _chunk_store(config: ReceiverConfig, limits: Limits) -> ChunkStore:
    """Transfers in progress under receiver.store_dir/incoming/, or ([store] transfers = "s3") as objects in the
    transfer bucket (transfers.py), with the committed files wherever [store] backend says."""
    rc, committed = config.receiver, _committed_files(config)
    if config.store.transfers != "s3":
        return ChunkStore(rc.store_dir, sole_writer=not rc.shared_subscription, limits=limits, committed=committed)
    from edge_agent.platform.receiver.transfers import BucketTransfers

    assert config.store.transfers_bucket is not None   # the config's validator requires it
    store = BucketTransfers(rc.store_dir, committed, config.store.transfers_bucket,   # type: ignore[arg-type]
                            limits=limits)
    store.check_bucket()
    return store


def _bucket_records(committed: CommittedFiles | None) -> BucketRecords | None:
    """Chain documents and receipts in the bucket too, when the committed files are there."""
    if committed is None:
        return None
    from edge_agent.platform.receiver.worm import BucketRecords

    return BucketRecords(committed)   # type: ignore[arg-type]


class Receiver:
    def __init__(self, config: ReceiverConfig):
        rc = config.receiver
        self.config = config
        self.root = config.mqtt.root
        self.store = _chunk_store(config, Limits(
            max_open_transfers=rc.max_open_transfers_per_agent,
            max_reserved_bytes=int(rc.max_reserved_gb_per_agent * 1024**3),
            min_free_bytes=int(rc.min_free_gb * 1024**3)))
        self.expiry_s = rc.incoming_expiry_days * 86400
        self.keys = KeyRing(rc.keys_dir, rc.store_dir / LEARNED_KEYS)   # learn_rotation: keyring.py
        self.records = _bucket_records(self.store.committed)   # the custody record in the bucket, or None
        self.receipts = Receipts(ReceiverKey.load_or_create(rc.receipt_key_dir), self.store, self.records)
        self.max_chunk = rc.max_chunk_kib * 1024
        self.max_file = int(rc.max_file_gb * 1024**3)
        self.max_message = HEADER_LENGTH.size + MAX_HEADER_BYTES + self.max_chunk
        self.ack_every = rc.ack_every_chunks
        self.ack_interval_s = rc.ack_interval_ms / 1000
        self.shared = rc.shared_subscription
        share = "$share/receivers/" if self.shared else ""
        self.topic_filter = f"{share}{self.root}/+/files/#"
        self.chain_filter = f"{share}{self.root}/+/chain/#"
        self.chain = ChainKeeper(ChainStore(rc.store_dir, self.records),
                                 lambda agent, key_id, seq: self.keys.key_for(agent, key_id, chain_seq=seq),
                                 self.receipts.key.sign, self._publish_event, receiver=rc.client_id)
        self.chain.on_rotation = lambda agent, doc, seq: self.keys.learn_rotation(agent, doc, chain_seq=seq)
        self.client = build_client(config.mqtt, rc.client_id, manual_ack=True)
        self.client.on_message = self._on_message
        self.connection = Connection(self.client, config.mqtt, session_expiry_s=rc.session_expiry_s,
                                     on_up=self._subscribe)
        self.max_queued_bytes = int(rc.max_queued_mib_per_agent * 1024**2)
        self._inbound = FairQueue(agent_messages=INBOUND_AGENT_MESSAGES, agent_bytes=self.max_queued_bytes,
                                  total_bytes=max(INBOUND_TOTAL_BYTES, 2 * self.max_queued_bytes))
        self._refused: dict[str, float] = {}   # agent -> when its refusal was last logged (the paho thread's)
        self._queue: queue.Queue[tuple[int, mqtt.MQTTMessage, str | None]] = queue.Queue(maxsize=4)
        self._chain_answers: list[tuple[str, dict[str, Any]]] = []   # sent once their documents are durable
        self._manifests: OrderedDict[Key, dict] = OrderedDict()
        self._unacked: dict[Key, list[float]] = {}      # chunks written since the last ack, and since when
        self._repeats: dict[Key, tuple[str, float]] = {}
        self._repeats_lock = threading.Lock()
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}   # (event, agent) -> (last logged, left out)
        self._logged_lock = threading.Lock()
        self.warnings_left_out = 0   # warnings counted into the next one of their kind instead of logged
        self._stop = threading.Event()
        self._checker = Loop("receiver-checker", self._check, self._stop)
        self._worker = Loop("receiver-worker", self._work, self._stop)
        self._due: dict[Key, dict] = {}                 # files to ack after the next sync
        self._due_cond = threading.Condition()
        self._syncer = Loop("receiver-syncer", self._sync_loop, self._stop)
        self._sweeper = Loop("receiver-sweeper", self._sweep_loop, self._stop)
        self.supervisor = Supervisor(self.vitals, check_s=config.liveness.check_s, stall_s=config.liveness.stall_s)
        self._parked: OrderedDict[Key, list[Parked]] = OrderedDict()   # the worker's only
        self._parked_poll = 0.0
        self._parked_bytes: dict[str, int] = {}   # per agent

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._checker.start()
        self._worker.start()
        self._syncer.start()
        self._sweeper.start()
        self.connection.start("receiver-connection")
        self.supervisor.start()
        log.info("receiver started client_id=%s subscription=%s store=%s", self.config.receiver.client_id,
                 self.topic_filter, self.store.root)

    def vitals(self) -> list[Vital]:
        """The receiver's threads as the supervisor sees them."""
        return [self._checker.vital(), self._worker.vital(), self._syncer.vital(), self._sweeper.vital(),
                self.store.hasher.vital(), self.connection.vital()]

    def _subscribe(self, client: mqtt.Client) -> None:
        """Subscribe, and drop the filters of the other mode (shared or not) that a persistent session kept from
        an earlier run of this client id: a receiver switched to the shared subscription would otherwise get
        every message through the old plain one as well as its share (twice the work, and the other receivers'
        messages too)."""
        other = "" if self.shared else "$share/receivers/"
        client.unsubscribe([f"{other}{self.root}/+/files/#", f"{other}{self.root}/+/chain/#"])
        client.subscribe([(self.topic_filter, 1), (self.chain_filter, 1)])

    def stop(self) -> None:
        self._stop.set()
        self.supervisor.stop()
        self._checker.join(timeout=30)
        self._worker.join(timeout=30)
        if not self._worker.thread.is_alive():
            self._answer_chain()   # what the worker appended last: durable, and answered if still connected
        with self._due_cond:
            self._due_cond.notify_all()
        self._syncer.join(timeout=30)
        self._sweeper.join(timeout=30)
        self.connection.stop()
        self.store.close()

    def run_forever(self) -> None:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.start()
        sdnotify.notify(f"READY=1\nSTATUS=receiving; client {self.config.receiver.client_id}")
        try:
            while not stop.wait(1.0):
                pass
        finally:
            sdnotify.notify("STOPPING=1")
            self.stop()

    # -- the message pipeline ------------------------------------------------------------------

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        agent = message.topic[len(self.root) + 1:].split("/", 1)[0]
        if self._inbound.put(agent, (self.connection.generation, message), len(message.payload), self._stop):
            return
        if self._stop.is_set():
            return   # not PUBACKed: the broker sends it again
        # Over its agent's share: dropped, PUBACKed (no ack named it: the agent sends it again when asked).
        now = time.monotonic()
        if now - self._refused.get(agent, -60.0) >= 10.0:
            if len(self._refused) > 10_000:
                self._refused.clear()
            self._refused[agent] = now
            log.warning("event=agent_flooding agent=%r: messages beyond its share of the receiver's queue are "
                        "dropped (the agent sends them again); find out why it sends so much", agent[:64])
        self._puback(self.connection.generation, message)

    def _put(self, into: queue.Queue, item: tuple) -> None:
        """Queue for the next thread; blocks while it is full (backpressure up to the broker). A message dropped
        because the receiver stops was not PUBACKed: the broker sends it again."""
        while not self._stop.is_set():
            try:
                into.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _check(self, heartbeat: Heartbeat) -> None:
        while not self._stop.is_set():
            heartbeat.beat()
            item = self._inbound.get(timeout=0.1)
            if item is None:
                continue
            generation, message = item
            data_check = None
            if message.topic.endswith("/chunk") and len(message.payload) <= self.max_message:
                data_check = chunk_data_check(message.payload)
            self._put(self._queue, (generation, message, data_check))

    def _work(self, heartbeat: Heartbeat) -> None:
        while not self._stop.is_set():
            heartbeat.beat()
            try:
                generation, message, data_check = self._queue.get(timeout=PARK_POLL_S if self._parked else 0.05)
            except queue.Empty:
                self._answer_chain()
                self._retry_parked()
                self._flush_due()
                continue
            if not self._park(message, data_check):
                self._handle(message.topic, message.payload, data_check)
            self._puback(generation, message)
            if self.chain.store.staged_for() > CHAIN_GROUP_S:   # the agents' chain locks are held meanwhile
                self._answer_chain()
            self._retry_parked()
            self._flush_due()

    def _handle(self, topic: str, payload: bytes, data_check: str | None) -> None:
        try:
            self.handle(topic, payload, data_check=data_check)
        except Exception:
            # Never let one message stop the receiver; unanswered, the agent asks again (query).
            log.exception("message not handled topic=%s bytes=%d", topic, len(payload))

    def _puback(self, generation: int, message: mqtt.MQTTMessage) -> None:
        # A PUBACK of an earlier connection could name another message of the new one.
        if message.qos > 0 and generation == self.connection.generation:
            try:
                self.client.ack(message.mid, message.qos)
            except OSError as exc:   # the connection went while we worked: the broker sends it again
                log.info("puback not sent mid=%s: %s", message.mid, exc)

    def _park(self, message: mqtt.MQTTMessage, data_check: str | None) -> bool:
        """Behind a shared subscription, keep a chunk whose manifest is not in the store yet for the worker to
        retry (True), within the caps; anything else is handled now (False)."""
        if not self.shared or not message.topic.endswith("/chunk"):
            return False
        try:
            ft = parse_file_topic(self.root, message.topic)
        except WireError:
            return False
        key, size = (ft.agent_id, ft.file_id), len(message.payload)
        if (self._parked_bytes.get(ft.agent_id, 0) + size > PARK_AGENT_BYTES
                or sum(self._parked_bytes.values()) + size > PARK_MAX_BYTES):
            return False
        if key not in self._parked and (self._manifest(key) is not None or self.store.settled(*key) is not None):
            return False
        self._parked.setdefault(key, []).append((time.monotonic() + PARK_WAIT_S, message.topic, message.payload,
                                                 data_check))
        self._parked_bytes[ft.agent_id] = self._parked_bytes.get(ft.agent_id, 0) + size
        return True

    def _retry_parked(self) -> None:
        """Handle the parked chunks whose manifest came (or whose wait is over: NO_MANIFEST), at most every
        PARK_POLL_S: one listing of incoming/ per agent with parked chunks (a flood of orphans is hundreds of
        keys: a read of each one's manifest every poll was most of the worker's time), never a wait."""
        now = time.monotonic()
        if not self._parked or now < self._parked_poll:
            return
        self._parked_poll = now + PARK_POLL_S
        listed: dict[str, set[str]] = {}
        for key, items in list(self._parked.items()):
            if items[0][0] > now and key not in self._manifests:
                if key[0] not in listed:
                    listed[key[0]] = self.store.open_ids(key[0])
                if key[1] not in listed[key[0]] or self._manifest(key) is None:
                    continue
            del self._parked[key]
            left = self._parked_bytes.pop(key[0], 0) - sum(len(item[2]) for item in items)
            if left > 0:
                self._parked_bytes[key[0]] = left
            for _deadline, topic, payload, data_check in items:
                self._handle(topic, payload, data_check)

    def handle(self, topic: str, payload: bytes, *, data_check: str | None = None) -> None:
        """Handle one message from `files/#`. Never raises for bad input: it is logged and answered.
        `data_check`: the chunk's bytes already checked (`chunk_data_check`), else they are checked here.
        Chain messages (`{root}/{a}/chain/#`) go to the chain keeper."""
        try:
            chain = parse_chain_topic(self.root, topic)
        except WireError as exc:
            self.chain.dropped += 1
            log.warning("dropped chain message topic=%r reason=%s", topic[:200], exc)
            return
        if chain is not None:
            self._on_chain(*chain, payload)
            return
        try:
            ft = parse_file_topic(self.root, topic)
        except WireError as exc:
            log.warning("dropped message topic=%r reason=%s", topic, exc)
            return
        if len(payload) > self.max_message:
            reason = (f"{ft.kind} message of {len(payload)} bytes is larger than this receiver takes "
                      f"({self.max_message} bytes; receiver.max_chunk_kib)")
            if ft.kind == "chunk":
                self._refuse_chunk(ft, reason)
            else:
                self._refuse(ft, reason)
            return
        if ft.kind == "manifest":
            self._on_manifest(ft, payload)
        elif ft.kind == "chunk":
            self._on_chunk(ft, payload, data_check)
        else:
            self._on_query(ft, payload)

    def _on_manifest(self, ft: FileTopic, payload: bytes) -> None:
        # An agent at its cap gets `busy` before its manifest is parsed or its signature checked: a flood of
        # manifests costs the receiver a directory listing each, not a schema check, a verification and a lock
        # file. Unverified, the answer changes nothing: it is what a genuine manifest would get now.
        busy = self.store.at_cap(ft.agent_id, ft.file_id)
        if busy is not None:
            self._log_limited("transfer_deferred", ft.agent_id, "transfer deferred agent=%s file=%s reason=%s "
                              "detail=%r", ft.agent_id, ft.file_id, REASON_BUSY, busy)
            self._send(ft.agent_id, Ack(ft.file_id, ACK_RECEIVING, [], None, REASON_BUSY), repeat=True)
            return
        try:
            doc = decode_json(payload, "manifest")
            if (doc["agent_id"], doc["file_id"]) != (ft.agent_id, ft.file_id):
                raise WireError(f"manifest of {doc['agent_id']}/{doc['file_id']} was published on the topic of "
                                f"{ft.agent_id}/{ft.file_id}")
            verify_signature(doc, self.keys.key_for(ft.agent_id, doc.get("key_id")))   # KeyRefused: retired
            if doc["size"] > self.max_file:
                raise WireError(f"file of {doc['size']} bytes is larger than this receiver takes "
                                f"(receiver.max_file_gb)")
            if doc["chunk_size"] > self.max_chunk:
                raise WireError(f"chunk size {doc['chunk_size']} is larger than this receiver takes "
                                f"(receiver.max_chunk_kib)")
            not_chained = self.chain.manifest_problem(ft.agent_id, ft.file_id, canonical_json(doc))
            if not_chained is not None:
                raise WireError(not_chained)
        except (WireError, ManifestError) as exc:
            # The store is not touched: a forged manifest cannot disturb a genuine transfer's chunks.
            self._refuse(ft, f"manifest: {exc}")
            return
        ack = self.store.accept_manifest(ft.agent_id, ft.file_id, canonical_json(doc), doc)
        key = (ft.agent_id, ft.file_id)
        if ack.state == ACK_RECEIVING and ack.reason != REASON_BUSY:
            self._remember(key, doc)
        else:
            self._send(ft.agent_id, ack)

    def _on_chunk(self, ft: FileTopic, payload: bytes, data_check: str | None) -> None:
        key = (ft.agent_id, ft.file_id)
        doc = self._manifest(key)
        if doc is None:
            settled = self.store.settled(*key)
            if settled is None:
                self._log_limited("chunk_dropped", ft.agent_id, "chunk dropped agent=%s file=%s reason=%s",
                                  ft.agent_id, ft.file_id, NO_MANIFEST)
            self._send(ft.agent_id, settled or Ack(ft.file_id, ACK_RECEIVING, [], None, NO_MANIFEST), repeat=True)
            return
        total = chunk_count(doc["size"], doc["chunk_size"])
        try:
            header, data = decode_chunk(payload)
            if header.seq >= total:
                raise WireError(f"chunk {header.seq} is beyond the file: it has {total} chunk(s)")
            offset, length = chunk_span(header.seq, doc["size"], doc["chunk_size"])
            if (header.offset, header.size) != (offset, length):
                raise WireError(f"chunk {header.seq}: offset {header.offset} and size {header.size} do not match "
                                f"the manifest (offset {offset}, size {length})")
            if data_check is None or len(data_check) != len(header.check):   # not checked yet, or as the other kind
                data_check = chunk_check(data, header.check)
            if data_check != header.check:
                raise WireError(f"chunk {header.seq}: its bytes do not match the {header.check_name} in its header "
                                "(altered in transit or forged)")
        except WireError as exc:
            self._refuse_chunk(ft, f"chunk: {exc}", doc)
            return
        if not self.store.put_chunk(ft.agent_id, ft.file_id, header.seq, header.offset, data, header.check):
            self._forget(key)   # settled meanwhile (another receiver committed or rejected it)
            self._send(ft.agent_id, self.store.settled(*key) or Ack(ft.file_id, ACK_RECEIVING, [], None, NO_MANIFEST),
                       repeat=True)
            return
        pending = self._unacked.setdefault(key, [0, time.monotonic()])
        pending[0] += 1
        if pending[0] >= self.ack_every or header.seq == total - 1:
            self._ack_progress(key, doc)

    def _on_query(self, ft: FileTopic, payload: bytes) -> None:
        try:
            decode_json(payload, "query")
        except WireError as exc:
            log.warning("query with a malformed body answered anyway agent=%s file=%s reason=%s",
                        ft.agent_id, ft.file_id, exc)
        key = (ft.agent_id, ft.file_id)
        doc = self._manifest(key)
        if doc is not None:
            self._ack_progress(key, doc)
            return
        self._send(ft.agent_id, self.store.settled(*key) or Ack(ft.file_id, ACK_RECEIVING, [], None, NO_MANIFEST))

    # -- the chain stream ----------------------------------------------------------------------

    def _on_chain(self, agent: str, kind: str, payload: bytes) -> None:
        answer = self.chain.offer(agent, payload) if kind == "doc" else self.chain.query(agent, payload)
        if answer is None:
            return   # dropped and counted by the keeper
        self._chain_answers.append((agent, answer))
        if self._queue.empty() or len(self._chain_answers) >= CHAIN_GROUP_MAX:
            self._answer_chain()

    def _answer_chain(self) -> None:
        """The chain documents appended since the last answers made durable together (one flush for the
        group: the documents of a burst share it), then every answer sent."""
        if not self._chain_answers:
            return
        self.chain.store.sync()
        answers, self._chain_answers = self._chain_answers, []
        for agent, answer in answers:
            try:
                self.client.publish(f"{self.root}/{agent}/chain_acks", canonical_json(answer), qos=1)
            except OSError as exc:   # mid-reconnect: the agent queries again after its ack timeout
                log.info("chain ack not sent agent=%s: %s", agent, exc)

    def _publish_event(self, event: dict) -> None:
        """A platform event (`chain_fork`, `chain_rewind`) on `{root}/_platform/events`; also in the log."""
        try:
            self.client.publish(platform_events(self.root), canonical_json(event), qos=1)
        except OSError as exc:
            log.error("platform event not published type=%s agent=%s: %s", event["type"], event["agent_id"], exc)

    # -- acks ----------------------------------------------------------------------------------

    def _ack_progress(self, key: Key, doc: dict) -> None:
        """Ack this file after the next sync (the syncer thread sends it)."""
        self._unacked.pop(key, None)
        with self._due_cond:
            self._due[key] = doc
            self._due_cond.notify()

    def _sync_loop(self, heartbeat: Heartbeat) -> None:
        while True:
            heartbeat.beat()
            with self._due_cond:
                while not self._due and not self._stop.is_set():
                    self._due_cond.wait(0.5)
                    heartbeat.beat()
                if not self._due and self._stop.is_set():
                    return
                due, self._due = self._due, {}
            try:
                held = {key: self.store.have(*key) for key in due}   # before the sync: all of it durable after
                self.store.sync(due)
                for key, doc in due.items():
                    have = held[key]
                    if len(have) >= chunk_count(doc["size"], doc["chunk_size"]):
                        ack = self.store.progress(key[0], key[1], doc)   # every chunk is here: commit
                    else:
                        ack = self.store.settled(*key) or Ack(key[1], ACK_RECEIVING, to_ranges(have))
                    self._send(key[0], ack)
            except Exception:
                log.exception("acks not sent for %d file(s); they are asked again by the agents", len(due))

    def _sweep_loop(self, heartbeat: Heartbeat) -> None:
        """Expire abandoned transfers at start and every SWEEP_INTERVAL_S (or a tenth of the expiry age)."""
        interval = min(SWEEP_INTERVAL_S, self.expiry_s / 10)
        while True:
            try:
                for agent, file_id, idle_s in self.store.expire(self.expiry_s):
                    log.warning("event=incoming_expired agent=%s file=%s idle_days=%.1f: the transfer was "
                                "dropped; the agent sends the file again if it still has it", agent, file_id,
                                idle_s / 86400)
            except OSError as exc:
                log.error("expiry of abandoned transfers failed store=%s error=%s: check the store's disk",
                          self.store.root, exc)
            heartbeat.idle()   # nothing due until the next sweep
            if self._stop.wait(interval):
                return
            heartbeat.beat()

    def _flush_due(self) -> None:
        now = time.monotonic()
        for key, (_count, since) in list(self._unacked.items()):
            if now - since >= self.ack_interval_s:
                doc = self._manifest(key)
                if doc is None:
                    self._unacked.pop(key, None)
                else:
                    self._ack_progress(key, doc)

    def _refuse_chunk(self, ft: FileTopic, reason: str, doc: dict | None = None) -> None:
        """A malformed chunk changes nothing (G6): it is dropped and logged, the transfer keeps what it has,
        and the answer is `receiving` with the chunks held and the reason, so an honest agent resends the
        chunk. Only the whole file's SHA-256 against the signed manifest can reject a transfer."""
        key = (ft.agent_id, ft.file_id)
        self._log_limited("chunk_refused", ft.agent_id, "chunk refused agent=%s file=%s reason=%s", ft.agent_id,
                          ft.file_id, reason)
        doc = doc if doc is not None else self._manifest(key)
        settled = self.store.settled(*key)
        if settled is not None or doc is None:
            self._send(ft.agent_id, settled or Ack(ft.file_id, ACK_RECEIVING, [], None, NO_MANIFEST), repeat=True)
            return
        held = self.store.progress(ft.agent_id, ft.file_id, doc)
        self._send(ft.agent_id, Ack(ft.file_id, held.state, held.have, held.sha256, held.reason or reason),
                   repeat=True)

    def _refuse(self, ft: FileTopic, reason: str) -> None:
        """Answer a malformed or unacceptable manifest with `rejected` (a stored file keeps its `complete`)."""
        key = (ft.agent_id, ft.file_id)
        log.warning("rejected message agent=%s file=%s kind=%s reason=%s", ft.agent_id, ft.file_id, ft.kind, reason)
        stored = self.store.settled(*key) if self.store.stored(*key) is not None else None
        self._send(ft.agent_id, stored or Ack(ft.file_id, ACK_REJECTED, [], None, reason))

    def _log_limited(self, event: str, agent: str, message: str, *args: object) -> None:
        """A WARNING per message would let one agent fill the log and cost every other agent time: each
        (event, agent) is logged at most once per LOG_EVERY_S, with how many like it were left out."""
        now, key = time.monotonic(), (event, agent)
        with self._logged_lock:
            last, skipped = self._logged.get(key, (-LOG_EVERY_S, 0))
            if now - last < LOG_EVERY_S:
                self._logged[key] = (last, skipped + 1)
                self.warnings_left_out += 1
                return
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged[key] = (now, 0)
        log.warning(message + " (%d more like it in the last %.0f s not logged)", *args, skipped, LOG_EVERY_S)

    def _send(self, agent_id: str, ack: Ack, repeat: bool = False) -> None:
        """Publish an ack. With `repeat`, the same state for the same file goes out at most once a second
        (a stream of late chunks for a settled file gets one answer, not one each)."""
        if repeat:
            key, now = (agent_id, ack.file_id), time.monotonic()
            with self._repeats_lock:
                last = self._repeats.get(key)
                if last is not None and last[0] == ack.state and now - last[1] < 1.0:
                    return
                if len(self._repeats) > 10_000:
                    self._repeats.clear()
                self._repeats[key] = (ack.state, now)
        ack = self.receipts.attach(agent_id, ack)   # complete and rejected carry the signed receipt
        # The agent may send crc32 (docs/PROTOCOL.md 3), and keeps its chunks in flight within our share (4).
        ack = dataclasses.replace(ack, chunk_checks=CHUNK_CHECKS, max_queued=INBOUND_AGENT_MESSAGES,
                                  max_queued_bytes=self.max_queued_bytes)
        try:
            self.client.publish(f"{self.root}/{agent_id}/acks", ack.encode(), qos=1)
        except OSError as exc:   # mid-reconnect: the agent's query after its ack timeout gets a new answer
            log.info("ack not sent agent=%s file=%s: %s", agent_id, ack.file_id, exc)

    # -- the manifest cache --------------------------------------------------------------------

    def _manifest(self, key: Key) -> dict | None:
        """The verified manifest of a transfer in progress (cached), or None: never waits."""
        doc = self._manifests.get(key)
        if doc is None:
            doc = self.store.manifest(*key)
            if doc is not None:
                self._remember(key, doc)
        return doc

    def _remember(self, key: Key, doc: dict) -> None:
        self._manifests[key] = doc
        self._manifests.move_to_end(key)
        while len(self._manifests) > 4096:
            self._manifests.popitem(last=False)

    def _forget(self, key: Key) -> None:
        self._manifests.pop(key, None)
        self._unacked.pop(key, None)
