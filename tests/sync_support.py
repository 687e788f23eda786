"""Builders for sync tests: a real agent and real receivers as processes, and a scripted agent for the
receiver's own tests (it speaks the wire protocol with paho and a real signing key)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from ulid import ULID

from edge_agent.evidence.manifest import AgentKey, canonical_json
from edge_agent.platform.receiver.receipts import ReceiverKey
from edge_agent.protocol.wire import ChunkHeader, chunk_count, chunk_span, encode_chunk
from tests.helpers import wait_for, write_toml

ROOT = "evidence/v2"
AGENT_ID = "ws-test-01"
CLI = [sys.executable, "-m", "edge_agent.cli"]


class Proc:
    """One `edge-agent` process with its log; `kill9` and `restart` for crash tests."""

    def __init__(self, args: list[str], log: Path, prefix: list[str] | None = None):
        self.args, self.log = args, log
        self.prefix = prefix or []   # e.g. `ip netns exec NS` (tests/netns.py): the process runs on a test host
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen([*self.prefix, *CLI, *self.args], stdout=subprocess.DEVNULL, stderr=out,
                                          stdin=subprocess.DEVNULL)
        return self

    def kill9(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def agent_setup(tmp: Path, port: int, *, dock_root: Path | None = None, clear_after_sync: bool = True,
                mqtt: dict[str, Any] | None = None, **sections: Any) -> tuple[Path, Path]:
    """agent.toml with a directory dock, fast retries; returns (config path, data dir)."""
    data_dir = tmp / "agent-data"
    data_dir.mkdir(mode=0o750, exist_ok=True)
    pinned_dir(tmp).mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "agent": {"id": AGENT_ID, "site": "nj-gulou", "unit": "鼓楼区城管大队", "data_dir": str(data_dir),
                  "max_disk_gb": 50, "min_free_mb": 0},
        "mqtt": {"port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 1, "ack_timeout_s": 2,
                 "receiver_keys": str(pinned_dir(tmp)), **(mqtt or {})},
        **sections,
    }
    if dock_root is not None:
        config["docks"] = [{"name": "bench", "kind": "directory", "root": str(dock_root), "settle_s": 0,
                            "rescan_s": 0.3, "clear_after_sync": clear_after_sync}]
    return write_toml(tmp / "agent.toml", config), data_dir


def enrol(agent_toml: Path, keys_dir: Path) -> None:
    """What a platform operator does: `edge-agent keys show --json` into the receiver's keys dir."""
    out = subprocess.run([*CLI, "--config", str(agent_toml), "--json", "keys", "show"], check=True,
                         capture_output=True, text=True)
    keys_dir.mkdir(parents=True, exist_ok=True)
    (keys_dir / f"{AGENT_ID}.pem").write_text(json.loads(out.stdout)["public_key_pem"])


def enrolled_agent_key(tmp: Path, agent_id: str = AGENT_ID) -> AgentKey:
    """A scripted agent's key (made in tmp/agent-keys), its public key enrolled in tmp/enrolled for a receiver."""
    key = AgentKey.load_or_create(tmp / "agent-keys")
    (tmp / "enrolled").mkdir(exist_ok=True)
    (tmp / "enrolled" / f"{agent_id}.pem").write_text(key.public_pem())
    return key


def pinned_dir(tmp: Path) -> Path:
    """The directory of receiver public keys the test agent pins (`mqtt.receiver_keys`)."""
    return tmp / "pinned-receiver-keys"


def pin_receiver_key(key_dir: Path, pinned: Path, name: str) -> str:
    """What a platform operator does before a receiver signs receipts: its public key (made now if new) onto
    the agents, as `<pinned>/<name>.pem`. Returns its key id."""
    key = ReceiverKey.load_or_create(key_dir)
    pinned.mkdir(parents=True, exist_ok=True)
    (pinned / f"{name}.pem").write_text(key.public_pem())
    return key.key_id


def receiver_setup(tmp: Path, port: int, store: Path, keys_dir: Path, *, name: str = "receiver-1",
                   mqtt_host: str = "127.0.0.1", **receiver: Any) -> Path:
    """receiver.toml; its receipt key (in `<store>/keys`) is pinned for the agent of `agent_setup(tmp, ...)`."""
    pin_receiver_key(store / "keys", pinned_dir(tmp), name)
    return write_toml(tmp / f"{name}.toml", {
        "mqtt": {"host": mqtt_host, "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 1},
        "receiver": {"store_dir": str(store), "keys_dir": str(keys_dir), "client_id": name, **receiver}})


def receiver_proc(tmp: Path, config: Path, name: str = "receiver-1", prefix: list[str] | None = None) -> Proc:
    return Proc(["receiver", "run", "--config", str(config)], tmp / f"{name}.log", prefix)


def agent_proc(tmp: Path, config: Path) -> Proc:
    return Proc(["--config", str(config), "run"], tmp / "agent.log")


def catalog_rows(data_dir: Path, sql: str = "SELECT file_id, state, original_path, sha256 FROM files",
                 params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = data_dir / "catalog.sqlite"
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return []


def states(data_dir: Path) -> dict[str, int]:
    return dict(catalog_rows(data_dir, "SELECT state, COUNT(*) FROM files GROUP BY state"))


def stored_index(store: Path) -> dict[str, dict[str, Any]]:
    folder = store / "index" / AGENT_ID
    if not folder.exists():
        return {}
    return {p.stem: json.loads(p.read_bytes()) for p in folder.glob("*.json")}


def receiver_logged(tmp: Path, text: str, name: str = "receiver-1") -> bool:
    log = tmp / f"{name}.log"
    return log.exists() and text in log.read_text(errors="replace")


def subscribed_client(port: int, client_id: str, topic: str, on_payload: Any, host: str = "127.0.0.1") -> mqtt.Client:
    """A paho client on the local broker, subscribed (the SUBACK awaited) to `topic`; each payload goes to
    `on_payload(bytes)` on paho's thread."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, m: on_payload(m.payload)
    subscribed: queue.Queue[bool] = queue.Queue()
    client.on_subscribe = lambda *_: subscribed.put(True)
    client.connect(host, port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    subscribed.get(timeout=10)
    return client


class ScriptedAgent:
    """Speaks wire protocol v1 to a receiver by hand, with a real Ed25519 key: well or badly."""

    def __init__(self, port: int, key: AgentKey, agent_id: str = AGENT_ID, host: str = "127.0.0.1",
                 check: str = "sha256"):
        self.key, self.agent_id = key, agent_id
        self.check = check   # the chunk headers' check: sha256 (as agents before crc32) or crc32
        self.acks: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = subscribed_client(port, f"scripted-{agent_id}", f"{ROOT}/{agent_id}/acks",
                                        lambda payload: self.acks.put(json.loads(payload)), host)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def manifest(self, content: bytes, chunk_size: int = 65536, **override: Any) -> dict[str, Any]:
        doc = {"v": 1, "type": "file", "file_id": str(ULID()), "agent_id": self.agent_id, "site_id": "nj-gulou",
               "unit": "test", "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
               "chunk_size": chunk_size, "retention": "routine", "prev": "0" * 64, **override}
        return self.key.sign(doc)

    def publish(self, file_id: str, kind: str, payload: bytes) -> None:
        self.client.publish(f"{ROOT}/{self.agent_id}/files/{file_id}/{kind}", payload, qos=1).wait_for_publish(10)

    def send_manifest(self, doc: dict[str, Any]) -> None:
        self.publish(doc["file_id"], "manifest", canonical_json(doc))

    def send_chunks(self, doc: dict[str, Any], content: bytes, seqs: list[int] | None = None) -> None:
        total = chunk_count(len(content), doc["chunk_size"])
        for seq in range(total) if seqs is None else seqs:
            offset, length = chunk_span(seq, len(content), doc["chunk_size"])
            data = content[offset:offset + length]
            value = f"{zlib.crc32(data):08x}" if self.check == "crc32" else hashlib.sha256(data).hexdigest()
            self.publish(doc["file_id"], "chunk", encode_chunk(ChunkHeader(seq, offset, length, value), data))

    def send_file(self, content: bytes, chunk_size: int = 65536) -> dict[str, Any]:
        doc = self.manifest(content, chunk_size)
        self.send_manifest(doc)
        self.send_chunks(doc, content)
        return doc

    def ack(self, file_id: str, state: str | None = None, timeout: float = 20) -> dict[str, Any]:
        """The next ack for `file_id` (in `state`, if given); others are skipped."""
        def match() -> dict[str, Any] | None:
            try:
                ack = self.acks.get(timeout=0.2)
            except queue.Empty:
                return None
            return ack if ack["file_id"] == file_id and (state is None or ack["state"] == state) else None

        return wait_for(match, timeout, interval=0, what=f"ack {state or ''} for {file_id}")

    def query(self, file_id: str) -> None:
        self.publish(file_id, "query", b"{}")

    def current_ack(self, file_id: str) -> dict[str, Any]:
        """The answer to a query sent now (acks already queued are older: skipped, unless one is `complete`)."""
        while not self.acks.empty():
            ack = self.acks.get()
            if ack["file_id"] == file_id and ack["state"] == "complete":
                return ack
        self.query(file_id)
        return self.ack(file_id)

    def resend_until_complete(self, doc: dict[str, Any], content: bytes, acked: int,
                              rounds: int = 30) -> dict[str, Any]:
        """Query, and send again what the answer does not hold (what went to a dead receiver), until `complete`;
        every answer must still hold chunks 0..acked-1 (nothing acknowledged is lost)."""
        total = chunk_count(len(content), doc["chunk_size"])
        for _ in range(rounds):
            ack = self.current_ack(doc["file_id"])
            if ack["state"] == "complete":
                return ack
            assert ack["state"] == "receiving" and set(range(acked)) <= held_seqs(ack)
            self.send_chunks(doc, content, sorted(set(range(total)) - held_seqs(ack)))
        raise AssertionError(f"file {doc['file_id']} not complete after {rounds} rounds: {ack}")


def stop_all(agent: ScriptedAgent | None, procs: list[Proc]) -> None:
    """A test's teardown of a scripted agent (if it was made) and the receiver processes it talked to."""
    if agent is not None:
        agent.close()
    for proc in procs:
        proc.stop()


def held_seqs(ack: dict[str, Any]) -> set[int]:
    """The chunk numbers an ack's `have` ranges name."""
    return {seq for first, last in ack["have"] for seq in range(first, last + 1)}


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
