"""One MQTT connection kept up: connect, paho's network loop, reconnect with backoff.

Shared by the uplink and the reference receiver. paho's own reconnect is off
(`reconnect_on_failure=False`): its delays have no jitter, and a reconnect
storm of 500 agents after a broker restart is exactly what full jitter
prevents. Sessions are persistent (clean_start false, session expiry set), so
the broker keeps subscriptions and QoS 1 messages across short outages.
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
from paho.mqtt.properties import Properties

from edge_agent.config import MqttSection
from edge_agent.protocol.pacing import Backoff

log = logging.getLogger(__name__)


def build_client(mqtt_cfg: MqttSection, client_id: str, **kwargs: Any) -> mqtt.Client:
    """A paho MQTT 5 client with the config's TLS and credentials."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
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
        self._thread: threading.Thread | None = None
        client.on_connect = self._connected
        client.on_disconnect = self._lost

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._supervise, name=name, daemon=True)
        self._thread.start()

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
            if self._before_connect is not None:
                self._before_connect()
            self._disconnected.clear()
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
            connack_by = time.monotonic() + max(10.0, cfg.keepalive_s * 1.5)
            while not self._disconnected.wait(0.2) and not self._stop.is_set():
                if not self.connected.is_set() and time.monotonic() > connack_by:
                    log.warning("mqtt no CONNACK from host=%s port=%s; reconnecting", cfg.host, cfg.port)
                    self.client.disconnect()
                    break
            self.client.loop_stop()
            self.connected.clear()
            if self._stop.is_set():
                return
            delay = self.backoff.next_delay()
            log.info("mqtt disconnected host=%s port=%s reconnect_in_s=%.1f", cfg.host, cfg.port, delay)
            self._wait(delay)

    def _wait(self, delay: float) -> None:
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
