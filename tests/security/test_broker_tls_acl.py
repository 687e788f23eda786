"""Mutual TLS and the per-agent ACL on a real mosquitto: an agent's certificate is its identity, and a
second agent's credentials can neither read nor spoof the first agent's topics."""

from __future__ import annotations

import queue
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.config import parse_receiver_config
from edge_agent.evidence.manifest import AgentKey
from edge_agent.layout import StoreLayout
from edge_agent.platform.receiver import Receiver
from tests.evidence_support import running_agent
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.peers.mosquitto import Mosquitto, evidence_acl, free_port, tls_listener
from tests.peers.pki import CertFiles, TestPKI
from tests.sync_support import pin_receiver_key, pinned_dir

ROOT = "evidence/v2"


class TlsClient:
    """A raw paho MQTT v5 client over mutual TLS that records what it receives and the broker's verdicts."""

    def __init__(self, port: int, ca: Path, cert: CertFiles | None, client_id: str | None = None):
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.suback: list[int] = []
        self.puback: dict[int, int] = {}
        self.connected = False
        self.ended: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex,
                                  protocol=mqtt.MQTTv5)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        if cert is not None:
            context.load_cert_chain(str(cert.cert), str(cert.key))
        self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda _c, _u, _f, code, _p: self.ended.append(str(code))
        self.client.on_message = lambda _c, _u, msg: self.received.put((msg.topic, msg.payload))
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.suback.extend(c.value for c in codes)
        self.client.on_publish = lambda _c, _u, mid, code, _p: self.puback.__setitem__(mid, code.value)
        self.port = port

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, code: mqtt.ReasonCode, _p: object) -> None:
        self.connected = not code.is_failure

    def connect(self) -> TlsClient:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        wait_for(lambda: self.connected, 10, what="TLS client connected")
        return self

    def refused(self) -> bool:
        """Try to connect; True if the broker ended the connection without ever accepting it."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=5)
        except (ssl.SSLError, OSError) as exc:  # TLS 1.2: the handshake itself fails
            self.ended.append(str(exc))
        else:  # TLS 1.3: the client finishes first, then the broker's alert ends the connection
            self.client.loop_start()
            wait_for(lambda: self.ended or self.connected, 10, what="broker verdict on the client certificate")
            self.client.loop_stop()
        return bool(self.ended) and not self.connected

    def subscribe(self, topic: str) -> int:
        before = len(self.suback)
        self.client.subscribe(topic, qos=1)
        wait_for(lambda: len(self.suback) > before, 10, what=f"SUBACK for {topic}")
        return self.suback[-1]

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.puback, 10, what=f"PUBACK for {topic}")
        return self.puback[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[Mosquitto, TestPKI]]:
    pki = TestPKI(tmp_path / "pki")
    server = pki.server()
    acl = evidence_acl(tmp_path / "acl", ROOT, receivers=("receiver-1",), platforms=("platform",))
    port = free_port()
    broker = Mosquitto(tmp_path / "broker", port=port,
                       listener=tls_listener(port, pki.ca_path, server.cert, server.key, acl)).start()
    yield broker, pki
    broker.stop()


def _clients(broker: Mosquitto, pki: TestPKI, *names: str) -> list[TlsClient]:
    return [TlsClient(broker.port, pki.ca_path, pki.client(n), client_id=n).connect() for n in names]


def test_second_agent_cannot_read_first_agents_acks_or_commands(secured: tuple[Mosquitto, TestPKI]) -> None:
    broker, pki = secured
    agent_a, agent_b, receiver, platform = _clients(broker, pki, "ws-a", "ws-b", "receiver-1", "platform")
    try:
        agent_a.subscribe(f"{ROOT}/ws-a/acks")
        agent_a.subscribe(f"{ROOT}/ws-a/commands")
        agent_b.subscribe(f"{ROOT}/ws-a/acks")
        agent_b.subscribe(f"{ROOT}/ws-a/commands")
        agent_b.subscribe(f"{ROOT}/#")
        assert receiver.publish(f"{ROOT}/ws-a/acks", b'{"file_id":"x","state":"complete"}') < 0x80
        assert platform.publish(f"{ROOT}/ws-a/commands", b'{"cmd":"health"}') < 0x80
        # The rightful reader gets both: the messages were delivered, so B's silence is the ACL, not luck.
        got_a = {wait_for(lambda: agent_a.received.get(timeout=5), 10)[0] for _ in range(2)}
        assert got_a == {f"{ROOT}/ws-a/acks", f"{ROOT}/ws-a/commands"}
        # B's own command arrives to B; then we know B's earlier deliveries would have come before it.
        assert platform.publish(f"{ROOT}/ws-b/commands", b'{"cmd":"health"}') < 0x80
        agent_b.subscribe(f"{ROOT}/ws-b/commands")
        assert platform.publish(f"{ROOT}/ws-b/commands", b'{"cmd":"resync"}') < 0x80
        topic, _ = wait_for(lambda: agent_b.received.get(timeout=5), 10)
        assert topic == f"{ROOT}/ws-b/commands"
        assert [t for t, _ in agent_b.drain() if "/ws-a/" in t] == []
    finally:
        for client in (agent_a, agent_b, receiver, platform):
            client.close()


def test_second_agent_cannot_spoof_first_agents_uplink(secured: tuple[Mosquitto, TestPKI]) -> None:
    broker, pki = secured
    agent_b, receiver = _clients(broker, pki, "ws-b", "receiver-1")
    try:
        receiver.subscribe(f"{ROOT}/+/files/#")
        receiver.subscribe(f"{ROOT}/+/status")
        spoofed = {f"{ROOT}/ws-a/files/01SPOOF/manifest": b'{"file_id":"01SPOOF"}',
                   f"{ROOT}/ws-a/status": b'{"state":"offline"}',
                   f"{ROOT}/ws-a/acks": b'{"file_id":"01SPOOF","state":"complete"}'}
        for topic, payload in spoofed.items():
            assert agent_b.publish(topic, payload) == 0x87  # MQTT 5: Not authorized
        # B may publish under its own id, and that does reach the receiver: the channel works.
        assert agent_b.publish(f"{ROOT}/ws-b/files/01OWN/manifest", b'{"file_id":"01OWN"}') < 0x80
        topic, _ = wait_for(lambda: receiver.received.get(timeout=5), 10)
        assert topic == f"{ROOT}/ws-b/files/01OWN/manifest"
        assert receiver.drain() == []
    finally:
        agent_b.close()
        receiver.close()


def test_agent_cannot_forge_acks_for_itself(secured: tuple[Mosquitto, TestPKI]) -> None:
    """An agent that could ack its own files could get a recorder cleared with no central copy (G2)."""
    broker, pki = secured
    (agent_a,) = _clients(broker, pki, "ws-a")
    try:
        assert agent_a.publish(f"{ROOT}/ws-a/acks", b'{"file_id":"x","state":"complete"}') == 0x87
        assert agent_a.publish(f"{ROOT}/ws-a/commands", b'{"cmd":"resync"}') == 0x87
    finally:
        agent_a.close()


def test_client_without_certificate_or_from_another_ca_is_refused(secured: tuple[Mosquitto, TestPKI],
                                                                  tmp_path: Path) -> None:
    broker, pki = secured
    rogue_ca = TestPKI(tmp_path / "rogue", ca_name="rogue CA")
    for cert in (None, rogue_ca.client("ws-a")):
        assert TlsClient(broker.port, pki.ca_path, cert).refused()


def test_real_agent_and_receiver_sync_over_mutual_tls_under_the_acl(secured: tuple[Mosquitto, TestPKI],
                                                                    tmp_path: Path) -> None:
    """The ACL is not only strict but sufficient: the real agent and receiver, each with its own
    certificate, carry a file end to end over mutual TLS."""
    broker, pki = secured
    agent_cert, receiver_cert = pki.client("ws-test-01"), pki.client("receiver-1")
    tls = {"host": "127.0.0.1", "port": broker.port, "tls_ca": str(pki.ca_path), "reconnect_min_s": 0.1,
           "reconnect_max_s": 1}
    dock = tmp_path / "dock"
    pin_receiver_key(tmp_path / "central" / "keys", pinned_dir(tmp_path), "receiver-1")   # its receipt key
    _, cfg = agent_config(tmp_path, mqtt={**tls, "tls_cert": str(agent_cert.cert), "tls_key": str(agent_cert.key),
                                          "receiver_keys": str(pinned_dir(tmp_path))},
                          docks=[{"name": "bench", "kind": "directory", "root": str(dock), "settle_s": 0}])
    cfg.agent.data_dir.mkdir(mode=0o750)
    key = AgentKey.load_or_create(StoreLayout(cfg.agent.data_dir).keys)
    (tmp_path / "enrolled").mkdir()
    (tmp_path / "enrolled" / "ws-test-01.pem").write_text(key.public_pem())
    receiver = Receiver(parse_receiver_config({
        "mqtt": {**tls, "tls_cert": str(receiver_cert.cert), "tls_key": str(receiver_cert.key)},
        "receiver": {"store_dir": str(tmp_path / "central"), "keys_dir": str(tmp_path / "enrolled")}}))
    receiver.start()
    try:
        with running_agent(cfg) as agent:
            # Written aside, then docked whole (a rename): the agent never lists a file still being written.
            prepared = make_recorder_volume(dock / ".prep", "A123456",
                                            {"DCIM/100/A123456_320102123_20261122080000.MP4": 700_000},
                                            identity={"DeviceID": "A123456", "PoliceID": "320102123"})
            prepared.rename(dock / "A123456")
            # Every file on the volume travels (the identity file too); the recording is the one to follow.
            (synced,) = wait_for(lambda: [f for f in agent.catalog.files(states=["synced"])
                                          if f.original_path.endswith(".MP4")], 60, what="recording synced over TLS")
        assert receiver.store.stored("ws-test-01", synced.file_id)["sha256"] == synced.sha256
    finally:
        receiver.stop()
