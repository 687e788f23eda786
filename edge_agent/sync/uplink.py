"""The uplink: sealed files to the platform over MQTT (DESIGN.md section 5).

Public surface:
- `Uplink(catalog, layout, config, version=...)`, a daemon component (`start`, `stop`).
- `publish(suffix, payload, retain=False)`: thread-safe publish under `{root}/{agent}/`.
- `stats()`: connection and queue figures for the health snapshot.
- `on_command(callback)`: receive decoded command dicts from `{root}/{agent}/commands`.
- `sync_now()`: retry at once (reconnect without waiting out the backoff, re-query stalled files).

Durability rests on the catalog and the receiver's acks, never on MQTT queues:
a file becomes `synced` only on a `complete` ack whose SHA-256 equals the
catalog's; everything else is resent after a `query` tells what the receiver
lacks. Three threads: the connection supervisor (connect, paho's network loop,
backoff with full jitter), the sender, and a reader that reads, hashes and
frames the next few chunks the sender will want (from the store on demand, so
memory stays flat whatever the file size or the queue length).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.catalog import Catalog, FileRecord, State, TransitionError, UnknownFile
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.layout import StoreLayout
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.connection import Connection, build_client
from edge_agent.protocol.pacing import TokenBucket
from edge_agent.protocol.wire import (
    ACK_COMPLETE,
    ACK_RECEIVING,
    ACK_REJECTED,
    ChunkHeader,
    RangeSet,
    Topics,
    WireError,
    chunk_count,
    chunk_span,
    decode_json,
    encode_chunk,
)
from edge_agent.sync.commands import CommandGate

log = logging.getLogger(__name__)

CommandCallback = Callable[[dict[str, Any]], None]
SYNC_NOW_META = "sync_now_ms"   # set by `edge-agent sync now`; the running daemon polls it
# Chunks handed to paho and not yet PUBACKed by the broker: paho keeps each in memory until then, so this (not
# the window, which counts chunks the receiver has not acked) is what bounds the agent's memory.
CHUNKS_IN_CLIENT = 32
READ_AHEAD_CHUNKS = 8   # the kernel reads this far ahead of the chunk being sent (posix_fadvise WILLNEED)
PREPARE_AHEAD = 16      # chunks the reader thread reads, hashes and frames before the sender asks for them


def prepare_chunk(path: Path, seq: int, size: int, chunk_size: int) -> bytes | None:
    """Chunk `seq` of the stored file at `path` as a frame, or None if the file is shorter than its manifest says.
    Opens the file itself, so a chunk prepared for a transfer that ended meanwhile reads nothing else."""
    offset, length = chunk_span(seq, size, chunk_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        return None
    return encode_chunk(ChunkHeader(seq, offset, length, hashlib.sha256(data).hexdigest()), data)


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    """True once paho is done with a published message: PUBACKed, or failed for good (the query finds it missing)."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True


@dataclass
class Transfer:
    """One file on its way: what the receiver has, what is out, where the next chunk comes from."""

    record: FileRecord
    manifest: bytes
    size: int
    sha256: str
    chunk_size: int
    fd: int
    total: int
    have: RangeSet = field(default_factory=RangeSet)
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> when sent (monotonic)
    cursor: int = 0
    querying: bool = False       # waiting for the answer to a query before sending more
    last_heard: float = 0.0      # last ack, or when we last (re)started talking
    last_resync: float = 0.0
    path: Path = Path()          # the stored copy

    @property
    def file_id(self) -> str:
        return self.record.file_id

    def next_seq(self) -> int | None:
        """The next chunk to send: the first from the cursor that the receiver lacks and is not out."""
        while self.cursor < self.total and (self.cursor in self.have or self.cursor in self.outstanding):
            self.cursor += 1
        return self.cursor if self.cursor < self.total else None


class Uplink:
    """Chunked, acked, resumable transfer of sealed files; the MQTT connection of the agent."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, config: AgentConfig, *, version: str):
        self.catalog = catalog
        self.layout = layout
        self.config = config
        self.mqtt_cfg = config.mqtt
        self.version = version
        self.topics = Topics(config.mqtt.root, config.agent.id)
        self.window = config.mqtt.window
        self.files_in_flight = config.mqtt.files_in_flight
        kbps = config.mqtt.bandwidth_kbps
        chunk_bytes = config.mqtt.chunk_kib * 1024
        self.bucket = TokenBucket(kbps * 1000 / 8, burst=chunk_bytes + 4096) if kbps else None
        # Under a cap a full window takes a while to drain; that is not a lost ack.
        self.ack_timeout_s = config.mqtt.ack_timeout_s + (
            self.window * chunk_bytes / (kbps * 1000 / 8) if kbps else 0.0)
        self.client = build_client(config.mqtt, config.agent.id)
        self.client.max_inflight_messages_set(CHUNKS_IN_CLIENT + 32)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.connection = Connection(self.client, config.mqtt, session_expiry_s=config.mqtt.session_expiry_s,
                                     on_up=self._on_up, on_down=self._wake, before_connect=self._set_will)
        self._connected = self.connection.connected
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self._cond = threading.Condition()      # the sender sleeps on it; acks and connects notify
        self._inbox: deque[tuple[str, Any]] = deque()
        self._transfers: dict[str, Transfer] = {}
        self._skipped: set[str] = set()         # files this process cannot send (alarm raised)
        self._outbox_mids: dict[int, int] = {}  # paho mid -> outbox row id
        self._outbox_lock = threading.Lock()
        self._outbox_out: set[int] = set()
        self._in_client: deque[mqtt.MQTTMessageInfo] = deque()   # chunks paho holds (not yet PUBACKed)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-reader")
        self._prepared: dict[tuple[str, int], Future] = {}       # (file id, seq) -> its frame, being read
        self._callbacks: list[CommandCallback] = [self._resync_command]
        self.command_gate = CommandGate(catalog, config.agent.id, config.mqtt.command_keys)
        self._resync = threading.Event()
        self._fill_due = True
        self.bytes_sent = 0
        self.last_ack_ms: int | None = None
        self._rate_samples: deque[tuple[float, int]] = deque(maxlen=11)

    # -- public surface ------------------------------------------------------------------------

    def start(self) -> None:
        self.connection.start("sync-connection")
        self._sender = threading.Thread(target=self._send_loop, name="sync-sender", daemon=True)
        self._sender.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._sender is not None:
            self._sender.join(timeout=10)
        self._prepared.clear()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self.connection.stop(last_will=(self.topics.status, self._status("offline")))
        for transfer in self._transfers.values():
            os.close(transfer.fd)
        self._transfers.clear()

    def publish(self, suffix: str, payload: dict[str, Any] | bytes, retain: bool = False) -> bool:
        """Publish at QoS 1 on `{root}/{agent}/{suffix}`. False when not connected (nothing queued)."""
        if not self._connected.is_set():
            return False
        data = payload if isinstance(payload, bytes | bytearray) else canonical_json(payload)
        return self._publish(self.topics.agent(suffix), data, retain=retain) is not None

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """QoS 1 publish; None if the connection is down (or went down under us: paho's wake-up socket)."""
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
        except OSError as exc:
            log.info("publish failed topic=%s: %s", topic, exc)
            return None
        return info if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def on_command(self, callback: CommandCallback) -> None:
        """Call `callback(command)` for every valid command; it runs on the network thread: be quick."""
        self._callbacks.append(callback)

    def sync_now(self) -> None:
        """Reconnect without waiting out the backoff, re-query stalled files, retry blocked ones."""
        self.connection.retry_now()
        self._resync.set()
        self._wake()

    def stats(self) -> dict[str, Any]:
        files, size = self.catalog.query(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE state IN ('sealed', 'sending')")[0]
        samples = list(self._rate_samples)
        rate = 0.0
        if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
            rate = (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
        return {"connected": self._connected.is_set(), "last_ack_ms": self.last_ack_ms,
                "bytes_sent": self.bytes_sent, "rate_bps": round(rate, 1), "in_flight": len(self._transfers),
                "queue_files": int(files), "queue_bytes": int(size)}

    # -- connection ----------------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        return canonical_json({"state": state, "ts": now_ms(), "version": self.version})

    def _set_will(self) -> None:
        self.client.will_set(self.topics.status, self._status("offline"), qos=1, retain=True)

    def _on_up(self, client: mqtt.Client) -> None:
        client.subscribe([(self.topics.acks, 1), (self.topics.commands, 1)])
        client.publish(self.topics.status, self._status("online"), qos=1, retain=True)
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.acks:
            try:
                ack = decode_json(message.payload, "ack")
            except WireError as exc:
                log.warning("ack ignored: %s", exc)
                return
            with self._cond:
                self._inbox.append(("ack", ack))
                self._cond.notify_all()
        elif message.topic == self.topics.commands:
            self._dispatch_command(message.payload)

    def _dispatch_command(self, payload: bytes) -> None:
        try:
            command = decode_json(payload, "command")
        except WireError as exc:
            log.warning("command ignored: %s", exc)
            return
        if not self.command_gate.admit(command):
            return
        log.info("command cmd=%s id=%s", command["cmd"], command["id"])
        for callback in list(self._callbacks):
            try:
                callback(command)
            except Exception:
                log.exception("command callback failed cmd=%s id=%s", command["cmd"], command["id"])

    def _resync_command(self, command: dict[str, Any]) -> None:
        if command["cmd"] == "resync":
            self.sync_now()

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        # paho calls this holding its message lock, which publish() takes too: taking _outbox_lock here (held by
        # the sender around publish) deadlocked the two threads. The sender maps the mid to its outbox row.
        with self._cond:
            self._inbox.append(("puback", mid))
            self._cond.notify_all()   # a chunk PUBACKed may let the sender hand paho the next one

    # -- the sender ----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        seen_session, next_fill, next_outbox, next_meta = 0, 0.0, 0.0, 0.0
        sync_now_seen = self.catalog.meta_get(SYNC_NOW_META)
        while not self._stop.is_set():
            try:
                self._drain_inbox()
                now = time.monotonic()
                if now >= next_meta:
                    next_meta = now + 1.0
                    self._rate_samples.append((now, self.bytes_sent))
                    requested = self.catalog.meta_get(SYNC_NOW_META)
                    if requested != sync_now_seen:
                        sync_now_seen = requested
                        log.info("sync now requested at %s", requested)
                        self.sync_now()
                if not self._connected.is_set():
                    with self._cond:
                        self._cond.wait(0.5)
                    continue
                if self.connection.generation != seen_session:
                    seen_session = self.connection.generation
                    self._outbox_out.clear()
                    self._in_client.clear()   # what the old connection did not deliver, the query finds missing
                    for transfer in self._transfers.values():
                        self._resume(transfer)
                if self._resync.is_set():
                    self._resync.clear()
                    self._skipped.clear()
                    self._fill_due = True
                    for transfer in self._transfers.values():
                        if transfer.querying or not transfer.outstanding:
                            self._resume(transfer)
                if (now >= next_fill or self._fill_due) and len(self._transfers) < self.files_in_flight:
                    next_fill, self._fill_due = now + 0.5, False
                    self._fill()
                if now >= next_outbox:
                    next_outbox = now + 0.5
                    self._drain_outbox()
                self._check_timeouts(now)
                if not self._send_some():
                    with self._cond:
                        if not self._inbox:
                            self._cond.wait(0.1)
            except Exception:
                # The sender must outlive any one bad file or database hiccup; the catalog is the truth.
                log.exception("sync sender error; continuing")
                self._stop.wait(1.0)

    def _fill(self) -> None:
        """Take the next files in lane order until `files_in_flight` are on their way."""
        exclude = set(self._transfers) | self._skipped
        for record in self.catalog.next_to_send(self.files_in_flight - len(self._transfers), exclude=exclude):
            transfer = self._open(record)
            if transfer is None:
                continue
            self._transfers[record.file_id] = transfer
            if record.state == State.SEALED:
                try:
                    self.catalog.transition(record.file_id, State.SENDING, expect=State.SEALED, actor="edge-agent",
                                            attempts=record.attempts + 1)
                except (TransitionError, UnknownFile) as exc:
                    log.warning("file=%s not sent: %s", record.file_id, exc)
                    self._drop(transfer)
                    continue
                self._announce(transfer, query=False)
            else:  # `sending` before this process started: ask what the receiver already has
                self._resume(transfer)

    def _open(self, record: FileRecord) -> Transfer | None:
        try:
            manifest = self.layout.manifest_path(record.file_id).read_bytes()
            doc = json.loads(manifest)
            size, sha256, chunk_size = int(doc["size"]), str(doc["sha256"]), int(doc["chunk_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._cannot_send(record, f"its manifest cannot be read ({exc}); run: edge-agent verify {record.file_id}")
            return None
        if (size, sha256) != (record.size, record.sha256):
            self._cannot_send(record, "its manifest does not match the catalog (size or SHA-256); "
                                      f"run: edge-agent verify {record.file_id}")
            return None
        path = self.layout.data_dir / (record.store_path or "")
        try:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as exc:
            self._cannot_send(record, f"its stored copy cannot be opened ({exc.strerror}); "
                                      f"run: edge-agent verify {record.file_id}")
            return None
        return Transfer(record, manifest, size, sha256, chunk_size, fd, chunk_count(size, chunk_size),
                        last_heard=time.monotonic(), path=path)

    def _cannot_send(self, record: FileRecord, why: str) -> None:
        self._skipped.add(record.file_id)
        log.error("file=%s cannot be sent: %s", record.file_id, why)
        self.catalog.raise_alarm(f"sync_blocked:{record.file_id}", "sync_blocked", record.file_id,
                                 f"file {record.file_id} ({record.original_path}) cannot be sent: {why}")

    def _drop(self, transfer: Transfer) -> None:
        self._transfers.pop(transfer.file_id, None)
        for key in [key for key in self._prepared if key[0] == transfer.file_id]:
            self._prepared.pop(key).cancel()
        os.close(transfer.fd)
        self._fill_due = True   # a slot is free: take the next file now, not at the next poll

    def _announce(self, transfer: Transfer, *, query: bool) -> None:
        """Publish the manifest (idempotent at the receiver), and a query when resuming."""
        self._publish_file(transfer, "manifest", transfer.manifest)
        transfer.last_heard = transfer.last_resync = time.monotonic()
        transfer.querying = query
        if query:
            self._publish_file(transfer, "query", b"{}")

    def _resume(self, transfer: Transfer) -> None:
        transfer.outstanding.clear()
        transfer.cursor = 0
        self._announce(transfer, query=True)

    def _publish_file(self, transfer: Transfer, kind: str, payload: bytes) -> bool:
        if self._publish(self.topics.file(transfer.file_id, kind), payload) is None:
            return False
        self.bytes_sent += len(payload)
        return True

    def _check_timeouts(self, now: float) -> None:
        for transfer in list(self._transfers.values()):
            if now - transfer.last_heard < self.ack_timeout_s:
                continue
            waiting = transfer.querying or transfer.outstanding or transfer.next_seq() is None
            if waiting:
                log.info("file=%s no ack for %.0fs; querying the receiver", transfer.file_id, self.ack_timeout_s)
                self._resume(transfer)

    def _send_some(self, budget: int = 8) -> bool:
        """Send up to `budget` chunks within the window, highest lane first. True if any went out."""
        sent = 0
        while sent < budget and self._connected.is_set() and not self._stop.is_set():
            if sum(len(t.outstanding) for t in self._transfers.values()) >= self.window:
                break
            while self._in_client and _settled(self._in_client[0]):
                self._in_client.popleft()
            if len(self._in_client) >= CHUNKS_IN_CLIENT:
                break
            transfer = next((t for t in self._transfers.values()
                             if not t.querying and t.next_seq() is not None), None)
            if transfer is None:
                break
            if not self._send_chunk(transfer, transfer.cursor):
                break
            sent += 1
        return sent > 0

    def _prepare(self, transfer: Transfer, seq: int) -> Future:
        return self._reader.submit(prepare_chunk, transfer.path, seq, transfer.size, transfer.chunk_size)

    def _prepare_ahead(self, transfer: Transfer, after: int) -> None:
        """Have the reader work on the chunks this transfer will send after `after` (as things stand now)."""
        wanted, seq = [], after + 1
        while seq < transfer.total and len(wanted) < PREPARE_AHEAD:
            if seq not in transfer.have and seq not in transfer.outstanding:
                wanted.append(seq)
            seq += 1
        for key in [key for key in self._prepared if key[0] == transfer.file_id and key[1] not in wanted]:
            self._prepared.pop(key).cancel()   # plans changed (an ack, a resend): not needed after all
        for seq in wanted:
            if (transfer.file_id, seq) not in self._prepared:
                self._prepared[(transfer.file_id, seq)] = self._prepare(transfer, seq)

    def _send_chunk(self, transfer: Transfer, seq: int) -> bool:
        offset = seq * transfer.chunk_size
        ahead = offset + READ_AHEAD_CHUNKS * transfer.chunk_size
        if ahead < transfer.size:
            os.posix_fadvise(transfer.fd, ahead, transfer.chunk_size, os.POSIX_FADV_WILLNEED)
        frame = self._prepared.pop((transfer.file_id, seq), None) or self._prepare(transfer, seq)
        self._prepare_ahead(transfer, seq)
        try:
            payload = frame.result()
        except OSError as exc:
            self._cannot_send(transfer.record, f"its stored copy cannot be read ({exc.strerror}); "
                                               f"run: edge-agent verify {transfer.file_id}")
            self._drop(transfer)
            return False
        if payload is None:
            self._cannot_send(transfer.record, f"its stored copy is shorter than its manifest says ({transfer.size} "
                                               f"bytes): the store is damaged; run: edge-agent verify")
            self._drop(transfer)
            return False
        if self.bucket is not None and not self.bucket.consume(len(payload), self._stop):
            return False
        if not transfer.outstanding:
            transfer.last_heard = time.monotonic()   # the ack clock starts with the first chunk out
        info = self._publish(self.topics.file(transfer.file_id, "chunk"), payload)
        if info is None:
            return False
        self.bytes_sent += len(payload)
        self._in_client.append(info)
        transfer.outstanding[seq] = time.monotonic()
        return True

    # -- acks and the outbox -------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            with self._cond:
                if not self._inbox:
                    return
                kind, item = self._inbox.popleft()
            if kind == "ack":
                self._handle_ack(item)
            else:
                with self._outbox_lock:
                    row_id = self._outbox_mids.pop(item, None)
                if row_id is not None:
                    self._outbox_sent(row_id)

    def _handle_ack(self, ack: dict[str, Any]) -> None:
        self.last_ack_ms = now_ms()
        file_id, state = ack["file_id"], ack["state"]
        transfer = self._transfers.get(file_id)
        if state == ACK_RECEIVING:
            if transfer is None:
                return
            transfer.have = RangeSet(ack["have"])
            transfer.outstanding = {s: t for s, t in transfer.outstanding.items() if s not in transfer.have}
            now = transfer.last_heard = time.monotonic()
            if ack["reason"]:
                # The receiver could not use something (a chunk before its manifest): send the manifest
                # again, then everything `have` lacks. At most once a second, however many such acks come.
                if now - transfer.last_resync > 1.0:
                    log.info("file=%s receiver: %s; resending manifest and what it lacks", file_id, ack["reason"])
                    self._announce(transfer, query=False)
                    transfer.cursor = 0
                    transfer.outstanding.clear()
            elif transfer.querying:   # the answer to a query: resend exactly what it lacks
                transfer.querying = False
                transfer.cursor = 0
                transfer.outstanding.clear()
            return
        if transfer is not None:
            self._drop(transfer)
        try:
            record = self.catalog.get(file_id)
        except UnknownFile:
            log.warning("ack for a file this agent does not have: %s", file_id)
            return
        if record.state != State.SENDING:
            return   # a repeated ack for a file already settled
        if state == ACK_COMPLETE and ack["sha256"] == record.sha256:
            self.catalog.transition(file_id, State.SYNCED, expect=State.SENDING, actor="edge-agent",
                                    reason="receiver confirmed a matching SHA-256", synced_ms=now_ms(),
                                    last_error=None, audit_detail={"sha256": ack["sha256"]})
            log.info("synced file=%s size=%s", file_id, record.size)
            return
        if state == ACK_COMPLETE:
            reason = f"receiver confirmed SHA-256 {ack['sha256']}, but the manifest says {record.sha256}"
        else:
            reason = str(ack["reason"])
        assert state in (ACK_COMPLETE, ACK_REJECTED)
        self.catalog.transition(file_id, State.REJECTED, expect=State.SENDING, actor="edge-agent",
                                reason=f"receiver rejected: {reason}", last_error=reason[:1000])
        self.catalog.raise_alarm(
            f"sync_rejected:{file_id}", "sync_rejected", file_id,
            f"the platform rejected file {file_id} ({record.original_path} from {record.device_id}): {reason}. "
            "Nothing was deleted; check it with: edge-agent verify " + file_id
            + "; retry with: edge-agent sync now --retry-rejected")
        log.error("rejected file=%s reason=%s", file_id, reason)

    def _drain_outbox(self) -> None:
        rows = self.catalog.query("SELECT id, topic, payload FROM outbox WHERE sent_ms IS NULL ORDER BY id LIMIT 100")
        for row in rows:
            if row["id"] in self._outbox_out:
                continue
            with self._outbox_lock:
                info = self._publish(self.topics.agent(row["topic"]), row["payload"].encode("utf-8"))
                if info is None:
                    return
                self._outbox_mids[info.mid] = row["id"]
            self._outbox_out.add(row["id"])

    def _outbox_sent(self, row_id: int) -> None:
        self._outbox_out.discard(row_id)
        with self.catalog.transaction() as conn:
            conn.execute("UPDATE outbox SET sent_ms = ? WHERE id = ?", (now_ms(), row_id))
