"""Fuzzing every inbound MQTT message against the real parsers (G6): acks and commands into the agent's
uplink, manifests, chunks (header and frame) and queries into the receiver. Nothing raises, nothing that
is not a valid protocol step changes any state, and each refusal is logged with its reason."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.catalog import Catalog, State, new_id
from edge_agent.config import parse_receiver_config
from edge_agent.evidence.manifest import AgentKey, canonical_json
from edge_agent.layout import StoreLayout
from edge_agent.platform.receiver import Receiver
from edge_agent.protocol.wire import ChunkHeader, encode_chunk
from edge_agent.sync import Uplink
from tests.helpers import agent_config
from tests.peers.mosquitto import Mosquitto
from tests.test_liveness import sync_after

AGENT = "ws-fuzz-01"
ROOT = "evidence/v2"
CHUNK = 4096
SHA = "ab" * 32
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**66), max_value=2**66) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=15)
ulids = st.from_regex(r"[0-9A-HJKMNP-TV-Z]{26}", fullmatch=True)
hexes = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


def _files_snapshot(catalog: Catalog) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in catalog.query("SELECT file_id, state, sha256, last_error FROM files ORDER BY file_id")]


# -- the agent's side: acks and commands -------------------------------------------------------------


class UplinkBench:
    """A real Uplink (not connected) over a catalog holding one file in `sending`."""

    def __init__(self, tmp: Path):
        _, cfg = agent_config(tmp, agent={"id": AGENT})
        self.layout = StoreLayout(cfg.agent.data_dir)
        self.layout.create()
        self.catalog = Catalog(cfg.catalog_path)
        self.uplink = Uplink(self.catalog, self.layout, cfg, version="fuzz")
        self.obeyed: list[dict[str, Any]] = []
        self.uplink.on_command(self.obeyed.append)

    def sending_file(self) -> str:
        record, _ = self.catalog.discover(kind="recorder", device_id="A123456", original_path=f"DCIM/{new_id()}.MP4",
                                          source_path=None, source_size=10, source_mtime_ns=1)
        for state, columns in ((State.STAGED, {"sha256": SHA, "size": 10, "store_path": "store/x"}),
                               (State.SEALED, {"manifest_sha256": SHA}), (State.SENDING, {})):
            self.catalog.transition(record.file_id, state, **columns)
        return record.file_id

    def deliver(self, suffix: str, payload: bytes) -> None:
        message = mqtt.MQTTMessage(topic=f"{ROOT}/{AGENT}/{suffix}".encode())
        message.payload = payload
        self.uplink._on_message(self.uplink.client, None, message)
        self.uplink._drain_inbox()


@pytest.fixture(scope="module")
def uplink_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UplinkBench]:
    bench = UplinkBench(tmp_path_factory.mktemp("uplink"))
    yield bench
    bench.catalog.close()


def _hostile(file_id: str) -> st.SearchStrategy[bytes]:
    """Hostile structure: nesting past the parser's recursion limit (open or closed), oversized, not UTF-8
    or another encoding, JSON's non-standard literals, duplicate keys, lone surrogates, wrong types in
    known fields."""
    deep = st.tuples(st.integers(min_value=900, max_value=150_000), st.sampled_from([b"[", b'{"a":', b'[{"k":']))
    closed = st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n)
    known = st.sampled_from(["file_id", "state", "have", "sha256", "reason"])
    typed = st.tuples(known, json_values | st.integers(min_value=2**63, max_value=2**80)).map(
        lambda kv: json.dumps({"file_id": file_id, "state": "receiving", kv[0]: kv[1]}).encode())
    deep_field = st.tuples(known, st.integers(min_value=1, max_value=3000)).map(
        lambda kv: b'{"file_id":"%s","state":"receiving","%s":' % (file_id.encode(), kv[0].encode())
        + b"[" * kv[1] + b"]" * kv[1] + b"}")
    return st.one_of(
        deep.map(lambda t: t[1] * t[0]), closed, typed, deep_field,
        st.binary(max_size=64).map(lambda b: b"\xff" + b),
        st.text(max_size=40).map(lambda t: json.dumps({"file_id": file_id, "state": t}).encode("utf-16")),
        st.sampled_from([b'{"file_id": NaN}', b"[Infinity, -Infinity]", b'{"state": "complete", "state": 1}',
                         b'"\\ud800"', b"\x00", b"", b'{"file_id": "\\udfff", "state": "receiving"}']),
        st.integers(min_value=1024 * 1024 + 1, max_value=1024 * 1024 + 64).map(lambda n: b" " * n),
    )


def _acks(file_id: str) -> st.SearchStrategy[bytes]:
    shaped = st.fixed_dictionaries(
        {"file_id": st.sampled_from([file_id]) | ulids, "state": st.sampled_from(["receiving", "complete", "rejected"])
         | st.text(max_size=10),
         "have": st.lists(st.lists(st.integers(min_value=-5, max_value=2**63), min_size=0, max_size=3), max_size=4),
         "sha256": st.none() | hexes | st.just(SHA) | st.text(max_size=70),
         "reason": st.none() | st.text(max_size=50)},
        optional={"extra": json_values}).map(lambda d: json.dumps(d).encode())
    return st.one_of(shaped, st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                     _hostile(file_id))


@given(data=st.data())
@FUZZ
def test_any_ack_is_handled_and_only_a_valid_verdict_moves_a_file(uplink_bench: UplinkBench, data: st.DataObject,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    file_id = uplink_bench.sending_file()
    payload = data.draw(_acks(file_id))
    before = _files_snapshot(uplink_bench.catalog)
    caplog.clear()
    uplink_bench.deliver("acks", payload)
    after = _files_snapshot(uplink_bench.catalog)
    if after == before:
        return
    # The only changes the protocol allows: our file settled by a well-formed complete or rejected ack.
    ack = json.loads(payload)
    state = uplink_bench.catalog.get(file_id).state
    assert ack["file_id"] == file_id and ack["state"] in ("complete", "rejected")
    if state == State.SYNCED:
        assert ack["state"] == "complete" and ack["sha256"] == SHA
    else:
        assert state == State.REJECTED
    changed = {row[0] for row in set(after) ^ set(before)}
    assert changed == {file_id}


COMMANDS = (st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
            | st.fixed_dictionaries({"cmd": st.text(max_size=70), "id": st.text(max_size=130),
                                     "ts": st.integers(min_value=-(2**64), max_value=2**64)},
                                    optional={"sig": st.text(max_size=90), "key_id": st.text(max_size=30),
                                              "agent": st.sampled_from([AGENT, "other"])})
            .map(lambda d: json.dumps(d).encode())
            | _hostile("01M8S59DRAPF60WNZD2ETQF4WQ"))


@given(payload=COMMANDS)
@FUZZ
def test_any_command_payload_is_refused_without_a_platform_signature(uplink_bench: UplinkBench, payload: bytes,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    before = _files_snapshot(uplink_bench.catalog)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        uplink_bench.deliver("commands", payload)
    assert uplink_bench.obeyed == []
    assert _files_snapshot(uplink_bench.catalog) == before
    assert any(r.levelno >= logging.WARNING and ("command dropped" in r.getMessage()
                                                 or "command refused" in r.getMessage()) for r in caplog.records)


BARRAGE_FILE = "01M8S59DRAPF60WNZD2ETQF4WQ"
BARRAGE = [
    b"[" * 100_000, b'{"a":' * 60_000, b"[" * 3000 + b"]" * 3000, b"\xff\xfe\x00\x01",              # depth, encodings
    json.dumps({"file_id": BARRAGE_FILE, "state": "receiving"}).encode("utf-16"), b"\x00" * 64, b"",
    b" " * (2 * 1024 * 1024), b"[" + b"0," * 700_000 + b"0]",                                         # size
    b'{"file_id": 1, "state": ["complete"]}', b'{"file_id": "%s", "state": "receiving", "have": [[0, 1e400]]}'
    % BARRAGE_FILE.encode(), b'{"file_id": "%s", "state": "complete", "sha256": {"a": []}}' % BARRAGE_FILE.encode(),
    b'{"cmd": "resync", "id": [], "ts": "now"}', b'{"cmd": "resync", "id": "x", "ts": 1, "sig": null}',  # types
    b'{"file_id": NaN}', b'"\\ud800"', b'{"state": "complete", "state": 1}',                       # literals
]


def test_after_a_hostile_barrage_on_acks_and_commands_the_agent_is_live_and_a_docked_file_syncs(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Liveness, not just no crash: every hostile message is dropped by the parser (the callback guard is
    never needed), and a file docked after the barrage syncs through the same process."""
    log = sync_after(tmp_path, mosquitto.port, BARRAGE)
    assert log.count("ack dropped") >= len(BARRAGE) - 1    # one may be a valid no-op (receiving, no have)
    assert log.count("command dropped") + log.count("command refused") >= len(BARRAGE)
    assert "mqtt callback failed" not in log and "Traceback" not in log


# -- the receiver's side: manifests, chunks, queries ----------------------------------------------------


class ReceiverBench:
    """A real Receiver (not connected) with one genuine transfer half done: manifest and chunk 0 held."""

    def __init__(self, tmp: Path):
        self.key = AgentKey(Ed25519PrivateKey.generate())
        keys = tmp / "keys"
        keys.mkdir()
        (keys / f"{AGENT}.pem").write_text(self.key.public_pem())
        self.store_dir = tmp / "store"
        cfg = parse_receiver_config({"receiver": {"store_dir": str(self.store_dir), "keys_dir": str(keys),
                                                  "max_chunk_kib": 64}})
        self.receiver = Receiver(cfg)
        self.begin()

    def begin(self) -> None:
        """Start a fresh genuine transfer: its manifest and chunk 0 are held."""
        self.file_id = new_id()
        self.content = os.urandom(3 * CHUNK + 100)
        self.manifest = self.key.sign({
            "v": 1, "type": "file", "file_id": self.file_id, "agent_id": AGENT, "size": len(self.content),
            "sha256": hashlib.sha256(self.content).hexdigest(), "chunk_size": CHUNK, "prev": "0" * 64})
        self.manifest_bytes = canonical_json(self.manifest)
        self.chunks = [self.chunk(seq) for seq in range(4)]
        self.receiver.handle(self.topic("manifest"), self.manifest_bytes)
        self.receiver.handle(self.topic("chunk"), self.chunks[0])

    def topic(self, kind: str, file_id: str | None = None) -> str:
        return f"{ROOT}/{AGENT}/files/{file_id or self.file_id}/{kind}"

    def chunk(self, seq: int) -> bytes:
        data = self.content[seq * CHUNK:(seq + 1) * CHUNK]
        return encode_chunk(ChunkHeader(seq, seq * CHUNK, len(data), hashlib.sha256(data).hexdigest()), data)

    def snapshot(self) -> dict[str, bytes]:
        return {str(p.relative_to(self.store_dir)): p.read_bytes()
                for p in sorted(self.store_dir.rglob("*")) if p.is_file() and "locks" not in p.parts}


@pytest.fixture(scope="module")
def receiver_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiverBench]:
    bench = ReceiverBench(tmp_path_factory.mktemp("receiver"))
    yield bench
    bench.receiver.store.close()


def _mutated(genuine: bytes, data: st.DataObject) -> bytes:
    """A genuine message with bytes flipped, cut or extended."""
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip" and genuine:
        i = data.draw(st.integers(0, len(genuine) - 1))
        return genuine[:i] + bytes([genuine[i] ^ data.draw(st.integers(1, 255))]) + genuine[i + 1:]
    if how == "cut":
        return genuine[:data.draw(st.integers(0, max(len(genuine) - 1, 0)))]
    return genuine + data.draw(st.binary(min_size=1, max_size=50))


def _decodes_to(payload: bytes, doc: object) -> bool:
    """`payload` is JSON whose value is exactly `doc`."""
    try:
        return json.loads(payload) == doc
    except ValueError:   # not JSON, or not UTF-8
        return False


def _frames(data: st.DataObject) -> bytes:
    """A chunk frame around an arbitrary header: any JSON, any declared length."""
    header = data.draw(st.fixed_dictionaries(
        {"seq": st.integers(-1, 2**64), "offset": st.integers(-1, 2**64), "size": st.integers(-1, 2**27),
         "sha256": hexes | st.text(max_size=70)}) | json_values)
    head = json.dumps(header).encode()
    body = data.draw(st.binary(max_size=200))
    length = data.draw(st.sampled_from([len(head), 0, 2**32 - 1, len(head) + 1, max(len(head) - 1, 0)]))
    return struct.pack(">I", length) + head + body


@given(data=st.data())
@FUZZ
def test_no_malformed_or_forged_message_disturbs_a_transfer_in_progress(receiver_bench: ReceiverBench,
                                                                        data: st.DataObject,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    bench = receiver_bench
    kind = data.draw(st.sampled_from(["manifest", "chunk", "query", "topic"]))
    topic = bench.topic(kind if kind != "topic" else "chunk")
    if kind == "manifest":
        forged = {**bench.manifest, data.draw(st.sampled_from(["size", "sha256", "chunk_size", "agent_id"])):
                  data.draw(json_values)}
        stranger = AgentKey(Ed25519PrivateKey.generate())
        payload = data.draw(st.sampled_from([json.dumps(forged, sort_keys=True).encode(),
                                             _mutated(bench.manifest_bytes, data),
                                             canonical_json(stranger.sign(bench.manifest))]))
    elif kind == "chunk":
        payload = data.draw(st.sampled_from([_mutated(bench.chunks[1], data), _frames(data)]))
    elif kind == "query":
        payload = data.draw(st.binary(max_size=100))
    else:
        topic = data.draw(st.sampled_from([f"{ROOT}/{AGENT}/files/{bench.file_id}/junk",
                                           f"{ROOT}/{AGENT}/files/x/chunk", f"{ROOT}/{AGENT}/files",
                                           f"{ROOT}/../files/{bench.file_id}/chunk"]))
        payload = data.draw(st.binary(max_size=100))
    if payload in (bench.chunks[1], bench.manifest_bytes):
        return   # a mutation that changed nothing is the genuine message
    before = bench.snapshot()
    left_out = bench.receiver.warnings_left_out
    caplog.clear()
    with caplog.at_level(logging.INFO):
        bench.receiver.handle(topic, payload)
    after = bench.snapshot()
    # Bad input changes nothing (G6): not the transfer in progress, not the store.
    assert after == before, f"{kind} message changed the receiver's store: {payload[:80]!r}"
    # A manifest extended by JSON whitespace (a tab, a newline) is the genuine manifest in other bytes: the receiver
    # takes it as the resend it is (it stores the canonical form, so nothing changes) and has nothing to warn of.
    genuine = kind == "manifest" and _decodes_to(payload, json.loads(bench.manifest_bytes))
    if kind != "query" and not genuine:   # logged, or (a per-chunk warning, rate-limited) counted into the next one
        assert any(r.levelno >= logging.WARNING for r in caplog.records) or (
            bench.receiver.warnings_left_out == left_out + 1), f"not logged: {kind} {topic} {payload[:60]!r}"


def test_the_genuine_transfer_still_completes_after_the_fuzzing(receiver_bench: ReceiverBench) -> None:
    bench = receiver_bench
    for chunk in bench.chunks[1:]:
        bench.receiver.handle(bench.topic("chunk"), chunk)
    key = (AGENT, bench.file_id)
    ack = bench.receiver.store.progress(AGENT, bench.file_id, bench.manifest)
    assert ack.state == "complete", ack
    assert bench.receiver.store.stored(*key)["sha256"] == hashlib.sha256(bench.content).hexdigest()


def _chain_message(bench: ReceiverBench) -> tuple[bytes, bytes]:
    """The agent's chain as the receiver holds it (document 1, held once), and the genuine document 2."""
    if not hasattr(bench, "chain_first"):
        first = bench.key.sign({"v": 1, "type": "annotation", "agent_id": AGENT, "annotation_id": "a1",
                                "prev": "0" * 64})
        bench.chain_first = canonical_json({"seq": 1, "doc": first})
        bench.receiver.handle(f"{ROOT}/{AGENT}/chain/doc", bench.chain_first)
        second = bench.key.sign({"v": 1, "type": "annotation", "agent_id": AGENT, "annotation_id": "a2",
                                 "prev": hashlib.sha256(canonical_json(first)).hexdigest()})
        bench.chain_second = canonical_json({"seq": 2, "doc": second})
    return bench.chain_first, bench.chain_second


def _same_json(payload: bytes, genuine: bytes) -> bool:
    try:
        value = json.loads(payload)
    except ValueError:
        return False
    return value == json.loads(genuine) and all(type(a) is type(b) for a, b in ((value.get("seq"), 2),)
                                                if isinstance(value, dict))


@given(data=st.data())
@FUZZ
def test_no_malformed_or_forged_chain_message_changes_the_held_chain(receiver_bench: ReceiverBench,
                                                                     data: st.DataObject,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    bench = receiver_bench
    first, second = _chain_message(bench)
    kind = data.draw(st.sampled_from(["doc", "query", "topic"]))
    topic = f"{ROOT}/{AGENT}/chain/{kind}"
    if kind == "doc":
        doc = json.loads(second)["doc"]
        stranger = AgentKey(Ed25519PrivateKey.generate())
        payload = data.draw(st.sampled_from([
            _mutated(second, data),
            json.dumps({"seq": data.draw(json_values), "doc": doc}).encode(),
            json.dumps({"seq": 2.0, "doc": doc}).encode(),
            json.dumps({"seq": 2, "doc": {**doc, data.draw(st.sampled_from(["prev", "agent_id", "type", "sig"])):
                                          data.draw(json_values)}}).encode(),
            canonical_json({"seq": 2, "doc": stranger.sign(doc)}),
            json.dumps(data.draw(json_values)).encode()]))
    elif kind == "query":
        payload = data.draw(st.sampled_from([data.draw(st.binary(max_size=100)),
                                             json.dumps({"head": data.draw(json_values)}).encode()]))
    else:
        topic = data.draw(st.sampled_from([f"{ROOT}/{AGENT}/chain/delete", f"{ROOT}/{AGENT}/chain/doc/x",
                                           f"{ROOT}/bad agent/chain/doc"]))
        payload = second
    if kind == "doc" and _same_json(payload, second):
        return   # a mutation that changed nothing (or only the spacing) is the genuine message
    before = held(bench)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        bench.receiver.handle(topic, payload)
    if kind == "query" and not caplog.records:
        return   # a well-formed query (any head at or above the held one) is answered, not refused
    assert held(bench) == before or kind == "query", f"chain message changed the held chain: {payload[:80]!r}"
    if _genuine_elsewhere(payload, second):
        return   # the genuine document at another seq: a gap (answered with the head) or a fork (refused)
    assert any(r.levelno >= logging.WARNING for r in caplog.records), f"not logged: {topic} {payload[:60]!r}"


def held(bench: ReceiverBench) -> dict[str, bytes]:
    """The store without the refusals it keeps for an investigator (`chains/<a>/refused/`: a fork is kept)."""
    return {path: data for path, data in bench.snapshot().items() if "/refused/" not in path}


def _genuine_elsewhere(payload: bytes, genuine: bytes) -> bool:
    try:
        value = json.loads(payload)
    except ValueError:
        return False
    return (isinstance(value, dict) and value.get("doc") == json.loads(genuine)["doc"]
            and type(value.get("seq")) is int and value["seq"] != 2)


def test_the_genuine_chain_document_is_still_held_after_the_fuzzing(receiver_bench: ReceiverBench) -> None:
    bench = receiver_bench
    _first, second = _chain_message(bench)
    bench.receiver.handle(f"{ROOT}/{AGENT}/chain/doc", second)
    assert bench.receiver.chain.store.head(AGENT)[0] == 2
    assert bench.receiver.chain.dropped > 0


def _hostile_payloads(kind: str) -> list[bytes]:
    """Payloads of hostile structure rather than hostile values: depth, size, types, encodings."""
    deep = [b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b'{"sha256":' + b"[" * 20_000]
    sized = [b'{"size": ' + b"9" * 100_000 + b"}", b'"' + b"x" * 300_000 + b'"', b"{}" * 100_000]
    typed = [b"[]", b"null", b"1e999", b"NaN", b'{"size": {"size": []}, "chunk_size": "4096"}', b'"manifest"',
             b'{"file_id": 1, "agent_id": null, "sha256": true}']
    encoded = ["{}".encode("utf-16"), b"\xef\xbb\xbf{}", b'{"a": "\xff\xfe"}', b"\xc0\x80", b"\x00" * 64,
               b'{"a": "\\ud800"}']
    payloads = deep + sized + typed + encoded
    if kind == "chunk":   # the same inside a chunk frame's header, and frames whose length lies
        payloads = [struct.pack(">I", min(len(p), 4096)) + p[:4096] + b"data" for p in payloads]
        payloads += [struct.pack(">I", 2**32 - 1), b"\x00\x00", struct.pack(">I", 3) + b"[1]"]
    return payloads


@pytest.mark.parametrize("kind", ["manifest", "chunk", "query"])
def test_hostile_structure_on_each_receiver_topic_is_survived_and_a_good_file_then_completes(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    bench = ReceiverBench(tmp_path)
    try:
        before = bench.snapshot()
        for payload in _hostile_payloads(kind):
            for file_id in (bench.file_id, new_id()):   # the transfer in progress, and a file never seen
                bench.receiver.handle(bench.topic(kind, file_id), payload)   # never raises
        assert bench.snapshot() == before, f"hostile {kind} messages changed the store"
        for chunk in bench.chunks[1:]:   # liveness: the genuine transfer completes, and so does a new file
            bench.receiver.handle(bench.topic("chunk"), chunk)
        assert bench.receiver.store.progress(AGENT, bench.file_id, bench.manifest).state == "complete"
        bench.begin()
        for chunk in bench.chunks[1:]:
            bench.receiver.handle(bench.topic("chunk"), chunk)
        assert bench.receiver.store.progress(AGENT, bench.file_id, bench.manifest).state == "complete"
    finally:
        bench.receiver.store.close()


def test_hostile_chain_acks_are_dropped_and_counted_and_a_forged_receipt_is_not_kept(
        uplink_bench: UplinkBench) -> None:
    bench = uplink_bench
    before = bench.uplink.chain_acks_dropped
    hostile = _hostile_payloads("chain_acks")
    for payload in hostile:
        bench.deliver("chain_acks", payload)                 # never raises
    assert bench.uplink.chain_acks_dropped - before == len(hostile)
    stranger = AgentKey(Ed25519PrivateKey.generate())
    forged = stranger.sign({"v": 1, "type": "chain_receipt", "agent_id": AGENT, "seq": 1, "sha256": SHA})
    bench.deliver("chain_acks", canonical_json({"state": "held", "seq": 1, "sha256": SHA, "receipt": forged}))
    assert bench.catalog.chain_receipts.get() is None, "a receipt from no pinned receiver key is kept"
    assert bench.uplink.chain.unverified >= 1
    bench.deliver("chain_acks", canonical_json({"state": "refused", "seq": 1, "refusal": "rewind", "reason": "x",
                                                "receipt": forged}))
    assert bench.uplink.chain.refused is None, "an unsigned refusal stopped the chain stream"
