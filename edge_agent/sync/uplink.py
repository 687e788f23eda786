"""The uplink: sealed files to the platform over MQTT (DESIGN.md section 5), on one connection.

Public surface:
- `Uplink(catalog, layout, config, version=...)`, a daemon component (`start`, `stop`).
- `publish(suffix, payload, retain=False)`: thread-safe publish under `{root}/{agent}/`.
- `stats()`: connection and queue figures; `health()`: the `agent.sync` section of the health snapshot.
- `on_command(callback)`: receive decoded, authenticated command dicts from `{root}/{agent}/commands`.
- `sync_now()`: retry at once (reconnect without waiting out the backoff, re-query stalled files).

It composes, on one `protocol.connection.Connection`: `status.Presence` (status and will),
`commands.CommandGate` (authenticated commands), `outbox.OutboxRelay` (queued events),
`sender.Sender` (files in flight: window, reader pool, bandwidth cap; each file's protocol state is a
`transfer.Transfer`), `ledger.SyncLedger` (the catalog's side: what to send, verdicts) and
`sync_now.SyncNowWatch` (`edge-agent sync now` from another process).

Durability rests on the catalog and the receiver's acks, never on MQTT queues. Threads: the connection
supervisor (connect, paho's network loop, backoff with full jitter), the sender (everything but paho's
callbacks, which only queue what they got), and the sender's reader pool.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.catalog import SYNC_QUEUE, Catalog, FileRecord, State
from edge_agent.clock import iso_ms, now_ms
from edge_agent.config import AgentConfig
from edge_agent.layout import StoreLayout
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.connection import Connection, build_client
from edge_agent.protocol.heartbeat import Heartbeat, Vital
from edge_agent.protocol.wire import ACK_RECEIVING, Ack, Topics, WireError, decode_json
from edge_agent.sync.chain import ChainRelay
from edge_agent.sync.commands import CommandGate
from edge_agent.sync.incompatible import IncompatibleAcks
from edge_agent.sync.ledger import SyncLedger
from edge_agent.sync.outbox import OutboxRelay
from edge_agent.sync.receipts import ReceiptGate, restore_copies, seal_copies
from edge_agent.sync.sender import CHUNKS_IN_CLIENT, RateMeter, Sender, ack_timeout_s
from edge_agent.sync.status import Presence
from edge_agent.sync.sync_now import SyncNowWatch

log = logging.getLogger(__name__)

CommandCallback = Callable[[dict[str, Any]], None]
FILL_INTERVAL_S = 0.5     # how often the sync queue is read for files to start (sooner when a slot frees)
OUTBOX_INTERVAL_S = 0.5
META_INTERVAL_S = 1.0     # the rate sample and the `sync now` poll


class Uplink:
    """Chunked, acked, resumable transfer of sealed files; the MQTT connection of the agent."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, config: AgentConfig, *, version: str,
                 intake_busy: Callable[[], bool] | None = None):
        self.catalog = catalog
        self._intake_busy = intake_busy     # True while a dock bay is collecting (mqtt.yield_to_docks_*)
        self._held_since: float | None = None
        self.layout = layout
        self.config = config
        self.version = version
        self.topics = Topics(config.mqtt.root, config.agent.id)
        self.client = build_client(config.mqtt, config.agent.id)
        self.client.max_inflight_messages_set(CHUNKS_IN_CLIENT + 32)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.presence = Presence(self.client, self.topics, version)
        self.connection = Connection(self.client, config.mqtt, session_expiry_s=config.mqtt.session_expiry_s,
                                     on_up=self._on_up, on_down=self._wake, before_connect=self.presence.set_will)
        self._connected = self.connection.connected
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()      # the sender sleeps on it; acks and connects notify
        self._inbox: deque[tuple[str, Any]] = deque()
        self.receipts = ReceiptGate(catalog, layout, config.agent.id, config.mqtt.receiver_keys)
        self.ledger = SyncLedger(catalog, layout, self.receipts)
        self.sender = Sender(config.mqtt, self.topics, self._publish, connected=self._connected, stop=self._stop,
                             on_blocked=self._blocked)
        self.outbox = OutboxRelay(catalog.outbox, self.topics, self._publish)
        self.chain = ChainRelay(catalog, layout, self.topics, self._publish, keys=self.receipts.keys,
                                ack_timeout_s=ack_timeout_s(config.mqtt))
        self.chain_acks_dropped = 0
        self.command_gate = CommandGate(catalog, config.agent.id, config.mqtt.command_keys)
        self._callbacks: list[CommandCallback] = [self._resync_command]
        self._resync = threading.Event()
        self._fill_due = True
        self._rate = RateMeter()
        self.last_ack_ms: int | None = None
        self.max_ack_bytes = config.mqtt.max_ack_kib * 1024
        self.max_command_bytes = config.mqtt.max_command_kib * 1024
        self.incompatible = IncompatibleAcks(catalog, config.agent.id, config.mqtt.incompatible_acks)
        self.commands_dropped = 0
        self.heartbeat = Heartbeat("sync-sender")

    # -- public surface ------------------------------------------------------------------------

    def start(self) -> None:
        restore_copies(self.catalog, self.layout)   # receipts' copies a crash lost, before anything settles
        self.connection.start("sync-connection")
        self._start_sender()

    def _start_sender(self) -> None:
        self._thread = threading.Thread(target=self._send_loop, name="sync-sender", daemon=True)
        self._thread.start()

    def vitals(self) -> list[Vital]:
        """The uplink's supervised components: the MQTT connection (with paho's loop) and the sender."""
        def sender_alive() -> bool:
            return self._stop.is_set() or self._thread is None or self._thread.is_alive()

        def restart_sender() -> None:
            if not sender_alive():
                log.error("sync sender thread had died; starting it again")
                self._start_sender()
        return [self.connection.vital(), Vital("sync-sender", self.heartbeat, sender_alive, restart_sender)]

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sender.close()
        if self._thread is None or not self._thread.is_alive():   # nothing settles any more
            try:
                seal_copies(self.catalog, self.layout)
            except (OSError, sqlite3.OperationalError) as exc:   # a full disk: the next start checks them all
                log.error("receipt copies not sealed at stop: %s; the next start restores any that are lost", exc)
        self.connection.stop(last_will=self.presence.offline())

    def publish(self, suffix: str, payload: dict[str, Any] | bytes, retain: bool = False) -> bool:
        """Publish at QoS 1 on `{root}/{agent}/{suffix}`. False when not connected (nothing queued)."""
        if not self._connected.is_set():
            return False
        data = payload if isinstance(payload, bytes | bytearray) else canonical_json(payload)
        return self._publish(self.topics.agent(suffix), data, retain=retain) is not None

    def on_command(self, callback: CommandCallback) -> None:
        """Call `callback(command)` for every valid command; it runs on the network thread: be quick."""
        self._callbacks.append(callback)

    def sync_now(self) -> None:
        """Reconnect without waiting out the backoff, re-query stalled files, retry blocked ones."""
        self.connection.retry_now()
        self._resync.set()
        self._wake()

    def stats(self) -> dict[str, Any]:
        queue = self.catalog.files.backlog(SYNC_QUEUE)
        return {"connected": self._connected.is_set(), "last_ack_ms": self.last_ack_ms,
                "bytes_sent": self.sender.bytes_sent, "rate_bps": round(self._rate.rate_bps(), 1),
                "in_flight": len(self.sender.files), "queue_files": queue.files, "queue_bytes": queue.bytes,
                "acks_dropped": self.incompatible.dropped, "commands_dropped": self.commands_dropped,
                "callback_faults": self.connection.faults.total, "acks_unverified": self.receipts.unverified,
                "chain_acks_dropped": self.chain_acks_dropped, "chain_receipts_unverified": self.chain.unverified,
                "chain": self.chain.health()}

    def health(self) -> dict[str, Any]:
        """Its fragment of the health snapshot: `{"sync": the agent.sync section}` (schema `health`)."""
        stats = self.stats()
        return {"sync": {"connected": bool(stats["connected"]), "rate_bps": stats["rate_bps"],
                         "last_ack_ms": stats["last_ack_ms"], "last_ack": iso_ms(stats["last_ack_ms"]),
                         "bytes_sent": stats["bytes_sent"], "in_flight": stats["in_flight"], "configured": True,
                         "chain": stats["chain"]}}

    # -- the connection (paho's network thread: queue, never block) ----------------------------

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo | None:
        """QoS 1 publish; None if the connection is down (or went down under us: paho's wake-up socket)."""
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
        except OSError as exc:
            log.info("publish failed topic=%s: %s", topic, exc)
            return None
        return info if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def _on_up(self, client: mqtt.Client) -> None:
        client.subscribe([(self.topics.acks, 1), (self.topics.commands, 1), (self.topics.chain_acks, 1)])
        self.presence.online(client)
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _queue(self, kind: str, item: Any) -> None:
        with self._cond:
            self._inbox.append((kind, item))
            self._cond.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Route one inbound message. Whatever cannot be read is dropped and counted here; anything else
        that goes wrong is caught by the connection's guard (`protocol.connection.guarded`)."""
        if message.topic == self.topics.acks:
            self._on_ack(message.payload)
        elif message.topic == self.topics.commands:
            self._dispatch_command(message.payload)
        elif message.topic == self.topics.chain_acks:
            self._on_chain_ack(message.payload)

    def _on_chain_ack(self, payload: bytes) -> None:
        try:
            answer = decode_json(payload, "chain-ack", self.max_ack_bytes)
            if not isinstance(answer["seq"], int):   # JSON Schema counts 2.0 as an integer
                raise WireError(f"chain-ack: seq {answer['seq']!r} is not an integer")
        except WireError as exc:
            self.chain_acks_dropped += 1
            log.warning("chain ack dropped payload_bytes=%d dropped=%d: %s", len(payload), self.chain_acks_dropped,
                        exc)
            return
        self._queue("chain", answer)

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = Ack.from_json(decode_json(payload, "ack", self.max_ack_bytes))
        except WireError as exc:
            log.warning("ack dropped payload_bytes=%d: %s", len(payload), exc)
            self.incompatible.unusable(payload, str(exc), readable=len(payload) <= self.max_ack_bytes)
            return
        self._queue("ack", ack)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        # paho calls this holding its message lock, which publish() takes too: the sender thread, not this
        # one, maps the mid to its outbox row. Notifying also lets the sender hand paho the next chunk.
        self._queue("puback", mid)

    def _dispatch_command(self, payload: bytes) -> None:
        try:
            command = decode_json(payload, "command", self.max_command_bytes)
        except WireError as exc:
            self.commands_dropped += 1
            log.warning("command dropped payload_bytes=%d dropped=%d: %s", len(payload), self.commands_dropped, exc)
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

    # -- the sender thread ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        sync_now = SyncNowWatch(self.catalog)
        session, next_fill, next_outbox, next_meta = 0, 0.0, 0.0, 0.0
        while not self._stop.is_set():
            self.heartbeat.beat()
            try:
                self._drain_inbox()
                self.incompatible.raise_pending()
                now = time.monotonic()
                if now >= next_meta:
                    next_meta = now + META_INTERVAL_S
                    self._rate.sample(now, self.sender.bytes_sent)
                    if sync_now.requested():
                        self.sync_now()
                if not self._connected.is_set():
                    with self._cond:
                        self._cond.wait(0.5)
                    continue
                if self.connection.generation != session:
                    session = self.connection.generation
                    self.outbox.reset()
                    self.chain.reset()
                    self.sender.reconnected()
                if self._resync.is_set():
                    self._resynchronise()
                if (now >= next_fill or self._fill_due) and self.sender.free_slots() > 0:
                    next_fill, self._fill_due = now + FILL_INTERVAL_S, False
                    self._fill()
                if now >= next_outbox:
                    next_outbox = now + OUTBOX_INTERVAL_S
                    self.outbox.relay()
                self.chain.relay(now)
                self._send(now)
            except Exception:
                # The sender must outlive any one bad file or database hiccup; the catalog is the truth.
                log.exception("sync sender error; continuing")
                self._stop.wait(1.0)

    def _yielding(self, now: float) -> bool:
        """True while the uplink yields to the docks: a bay is collecting, for at most yield_to_docks_s at a
        stretch. Its chunks then go at most at yield_to_docks_kbps, or wait when that is 0."""
        mqtt_cfg = self.config.mqtt
        limit = mqtt_cfg.yield_to_docks_s
        if self._intake_busy is None or not limit or not self._intake_busy():
            self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = now
            log.info("uplink yields to the docks while a bay is collecting (%s, at most %ss)",
                     f"at most {mqtt_cfg.yield_to_docks_kbps} kbit/s" if mqtt_cfg.yield_to_docks_kbps
                     else "chunks held", limit)
        return now - self._held_since < limit

    def _send(self, now: float) -> None:
        self.sender.check_timeouts(now)
        yielding = self._yielding(now)
        holding = yielding and not self.config.mqtt.yield_to_docks_kbps
        # Yielding, one chunk a turn: the cap's wait comes between turns' acks, not after eight chunks.
        if holding or not self.sender.send_some(1 if yielding else 8, yielding=yielding):
            with self._cond:
                if not self._inbox:
                    self._cond.wait(0.1)

    def _resynchronise(self) -> None:
        self._resync.clear()
        self.ledger.forgive()
        self.chain.reset()
        self._fill_due = True
        self.sender.resync()

    def _fill(self) -> None:
        """Take the next files in lane order until `files_in_flight` are on their way."""
        for record in self.ledger.next_files(self.sender.free_slots(), set(self.sender.files)):
            outgoing = self.ledger.open(record)
            if outgoing is None:
                continue
            if record.state == State.SEALED and not self.ledger.claim(record):
                outgoing.close()
                self._fill_due = True
                continue
            # `sending` before this process started: ask what the receiver already has.
            self.sender.add(outgoing, resumed=record.state != State.SEALED)

    def _blocked(self, record: FileRecord, why: str) -> None:
        self.ledger.blocked(record, why)
        self._fill_due = True   # a slot is free: take the next file now, not at the next poll

    def _drain_inbox(self) -> None:
        while True:
            with self._cond:
                if not self._inbox:
                    return
                kind, item = self._inbox.popleft()
            if kind == "ack":
                self._handle_ack(item)
            elif kind == "chain":
                self.chain.answer(item)
            else:
                self.outbox.published(item)

    def _handle_ack(self, ack: Ack) -> None:
        self.last_ack_ms = now_ms()
        self.incompatible.usable(ack.file_id)
        self.sender.heard(ack)
        if ack.state == ACK_RECEIVING:
            self.sender.receiving(ack)
            return
        record = self.ledger.sending(ack.file_id)
        checked = None if record is None else self.receipts.judge(record, ack)
        if record is not None and checked is None:
            return   # its receipt proves nothing: nothing changes, the transfer goes on
        outgoing = self.sender.drop(ack.file_id)
        if outgoing is not None:
            self._fill_due = True
        if checked is None:
            return   # a repeated ack for a file already settled, or not ours
        actions = outgoing.transfer.settled(ack, checked) if outgoing is not None else [checked]
        for action in actions:
            self.ledger.settle(record, action)
