"""The sender: the files in flight on the wire, within the window and the bandwidth cap.

`Sender` runs on the uplink's sender thread only (no locks of its own). It holds the open files
(`Outgoing`: the catalog record, the manifest bytes, the stored copy's descriptor and its `Transfer`
state machine), executes the machine's wire actions (manifest, query), and pulls chunks in order:

- the window: at most `mqtt.window` chunks unacknowledged by the receiver across all files, and no more than the
  receiver queues of this agent's messages (`max_queued`, `max_queued_bytes` in its acks; receivers before those
  fields: `LEGACY_MAX_QUEUED*`; `FIRST_WINDOW` until the first ack): a receiver drops what goes beyond, and a
  dropped chunk waits for the ack timeout;
- paho's own queue: at most `CHUNKS_IN_CLIENT` chunks handed to paho and not yet PUBACKed by the broker
  (paho keeps each in memory until then, so this, not the window, bounds the agent's memory);
- the bandwidth cap (`mqtt.bandwidth_kbps`, a `TokenBucket`), and while the uplink yields to the docks
  (a bay collecting) the lower cap `mqtt.yield_to_docks_kbps`, a second bucket;
- the reader pool: one thread that reads, checks (CRC-32 or SHA-256) and frames the next `PREPARE_AHEAD` chunks
  the sender will want, from the store on demand, so memory stays flat whatever the file size or queue length.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_agent.atrest import AtRest, AtRestError, is_encrypted
from edge_agent.catalog import FileRecord
from edge_agent.config import MqttSection
from edge_agent.protocol.pacing import TokenBucket
from edge_agent.protocol.wire import (
    CHECK_CRC32,
    CHECK_SHA256,
    HEADER_LENGTH,
    LEGACY_MAX_QUEUED,
    LEGACY_MAX_QUEUED_BYTES,
    MAX_HEADER_BYTES,
    Ack,
    ChunkHeader,
    Topics,
    check_of,
    chunk_frame,
    chunk_span,
    encode_chunk,
)
from edge_agent.sync.transfer import Action, SendManifest, SendQuery, Transfer

log = logging.getLogger(__name__)

CHUNKS_IN_CLIENT = 32
READ_AHEAD_CHUNKS = 8   # the kernel reads this far ahead of the chunk being sent (posix_fadvise WILLNEED)
PREPARE_AHEAD = 16      # chunks the reader thread reads, hashes and frames before the sender asks for them
# Of the receiver's share of this agent's messages, what the chunks leave for the rest (manifests, queries, the chain
# documents): messages, and chunk frames' worth of bytes.
QUEUE_RESERVE_MESSAGES = 32
QUEUE_RESERVE_FRAMES = 1
# Chunks in flight before any ack said what the receiver queues: little enough for any receiver's share.
FIRST_WINDOW = 16

# QoS 1 publish of (topic, payload): paho's message info, or None when the connection is down.
Publish = Callable[[str, bytes], "mqtt.MQTTMessageInfo | None"]
# A file this process cannot send (its stored copy is unreadable or short): why, for a person.
Blocked = Callable[[FileRecord, str], None]


def prepare_chunk(path: Path, seq: int, size: int, chunk_size: int, at_rest: AtRest | None = None,
                  file_id: str = "", check: str = CHECK_SHA256) -> bytes | bytearray | None:
    """Chunk `seq` of the stored file at `path` as a frame, or None if the file is shorter than its manifest says;
    its header carries `check` (crc32 only for a receiver that announced it, `Sender.chunk_check`).
    Opens the file itself, so a chunk prepared for a transfer that ended meanwhile reads nothing else. An
    encrypted copy (`file_id`'s, edge_agent/atrest.py) is decrypted here, only the blocks the chunk spans: the
    receiver gets plaintext; a block that fails its tag raises `AtRestError`."""
    offset, length = chunk_span(seq, size, chunk_size)
    if is_encrypted(path):
        with (at_rest or AtRest()).reader(path, file_id) as reader:
            data = reader.pread(length, offset)
        if len(data) != length:
            return None
        return encode_chunk(ChunkHeader(seq, offset, length, check_of(data, check)), data)
    fd = os.open(path, os.O_RDONLY)
    try:
        # Read straight into the frame (chunk_frame): no second copy of the chunk's bytes to put the header first.
        return chunk_frame(seq, offset, length, lambda view: _read_into(fd, view, offset), check)
    finally:
        os.close(fd)


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `fd` at `offset`; how many bytes there were (fewer than asked only at the end of the file)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _settled(info: mqtt.MQTTMessageInfo) -> bool:
    """True once paho is done with a published message: PUBACKed, or failed for good (the query finds it missing)."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return True


def ack_timeout_s(mqtt_cfg: MqttSection) -> float:
    """How long silence means a lost ack. Under a cap the chunks paho holds take a while to cross the slow link;
    that is not one. Only those: a chunk the broker has PUBACKed is past the capped link, so the window beyond
    paho's queue (256 chunks by default, 128 MiB: over four minutes at 4 Mbit/s) adds nothing to wait for."""
    kbps = mqtt_cfg.bandwidth_kbps
    held = min(mqtt_cfg.window, CHUNKS_IN_CLIENT) * mqtt_cfg.chunk_kib * 1024
    return mqtt_cfg.ack_timeout_s + (held / (kbps * 1000 / 8) if kbps else 0.0)


@dataclass
class Outgoing:
    """One file in flight: its protocol state and where its bytes come from."""

    record: FileRecord
    manifest: bytes
    path: Path          # the stored copy
    fd: int             # open on `path` for the kernel's read-ahead
    transfer: Transfer
    at_rest: AtRest | None = None   # the key of an encrypted stored copy

    @property
    def file_id(self) -> str:
        return self.record.file_id

    def close(self) -> None:
        os.close(self.fd)


class RateMeter:
    """The send rate over the last ten one-second samples of a byte counter."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=11)

    def sample(self, now: float, total_bytes: int) -> None:
        self._samples.append((now, total_bytes))

    def rate_bps(self) -> float:
        samples = list(self._samples)
        if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
            return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
        return 0.0


class Sender:
    """The files in flight and their chunks on the wire (see the module docstring)."""

    def __init__(self, mqtt_cfg: MqttSection, topics: Topics, publish: Publish, *, connected: threading.Event,
                 stop: threading.Event, on_blocked: Blocked):
        self.topics = topics
        self.window = mqtt_cfg.window   # as configured; `room` keeps within `window_now`
        self._frame_bytes = mqtt_cfg.chunk_kib * 1024 + HEADER_LENGTH.size + MAX_HEADER_BYTES
        self._share = min(self.window, FIRST_WINDOW)   # what the receiver's share allows (`heard`); until an ack
        self._after_loss: int | None = None   # the window since chunks were lost, growing back by one per ack
        self.files_in_flight = mqtt_cfg.files_in_flight
        chunk_bytes = mqtt_cfg.chunk_kib * 1024
        kbps = mqtt_cfg.bandwidth_kbps
        self.bucket = TokenBucket(kbps * 1000 / 8, burst=chunk_bytes + 4096) if kbps else None
        yield_kbps = mqtt_cfg.yield_to_docks_kbps
        self.yield_bucket = TokenBucket(yield_kbps * 1000 / 8, burst=chunk_bytes + 4096) if yield_kbps else None
        self.ack_timeout_s = ack_timeout_s(mqtt_cfg)
        self._publish = publish
        self._connected = connected
        self._stop = stop
        self._on_blocked = on_blocked
        self.files: dict[str, Outgoing] = {}
        self.bytes_sent = 0
        self._in_client: deque[mqtt.MQTTMessageInfo] = deque()   # chunks paho holds (not yet PUBACKed)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-reader")
        self._prepared: dict[tuple[str, int], Future] = {}       # (file id, seq) -> its frame, being read
        # The check in the chunks' headers: crc32 once an ack said the receiver takes it (`heard`), else sha256.
        self.chunk_check = CHECK_SHA256

    # -- the files in flight ---------------------------------------------------------------------

    def free_slots(self) -> int:
        return self.files_in_flight - len(self.files)

    def add(self, outgoing: Outgoing, *, resumed: bool) -> None:
        """Start `outgoing`: manifest (and a query when `resumed`: it was `sending` before this process)."""
        self.files[outgoing.file_id] = outgoing
        self._execute(outgoing, outgoing.transfer.start(resumed=resumed, now=time.monotonic()))

    def drop(self, file_id: str) -> Outgoing | None:
        """Forget a file (settled or unsendable): its prepared chunks are cancelled, its descriptor closed."""
        outgoing = self.files.pop(file_id, None)
        if outgoing is None:
            return None
        for key in [key for key in self._prepared if key[0] == file_id]:
            self._prepared.pop(key).cancel()
        outgoing.close()
        return outgoing

    def close(self) -> None:
        """Stop the reader and close every file (the sender thread has ended)."""
        self._prepared.clear()
        self._reader.shutdown(wait=True, cancel_futures=True)
        for outgoing in self.files.values():
            outgoing.close()
        self.files.clear()

    # -- events ----------------------------------------------------------------------------------

    def reconnected(self) -> None:
        """A new MQTT session: what paho held for the old one is gone; every file re-asks the receiver."""
        self._in_client.clear()
        self._each(lambda t: t.reconnected(time.monotonic()))

    def resync(self) -> None:
        """`sync now`: re-ask files that wait for an answer or have nothing out."""
        self._each(lambda t: t.resync(time.monotonic()))

    def heard(self, ack: Ack) -> None:
        """Any usable ack: the chunk checks it lists decide the next chunks' (a receiver before crc32 lists none,
        and behind a shared subscription the last receiver heard decides; a chunk one of them refuses is sent
        again, as any refused chunk is). Forging this gains nothing: neither check is a custody check."""
        self.chunk_check = CHECK_CRC32 if CHECK_CRC32 in (ack.chunk_checks or ()) else CHECK_SHA256
        queued = ack.max_queued if ack.max_queued is not None else LEGACY_MAX_QUEUED
        queued_bytes = ack.max_queued_bytes if ack.max_queued_bytes is not None else LEGACY_MAX_QUEUED_BYTES
        share = self._window_within(queued, queued_bytes)
        if share != self._share:
            if share < self.window:
                log.info("the receiver queues at most %d messages (%d bytes) of this agent: %d chunks in flight, "
                         "not mqtt.window %d", queued, queued_bytes, share, self.window)
            self._share = share
        if self._after_loss is not None:
            self._after_loss += 1
            if self._after_loss >= share:
                self._after_loss = None

    def lost(self) -> None:
        """Chunks went out and no ack came for them within the ack timeout: dropped on the way (a broker whose
        queue for the receivers is full drops QoS 1 messages, mosquitto's max_queued_messages; docs/SCALING.md),
        or the receiver is gone. Halve the window, not below FIRST_WINDOW; each ack after gives one chunk back,
        so a broker shared by many agents sees each of them send less until its queue has room again."""
        halved = max(min(FIRST_WINDOW, self._share), self.window_now // 2)
        if halved < self.window_now:
            log.warning("chunks unacknowledged for %.0f s: %d chunks in flight instead of %d until acks come "
                        "again (a full broker queue drops messages; see docs/SCALING.md)", self.ack_timeout_s,
                        halved, self.window_now)
        self._after_loss = halved

    @property
    def window_now(self) -> int:
        """Chunks that may be unacknowledged now: the receiver's share, or less since chunks were lost."""
        return self._share if self._after_loss is None else min(self._share, self._after_loss)

    def _window_within(self, queued: int, queued_bytes: int) -> int:
        """The window that keeps this agent's messages within a receiver's share of `queued` messages and
        `queued_bytes` bytes (beyond it the receiver drops them), and within `mqtt.window`; at least 1."""
        by_bytes = queued_bytes // self._frame_bytes - QUEUE_RESERVE_FRAMES
        return max(1, min(self.window, queued - QUEUE_RESERVE_MESSAGES, by_bytes))

    def receiving(self, ack: Ack) -> None:
        """A `receiving` ack for one of the files in flight (others are ignored)."""
        outgoing = self.files.get(ack.file_id)
        if outgoing is None:
            return
        actions = outgoing.transfer.receiving(ack, time.monotonic())
        if actions:
            log.info("file=%s receiver: %s; resending manifest and what it lacks", ack.file_id, ack.reason)
        self._execute(outgoing, actions)

    def check_timeouts(self, now: float) -> None:
        lost = False
        for outgoing in list(self.files.values()):
            out = bool(outgoing.transfer.outstanding)
            actions = outgoing.transfer.timed_out(now, self.ack_timeout_s)
            if actions:
                log.info("file=%s no ack for %.0fs; querying the receiver", outgoing.file_id, self.ack_timeout_s)
                lost = lost or out
            self._execute(outgoing, actions)
        if lost:
            self.lost()   # once for every file that timed out together: one loss, one halving

    def _each(self, event: Callable[[Transfer], Iterable[Action]]) -> None:
        for outgoing in list(self.files.values()):
            self._execute(outgoing, event(outgoing.transfer))

    def _execute(self, outgoing: Outgoing, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, SendManifest):
                self._publish_file(outgoing, "manifest", outgoing.manifest)
            elif isinstance(action, SendQuery):
                self._publish_file(outgoing, "query", b"{}")

    def _publish_file(self, outgoing: Outgoing, kind: str, payload: bytes) -> bool:
        if self._publish(self.topics.file(outgoing.file_id, kind), payload) is None:
            return False
        self.bytes_sent += len(payload)
        return True

    # -- chunks ----------------------------------------------------------------------------------

    def _room(self) -> bool:
        """True while the window and paho's queue have room for another chunk."""
        if sum(len(o.transfer.outstanding) for o in self.files.values()) >= self.window_now:
            return False
        while self._in_client and _settled(self._in_client[0]):
            self._in_client.popleft()
        return len(self._in_client) < CHUNKS_IN_CLIENT

    def send_some(self, budget: int = 8, *, yielding: bool = False) -> bool:
        """Send up to `budget` chunks within the window, highest lane first. True if any went out. `yielding`:
        a dock bay collects, the chunks go at most at `mqtt.yield_to_docks_kbps` (the uplink's caller holds
        them all when that is 0)."""
        sent = 0
        while sent < budget and self._connected.is_set() and not self._stop.is_set() and self._room():
            outgoing = next((o for o in self.files.values() if o.transfer.next_seq() is not None), None)
            if outgoing is None or not self._send_chunk(outgoing, outgoing.transfer.cursor, yielding):
                break
            sent += 1
        return sent > 0

    def _prepare(self, outgoing: Outgoing, seq: int) -> Future:
        transfer = outgoing.transfer
        return self._reader.submit(prepare_chunk, outgoing.path, seq, transfer.size, transfer.chunk_size,
                                   outgoing.at_rest, outgoing.file_id, self.chunk_check)

    def _prepare_ahead(self, outgoing: Outgoing, after: int) -> None:
        """Have the reader work on the chunks this file will send after `after` (as things stand now)."""
        wanted = outgoing.transfer.upcoming(after, PREPARE_AHEAD)
        for key in [key for key in self._prepared if key[0] == outgoing.file_id and key[1] not in wanted]:
            self._prepared.pop(key).cancel()   # plans changed (an ack, a resend): not needed after all
        for seq in wanted:
            if (outgoing.file_id, seq) not in self._prepared:
                self._prepared[(outgoing.file_id, seq)] = self._prepare(outgoing, seq)

    def _frame(self, outgoing: Outgoing, seq: int) -> bytes | None:
        """Chunk `seq`'s frame from the reader; None (the file blocked and dropped) if the store fails it."""
        transfer = outgoing.transfer
        ahead = (seq + READ_AHEAD_CHUNKS) * transfer.chunk_size
        if ahead < transfer.size:
            os.posix_fadvise(outgoing.fd, ahead, transfer.chunk_size, os.POSIX_FADV_WILLNEED)
        frame = self._prepared.pop((outgoing.file_id, seq), None) or self._prepare(outgoing, seq)
        self._prepare_ahead(outgoing, seq)
        try:
            payload = frame.result()
        except AtRestError as exc:
            self._block(outgoing, f"its encrypted stored copy cannot be read ({exc}); "
                                  f"run: edge-agent verify {outgoing.file_id}")
            return None
        except OSError as exc:
            self._block(outgoing, f"its stored copy cannot be read ({exc.strerror}); "
                                  f"run: edge-agent verify {outgoing.file_id}")
            return None
        if payload is None:
            self._block(outgoing, f"its stored copy is shorter than its manifest says ({transfer.size} bytes): "
                                  "the store is damaged; run: edge-agent verify")
        return payload

    def _block(self, outgoing: Outgoing, why: str) -> None:
        self._on_blocked(outgoing.record, why)
        self.drop(outgoing.file_id)

    def _send_chunk(self, outgoing: Outgoing, seq: int, yielding: bool = False) -> bool:
        payload = self._frame(outgoing, seq)
        if payload is None:
            return False
        if self.bucket is not None and not self.bucket.consume(len(payload), self._stop):
            return False
        if yielding and self.yield_bucket is not None and not self.yield_bucket.consume(len(payload), self._stop):
            return False
        info = self._publish(self.topics.file(outgoing.file_id, "chunk"), payload)
        if info is None:
            return False
        self.bytes_sent += len(payload)
        self._in_client.append(info)
        outgoing.transfer.chunk_sent(seq, time.monotonic())
        return True
