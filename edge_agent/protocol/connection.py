"""One MQTT connection kept up: connect, paho's network loop, reconnect with backoff.

Shared by the uplink and the reference receiver. paho's own reconnect is off
(`reconnect_on_failure=False`): its delays have no jitter, and a reconnect
storm of 500 agents after a broker restart is exactly what full jitter
prevents. Sessions are persistent (clean_start false, session expiry set), so
the broker keeps subscriptions and QoS 1 messages across short outages.

No callback can kill paho's network thread: every callback set on the client (before the `Connection` is
built, as the uplink and the receiver do) runs behind `guarded`, which logs and counts what it raised and
drops the message. Should the thread die all the same (a fault inside paho), `vital()` says so and
`restart()` drops the session and connects again (ops/liveness.py calls it).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties, VariableByteIntegers

from edge_agent.config import MqttSection
from edge_agent.protocol.heartbeat import Heartbeat, Vital
from edge_agent.protocol.pacing import Backoff

log = logging.getLogger(__name__)

GUARDED_CALLBACKS = ("on_message", "on_publish", "on_subscribe", "on_unsubscribe")


class CallbackFaults:
    """How many times each guarded callback raised (read by health and tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> int:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1
            return self.counts[what]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def guarded(what: str, callback: Callable[..., Any], faults: CallbackFaults) -> Callable[..., None]:
    """`callback` as paho should call it: whatever it raises (RecursionError, MemoryError, a database error)
    is logged with the topic, counted in `faults` and swallowed, so paho's network thread lives on. The
    message it was handling is lost to this process (QoS 1 redelivery or the sender's query recovers it)."""
    def call(*args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 (the fault barrier of paho's thread)
            message = next((a for a in args if isinstance(a, mqtt.MQTTMessage)), None)
            topic = message.topic if message is not None else None
            size = len(message.payload) if message is not None else None
            n = faults.count(what)
            log.error("mqtt callback failed callback=%s topic=%s payload_bytes=%s faults=%d error=%s: %.200s; "
                      "message dropped", what, topic, size, n, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, RecursionError | MemoryError))
    return call


VIEWED_PACKET_BYTES = 64 * 1024


class Client(mqtt.Client):
    """paho's client without its copies of large messages (docs/BENCHMARKS.md "CRC-32 chunk checks"):

    - sending, a large outgoing packet is queued as a memoryview of itself. paho's writer sends `packet[pos:]`,
      which for the bytearray `publish` builds is a copy of all that is left of it on every send (one 512 KiB
      copy per chunk at least, and another of the remainder at each partial send); a view sends the same bytes
      without copying them (0.1-0.3 CPU s less per GiB published). Nothing else reads a queued packet; the
      bytearray is not changed after it is queued.
    - receiving, paho's `decode_publish` copies the rest of a PUBLISH at every field it takes off the front
      (`struct.unpack("...s")` three times, then MQTT 5's properties byte by byte, `buffer[1:]`): six or more
      copies of each 512 KiB chunk: 0.48 ms of CPU a chunk in a fresh process, 0.05 ms where malloc reuses its
      heap for them (0.02 ms both ways here). Here paho decodes only the header (topic, packet
      id, properties), and the payload is cut from the packet once and put on the message before `on_message`.
      paho's debug log line of a received PUBLISH then counts 0 bytes. QoS 2 (whose message paho keeps until
      PUBREL) and anything this split cannot read are left to paho as they are.
    """

    _payload: bytes | None = None   # the payload of the PUBLISH being handled (paho's network thread only)

    def _packet_queue(self, command: int, packet: bytes | bytearray, *args: Any, **kwargs: Any) -> Any:
        if isinstance(packet, bytearray) and len(packet) > VIEWED_PACKET_BYTES:
            packet = memoryview(packet)   # type: ignore[assignment]
        return super()._packet_queue(command, packet, *args, **kwargs)

    def _handle_publish(self) -> Any:
        packet, command = self._in_packet["packet"], self._in_packet["command"]
        split = None
        if len(packet) > VIEWED_PACKET_BYTES and (command & 0x06) >> 1 < 2:
            split = publish_header_size(packet, (command & 0x06) >> 1, self._protocol == mqtt.MQTTv5)
        if split is None:
            return super()._handle_publish()
        with memoryview(packet) as view, view[split:] as payload:
            self._payload = bytes(payload)
        self._in_packet["packet"] = packet[:split]
        try:
            return super()._handle_publish()
        finally:
            self._payload = None

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        if self._payload is not None:
            message.payload = self._payload
        super()._handle_on_message(message)


# The private parts of paho that `Client` overrides: where a paho release no longer has them, clients are stock
# paho (correct, with its copies) rather than broken; tests/test_sync_wire.py fails on such a release so that the
# copies are noticed.
PAHO_INTERNALS = ("_packet_queue", "_handle_publish", "_handle_on_message", "_in_packet", "_protocol")


def paho_internals_present() -> bool:
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    return all(hasattr(probe, name) for name in PAHO_INTERNALS)


def publish_header_size(packet: bytes | bytearray, qos: int, mqtt5: bool) -> int | None:
    """How many bytes of a PUBLISH's variable part (after the fixed header) come before its payload: topic,
    packet id (QoS > 0), properties (MQTT 5); None if they do not fit in the packet (paho then says why)."""
    if len(packet) < 2:
        return None
    size = 2 + int.from_bytes(packet[:2], "big") + (2 if qos else 0)
    if mqtt5:
        with memoryview(packet) as view, view[size:size + 4] as vbi:
            try:
                length, used = VariableByteIntegers.decode(vbi)
            except MalformedPacket:
                return None
        size += used + length
    return size if size <= len(packet) else None


_COPYLESS = paho_internals_present()
if not _COPYLESS:
    log.warning("paho_internals_changed version=%s: MQTT clients are stock paho (every large message copied)",
                getattr(mqtt, "__version__", "?"))


def build_client(mqtt_cfg: MqttSection, client_id: str, **kwargs: Any) -> mqtt.Client:
    """A paho MQTT 5 client (`Client`) with the config's TLS and credentials."""
    kind = Client if _COPYLESS else mqtt.Client
    client = kind(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                  reconnect_on_failure=False, **kwargs)
    if mqtt_cfg.tls_ca is not None:
        context = ssl.create_default_context(cafile=str(mqtt_cfg.tls_ca))
        if mqtt_cfg.tls_cert is not None:
            context.load_cert_chain(str(mqtt_cfg.tls_cert), str(mqtt_cfg.tls_key) if mqtt_cfg.tls_key else None)
        client.tls_set_context(context)
    if mqtt_cfg.username is not None:
        password = None
        if mqtt_cfg.password_file is not None:
            mode = mqtt_cfg.password_file.stat().st_mode & 0o777
            if mode & 0o004:
                raise PermissionError(f"mqtt.password_file {mqtt_cfg.password_file} is readable by everyone "
                                      f"(mode {mode:o}); run: chmod o-r {mqtt_cfg.password_file}")
            password = mqtt_cfg.password_file.read_text(encoding="utf-8").strip()
        client.username_pw_set(mqtt_cfg.username, password)
    return client


class Connection:
    """Keeps `client` connected until `stop()`. `on_up(client)` runs on every successful CONNACK
    (subscribe there: a broker that restarted without persistence forgot the session);
    `before_connect()` runs before every attempt (to refresh the will's timestamp)."""

    def __init__(self, client: mqtt.Client, mqtt_cfg: MqttSection, *, session_expiry_s: int,
                 on_up: Callable[[mqtt.Client], None], on_down: Callable[[], None] | None = None,
                 before_connect: Callable[[], None] | None = None):
        self.client = client
        self.cfg = mqtt_cfg
        self.session_expiry_s = session_expiry_s
        self.backoff = Backoff(mqtt_cfg.reconnect_min_s, mqtt_cfg.reconnect_max_s)
        self.connected = threading.Event()
        self.generation = 0                  # bumped on every successful connect
        self._on_up, self._on_down, self._before_connect = on_up, on_down, before_connect
        self._disconnected = threading.Event()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._restart = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = "mqtt-connection"
        self._network: threading.Thread | None = None   # paho's thread while a session runs, else None
        self.faults = CallbackFaults()
        self.heartbeat = Heartbeat(self._name)
        for name in GUARDED_CALLBACKS:
            callback = getattr(client, name)
            if callback is not None:
                setattr(client, name, guarded(name, callback, self.faults))
        client.on_connect = guarded("on_connect", self._connected, self.faults)
        client.on_disconnect = guarded("on_disconnect", self._lost, self.faults)

    def start(self, name: str) -> None:
        self._name = self.heartbeat.name = name
        self._thread = threading.Thread(target=self._supervise, name=name, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """False when the supervisor thread died, or paho's network thread died under a running session."""
        if self._stop.is_set() or self._thread is None:
            return True
        network = self._network
        return self._thread.is_alive() and (network is None or network.is_alive())

    def restart(self) -> None:
        """Bring a dead connection back: a new supervisor thread if it died, else end the session (paho's
        thread is gone) and connect again at once."""
        if self._stop.is_set():
            return
        if self._thread is None or not self._thread.is_alive():
            log.error("mqtt supervisor thread %s had died; starting it again", self._name)
            self.start(self._name)
            return
        self.backoff.reset()
        self._restart.set()
        self._kick.set()

    def vital(self) -> Vital:
        """This connection as a supervised component (the supervisor thread and paho's network loop)."""
        return Vital(self._name, self.heartbeat, self.alive, self.restart)

    def stop(self, last_will: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly, publishing `last_will` (topic, payload; retained) first if connected."""
        self._stop.set()
        self._kick.set()
        if self.connected.is_set():
            if last_will is not None:
                info = self.client.publish(last_will[0], last_will[1], qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=2)
                except (RuntimeError, ValueError):
                    pass
            self.client.disconnect()
        self._disconnected.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def retry_now(self) -> None:
        """Skip the rest of a backoff wait (a custodian's `sync now`)."""
        self.backoff.reset()
        self._kick.set()

    def _supervise(self) -> None:
        cfg = self.cfg
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry_s
        while not self._stop.is_set():
            self.heartbeat.beat()
            if self._before_connect is not None:
                self._before_connect()
            self._disconnected.clear()
            self._restart.clear()
            try:
                self.client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False,
                                    properties=props)
            except (OSError, ValueError) as exc:
                delay = self.backoff.next_delay()
                log.warning("mqtt connect failed host=%s port=%s error=%r retry_in_s=%.1f",
                            cfg.host, cfg.port, exc, delay)
                self._wait(delay)
                continue
            self.client.loop_start()
            # paho's own thread (no public accessor): watched so its death is seen, not waited out.
            self._network = getattr(self.client, "_thread", None)
            self._session(time.monotonic() + max(10.0, cfg.keepalive_s * 1.5))
            self._network = None
            self.client.loop_stop()
            self.connected.clear()
            if self._stop.is_set():
                return
            delay = self.backoff.next_delay()
            log.info("mqtt disconnected host=%s port=%s reconnect_in_s=%.1f", cfg.host, cfg.port, delay)
            self._wait(delay)

    def _session(self, connack_by: float) -> None:
        """Wait while the session runs, beating as long as paho's thread does; return to reconnect."""
        cfg = self.cfg
        while not self._disconnected.wait(0.2) and not self._stop.is_set():
            if self._restart.is_set():
                log.warning("mqtt session restarted host=%s port=%s (paho's network thread had died)",
                            cfg.host, cfg.port)
                self.client.disconnect()
                return
            if self._network is not None and not self._network.is_alive():
                continue   # dead: no beat; the supervisor (ops/liveness.py) sees it and calls restart()
            self.heartbeat.beat()
            if not self.connected.is_set() and time.monotonic() > connack_by:
                log.warning("mqtt no CONNACK from host=%s port=%s; reconnecting", cfg.host, cfg.port)
                self.client.disconnect()
                return

    def _wait(self, delay: float) -> None:
        self.heartbeat.idle()
        self._kick.wait(delay)
        self._kick.clear()

    def _connected(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt connection refused reason=%s (check credentials, client id and ACLs)", reason)
            return
        self.backoff.reset()
        self.generation += 1
        log.info("mqtt connected host=%s port=%s session_present=%s", self.cfg.host, self.cfg.port,
                 getattr(flags, "session_present", None))
        self.connected.set()
        self._on_up(client)

    def _lost(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        self._disconnected.set()
        log.info("mqtt connection closed reason=%s", reason)
        if self._on_down is not None:
            self._on_down()
