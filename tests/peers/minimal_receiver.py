"""A receiver written from docs/PROTOCOL.md alone, as a platform team would: not the reference receiver.

It holds files in memory (tests send small ones), checks every chunk's SHA-256 and the whole file's
against the manifest, and acks the way the document allows but the reference receiver does not: it
leaves out every field that would be null (`sha256` on `receiving`, `reason` unless it has one, `have` on
`complete`) and adds one field v1 does not define. With `answer`, it instead replies to every manifest,
chunk and query with whatever `answer(file_id)` returns (bytes): a receiver that speaks garbage.

Its receipts (PROTOCOL.md section 9) are made here too, from the document's table, with `cryptography` and
`json` directly: an Ed25519 key of its own, whose public key it writes where the agent pins receiver keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def _ranges(seqs: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


class MinimalReceiver:
    """Subscribes to `{root}/+/files/#` on the broker at `port` and answers on `{root}/{agent}/acks`."""

    def __init__(self, port: int, root: str = "evidence/v2", *, answer: Callable[[str], bytes] | None = None,
                 pin_to: Path | None = None):
        self.root = root
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
        if pin_to is not None:   # what the platform operator does: the public key onto the agent
            pin_to.mkdir(parents=True, exist_ok=True)
            (pin_to / "minimal.pem").write_bytes(self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.manifest_bytes: dict[str, bytes] = {}
        self.stored_ms: dict[str, int] = {}
        self.answer = answer
        self.manifests: dict[str, dict[str, Any]] = {}
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.stored: dict[str, bytes] = {}
        self.answered = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="minimal-receiver",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{root}/+/files/#", qos=1)
        subscribed.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        agent, _, file_id, kind = message.topic[len(self.root) + 1:].split("/")
        with self._lock:
            if self.answer is not None:
                reply = self.answer(file_id)
            else:
                reply = json.dumps(self._handle(file_id, kind, message.payload)).encode()
            self.answered += 1
        self.client.publish(f"{self.root}/{agent}/acks", reply, qos=1)

    def _handle(self, file_id: str, kind: str, payload: bytes) -> dict[str, Any]:
        if kind == "manifest":
            self.manifests[file_id] = json.loads(payload)
            self.manifest_bytes[file_id] = bytes(payload)
            self.chunks.setdefault(file_id, {})
        elif kind == "chunk" and file_id in self.manifests:
            length = int.from_bytes(payload[:4], "big")
            head = json.loads(payload[4:4 + length])
            data = payload[4 + length:]
            if hashlib.sha256(data).hexdigest() == head["sha256"] and len(data) == head["size"]:
                self.chunks[file_id][head["seq"]] = data
        return self._state(file_id)

    def _state(self, file_id: str) -> dict[str, Any]:
        extra = {"receiver_build": "minimal-1"}   # a field v1 does not define: readers ignore it
        if file_id in self.stored:
            return self._complete(file_id, extra)
        manifest = self.manifests.get(file_id)
        if manifest is None:
            return {"file_id": file_id, "state": "receiving", "have": [], "reason": "no manifest for this file"}
        held = self.chunks[file_id]
        total = -(-manifest["size"] // manifest["chunk_size"])
        if len(held) < total:
            return {"file_id": file_id, "state": "receiving", "have": _ranges(set(held)), **extra}
        content = b"".join(held[seq] for seq in range(total))
        if hashlib.sha256(content).hexdigest() != manifest["sha256"]:
            return {"file_id": file_id, "state": "rejected", "reason": "whole-file SHA-256 differs from the manifest"}
        self.stored[file_id] = content
        self.stored_ms[file_id] = int(time.time() * 1000)
        return self._complete(file_id, extra)

    def _complete(self, file_id: str, extra: dict[str, Any]) -> dict[str, Any]:
        manifest = self.manifests[file_id]
        receipt = {"v": 1, "type": "receipt", "verdict": "complete", "agent_id": manifest["agent_id"],
                   "file_id": file_id, "sha256": manifest["sha256"], "size": len(self.stored[file_id]),
                   "manifest_sha256": hashlib.sha256(self.manifest_bytes[file_id]).hexdigest(),
                   "stored_ms": self.stored_ms[file_id], "key_id": self.key_id}
        canonical = json.dumps(receipt, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        receipt["sig"] = base64.b64encode(self.key.sign(canonical)).decode("ascii")
        return {"file_id": file_id, "state": "complete", "sha256": manifest["sha256"], "receipt": receipt, **extra}
