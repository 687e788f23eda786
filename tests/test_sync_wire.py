"""Wire protocol v1 pieces without a broker: chunk frames, ranges, topics, schemas, backoff, the bandwidth cap."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
import zlib

import pytest

from edge_agent.protocol.pacing import Backoff, TokenBucket
from edge_agent.protocol.wire import (
    Ack,
    ChunkHeader,
    RangeSet,
    WireError,
    chunk_check,
    chunk_count,
    chunk_data_check,
    chunk_span,
    decode_chunk,
    decode_json,
    encode_chunk,
    parse_file_topic,
    to_ranges,
    validate,
)

FILE_ID = "01M8A4CX94HKS6DD50ABZSJKXQ"


def test_chunk_frame_round_trips() -> None:
    data = bytes(range(256)) * 10
    header = ChunkHeader(3, 3 * 2560, len(data), hashlib.sha256(data).hexdigest())
    payload = encode_chunk(header, data)
    (length,) = struct.unpack(">I", payload[:4])
    assert json.loads(payload[4:4 + length]) == {"seq": 3, "offset": 7680, "size": 2560, "sha256": header.check}
    decoded, body = decode_chunk(payload)
    assert decoded == header and bytes(body) == data


def test_a_crc32_chunk_frame_round_trips_and_is_checked_as_crc32() -> None:
    """This version's agents send the chunk's CRC-32 (zlib's, 8 hex digits) in place of its SHA-256; the
    receiver's checker computes the kind the header names, so it costs one CRC pass, not a SHA-256 pass."""
    data = bytes(range(256)) * 10
    crc = f"{zlib.crc32(data):08x}"
    header = ChunkHeader(3, 3 * 2560, len(data), crc)
    assert header.check_name == "crc32"
    payload = encode_chunk(header, data)
    (length,) = struct.unpack(">I", payload[:4])
    assert json.loads(payload[4:4 + length]) == {"seq": 3, "offset": 7680, "size": 2560, "crc32": crc}
    decoded, body = decode_chunk(payload)
    assert decoded == header and bytes(body) == data
    assert chunk_data_check(payload) == crc
    old = encode_chunk(ChunkHeader(3, 3 * 2560, len(data), hashlib.sha256(data).hexdigest()), data)
    assert chunk_data_check(old) == hashlib.sha256(data).hexdigest()   # an older agent's header: SHA-256
    assert chunk_check(data, crc) == crc and chunk_check(data, "0" * 64) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fields, message", [
    ({"crc32": "0000000"}, "crc32"),                      # 7 digits
    ({"crc32": "0000000G"}, "crc32"),                     # not hex
    ({"crc32": "ABCDEF01"}, "crc32"),                     # upper case
    ({"crc32": 12345678}, "crc32"),                       # not a string
    ({"crc32": "0" * 64}, "crc32"),                       # a SHA-256's length under crc32's name
    ({"sha256": "0" * 8}, "sha256"),                      # and the other way round
    ({"crc32": "00000000", "sha256": "0" * 64}, "chunk-header"),   # both: exactly one check
    ({}, "chunk-header"),                                 # neither
])
def test_a_malformed_chunk_check_is_refused(fields: dict, message: str) -> None:
    head = json.dumps({"seq": 0, "offset": 0, "size": 1, **fields}).encode()
    with pytest.raises(WireError, match=message):
        decode_chunk(struct.pack(">I", len(head)) + head + b"x")


@pytest.mark.parametrize("payload, message", [
    (b"\0\0", "shorter than the 4-byte header length"),
    (struct.pack(">I", 999_999) + b"{}", "header length"),
    (struct.pack(">I", 5) + b"{oops", "not valid UTF-8 JSON"),
    (struct.pack(">I", 2) + b"[]", "chunk-header"),
    (encode_chunk(ChunkHeader(0, 0, 4, "0" * 64), b"abc"), "carries 3"),
])
def test_malformed_chunk_frames_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_chunk(payload)


def test_wrong_types_in_a_chunk_header_are_refused() -> None:
    head = json.dumps({"seq": "1", "offset": 0, "size": 1, "sha256": "0" * 64}).encode()
    with pytest.raises(WireError, match="seq"):
        decode_chunk(struct.pack(">I", len(head)) + head + b"x")


def test_chunk_spans_cover_the_file_exactly() -> None:
    for size, chunk in [(0, 4), (1, 4), (4, 4), (5, 4), (1_000_003, 262144)]:
        spans = [chunk_span(s, size, chunk) for s in range(chunk_count(size, chunk))]
        assert sum(length for _, length in spans) == size
        assert all(offset == i * chunk for i, (offset, _) in enumerate(spans))


def test_have_ranges_merge_and_answer_membership() -> None:
    assert to_ranges([5, 1, 2, 3, 9, 10, 3]) == [[1, 3], [5, 5], [9, 10]]
    have = RangeSet([[9, 10], [1, 3], [4, 4], [5, 5]])
    assert have.ranges() == [[1, 5], [9, 10]]
    assert [s for s in range(12) if s in have] == [1, 2, 3, 4, 5, 9, 10]
    assert len(have) == 7


@pytest.mark.parametrize("topic", [
    "other/ws-1/files/01M8A4CX94HKS6DD50ABZSJKXQ/chunk",
    "evidence/v1/ws-1/files/01M8A4CX94HKS6DD50ABZSJKXQ",
    "evidence/v1/ws-1/files/not-a-ulid/chunk",
    "evidence/v1/ws 1/files/01M8A4CX94HKS6DD50ABZSJKXQ/chunk",
    "evidence/v1/ws-1/files/01M8A4CX94HKS6DD50ABZSJKXQ/delete",
])
def test_topics_outside_the_protocol_are_refused(topic: str) -> None:
    with pytest.raises(WireError):
        parse_file_topic("evidence/v1", topic)


def test_messages_match_their_published_schemas() -> None:
    assert parse_file_topic("evidence/v1", f"evidence/v1/ws-1/files/{FILE_ID}/query").kind == "query"
    decode_json(Ack(FILE_ID, "receiving", [[0, 3]]).encode(), "ack")
    decode_json(Ack(FILE_ID, "complete", [], "a" * 64).encode(), "ack")
    decode_json(Ack(FILE_ID, "rejected", [], None, "why").encode(), "ack")
    with pytest.raises(WireError):
        decode_json(Ack(FILE_ID, "rejected", [], None, None).encode(), "ack")   # a rejection needs its reason
    with pytest.raises(WireError):
        decode_json(Ack(FILE_ID, "complete", [], None).encode(), "ack")          # complete names the hash
    validate("status", {"state": "online", "ts": 1, "version": "0.1.0"})
    validate("command", {"cmd": "resync", "id": "c-1", "ts": 1})
    validate("event", {"type": "alarm", "ts": 1, "state": "raised", "key": "k", "kind": "sync_rejected",
                       "subject": FILE_ID, "message": "m"})
    decode_json(b"{}", "query")


def test_the_fast_checks_of_chunk_headers_and_acks_are_never_looser_than_their_schemas() -> None:
    """The data path's messages skip jsonschema when a plain check accepts them (wire._FAST_PATH). Every value
    that check accepts must be one the schema accepts, and the usual shapes must take the fast path."""
    import jsonschema

    from edge_agent.protocol.wire import _FAST_PATH, schema

    header = {"seq": 3, "offset": 3 * 524288, "size": 524288, "sha256": "ab" * 32}
    crc_header = {"seq": 3, "offset": 3 * 524288, "size": 524288, "crc32": "0a1b2c3d"}
    headers = [header, {**header, "seq": 0, "offset": 0, "size": 1}, {**header, "seq": 2**53 - 1}, crc_header]
    bad_headers = [{**header, "seq": -1}, {**header, "seq": 2**53}, {**header, "seq": True}, {**header, "size": 0},
                   {**header, "size": 2**26 + 1}, {**header, "offset": 1.0}, {**header, "sha256": "AB" * 32},
                   {**header, "sha256": "ab" * 32 + "\n"}, {**header, "sha256": "ab" * 31}, {**header, "x": 1},
                   {k: v for k, v in header.items() if k != "size"}, [header], "header", None,
                   {**crc_header, "crc32": "0A1B2C3D"}, {**crc_header, "crc32": "0a1b2c3"},
                   {**crc_header, "crc32": "0a1b2c3d\n"}, {**crc_header, "crc32": 168496189},
                   {**crc_header, "sha256": "ab" * 32}, {**crc_header, "crc32": None},
                   {"seq": 3, "offset": 0, "size": 1, "sha256": "0a1b2c3d"},
                   {"seq": 3, "offset": 0, "size": 1, "crc32": "ab" * 32}]
    ack = {"file_id": FILE_ID, "state": "receiving", "have": [[0, 15], [17, 17]]}
    acks = [ack, {"file_id": FILE_ID, "state": "receiving"}, {**ack, "sha256": None, "reason": "busy"},
            {**ack, "reason": None, "sha256": "0" * 64}, {**ack, "chunk_checks": ["crc32", "sha256"]},
            {**ack, "chunk_checks": []}, {**ack, "max_queued": 512, "max_queued_bytes": 192 * 2**20},
            {**ack, "max_queued": 1}]
    bad_acks = [{**ack, "have": [[0]]}, {**ack, "have": [[0, -1]]}, {**ack, "have": [[0, True]]},
                {**ack, "have": [(0, 1)]}, {**ack, "file_id": FILE_ID.lower()}, {**ack, "state": "complete"},
                {**ack, "reason": "x" * 1001}, {**ack, "sha256": "g" * 64}, {**ack, "receipt": {}},
                {"state": "receiving", "have": []}, {**ack, "have": {}}, None, {**ack, "chunk_checks": "crc32"},
                {**ack, "chunk_checks": [1]}, {**ack, "chunk_checks": ["x" * 17]}, {**ack, "chunk_checks": ["a"] * 9},
                {**ack, "chunk_checks": None}, {**ack, "max_queued": 0}, {**ack, "max_queued": 1.0},
                {**ack, "max_queued": True}, {**ack, "max_queued": "512"}, {**ack, "max_queued_bytes": -1},
                {**ack, "max_queued_bytes": 2**53}, {**ack, "max_queued": None}]
    for name, good, bad in (("chunk-header", headers, bad_headers), ("ack", acks, bad_acks)):
        fast, full = _FAST_PATH[name], jsonschema.Draft202012Validator(schema(name))
        for value in good:
            assert fast(value) and full.is_valid(value), (name, value)
        for value in bad:
            assert not fast(value), (name, value)
            if not full.is_valid(value):
                with pytest.raises(WireError):
                    validate(name, value)   # the full validator still refuses it, with its reason


def test_a_chunk_frame_filled_in_place_is_the_encoded_chunk(tmp_path) -> None:
    """The agent reads each chunk straight into its frame (sender.prepare_chunk, wire.chunk_frame): the same
    bytes as encode_chunk, for the last (short) chunk too; a file shorter than its manifest gives no frame."""
    from edge_agent.sync.sender import prepare_chunk

    data = random.Random(7).randbytes(2 * 1000 + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    for seq in range(3):
        offset, length = chunk_span(seq, len(data), 1000)
        chunk = data[offset:offset + length]
        frame = prepare_chunk(path, seq, len(data), 1000)
        assert frame == encode_chunk(ChunkHeader(seq, offset, length, hashlib.sha256(chunk).hexdigest()), chunk)
        header, body = decode_chunk(bytes(frame))
        assert (header.seq, bytes(body)) == (seq, chunk)
        frame = prepare_chunk(path, seq, len(data), 1000, check="crc32")
        assert frame == encode_chunk(ChunkHeader(seq, offset, length, f"{zlib.crc32(chunk):08x}"), chunk)
    assert prepare_chunk(path, 2, len(data) + 1, 1000) is None   # the manifest says one byte more
    assert prepare_chunk(path, 2, len(data) + 1, 1000, check="crc32") is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(1, 60, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    ceilings = [min(60, 2**i) for i in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[8:]) > 8          # it does grow
    many = [Backoff(1, 60, rng=random.Random(i)) for i in range(500)]
    for b in many:
        b.attempt = 10
    spread = sorted(b.next_delay() for b in many)
    assert spread[50] < 10 and spread[450] > 50   # 500 agents do not come back together
    backoff.reset()
    assert backoff.next_delay() <= 1


def test_token_bucket_holds_the_average_rate() -> None:
    bucket = TokenBucket(rate_bps=2_000_000, burst=100_000)
    started = time.monotonic()
    for _ in range(30):
        bucket.consume(100_000)
    elapsed = time.monotonic() - started
    rate = 3_000_000 / elapsed
    assert 1_800_000 < rate < 2_100_000 * 1.05


def test_asyncapi_document_names_every_schema_and_they_exist() -> None:
    from pathlib import Path

    import yaml

    docs = Path(__file__).resolve().parents[1] / "docs"
    spec = yaml.safe_load((docs / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert spec["asyncapi"].startswith("3.")
    refs = {m["payload"]["$ref"] for m in spec["components"]["messages"].values() if "$ref" in m["payload"]}
    for ref in refs:
        assert (docs / ref).resolve().is_file(), ref
    assert {Path(r).stem for r in refs} == {"status", "health", "event", "manifest", "query", "ack", "command",
                                            "chain-doc", "chain-query", "chain-ack", "platform-event"}


def test_the_paho_internals_our_client_overrides_are_there() -> None:
    """connection.Client overrides private parts of paho to save its copies of large messages; a paho release
    without them gets stock clients (correct, slower) and a warning, and this test fails so that it is noticed."""
    from edge_agent.protocol import connection

    assert connection.paho_internals_present() and connection._COPYLESS
    assert type(connection.build_client(connection.MqttSection(), "probe")) is connection.Client


def test_a_large_packet_is_queued_as_a_view_of_itself_not_copied() -> None:
    """paho sends `packet[pos:]`: of a bytearray that is a copy per send, of a memoryview none
    (connection.Client); small packets stay as paho made them. The bytes on the wire are the ones built."""
    from paho.mqtt.client import PUBLISH

    from edge_agent.config import MqttSection
    from edge_agent.protocol.connection import VIEWED_PACKET_BYTES, build_client

    client = build_client(MqttSection(), "view-test")
    large, small = bytearray(random.Random(1).randbytes(VIEWED_PACKET_BYTES + 1)), bytearray(b"\x30\x02ab")
    client._packet_queue(PUBLISH, large, 1, 1)   # not connected: it stays queued
    client._packet_queue(PUBLISH, small, 2, 1)
    queued = [p["packet"] for p in client._out_packet]
    assert type(queued[0]) is memoryview and queued[0].obj is large and bytes(queued[0][5:]) == bytes(large[5:])
    assert queued[1] is small


@pytest.mark.parametrize("qos", [0, 1])
def test_a_large_publish_reaches_on_message_whole_while_paho_decodes_only_its_header(
        mosquitto, monkeypatch: pytest.MonkeyPatch, qos: int) -> None:
    """connection.Client cuts a large PUBLISH's payload off once and lets paho decode the rest (paho's own decode
    copies the whole remainder at every field): topic, QoS, properties and every payload byte still arrive, and
    paho's decoder never sees the payload. A small message is left to paho as it is."""
    import queue

    import paho.mqtt.client as mqtt
    from paho.mqtt import _packet
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_agent.config import MqttSection
    from edge_agent.protocol.connection import VIEWED_PACKET_BYTES, build_client

    decoded: list[int] = []
    real = _packet.decode_publish
    monkeypatch.setattr(_packet, "decode_publish", lambda h, p, v: decoded.append(len(p)) or real(h, p, v))
    got: queue.Queue = queue.Queue()
    receiver = build_client(MqttSection(), f"big-in-{qos}")
    receiver.on_message = lambda _c, _u, m: got.put((m.topic, m.qos, m.payload, m.properties))
    receiver.on_subscribe = lambda *_: got.put("subscribed")
    receiver.connect("127.0.0.1", mosquitto.port)
    receiver.loop_start()
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"big-out-{qos}", protocol=mqtt.MQTTv5)
    sender.connect("127.0.0.1", mosquitto.port)
    sender.loop_start()
    try:
        receiver.subscribe("big/#", qos=1)
        assert got.get(timeout=10) == "subscribed"
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("k", "v")
        large, small = random.Random(qos).randbytes(VIEWED_PACKET_BYTES * 8 + 3), b"small"
        sender.publish("big/one", large, qos=qos, properties=props).wait_for_publish(10)
        sender.publish("big/two", small, qos=qos).wait_for_publish(10)
        topic, got_qos, payload, properties = got.get(timeout=10)
        assert (topic, got_qos, payload, type(payload)) == ("big/one", qos, large, bytes)
        assert properties.UserProperty == [("k", "v")]
        assert got.get(timeout=10)[:3] == ("big/two", qos, small)
    finally:
        for client in (sender, receiver):
            client.disconnect()
            client.loop_stop()
    assert max(decoded) < 200, decoded   # the headers only (a 5-byte message is decoded whole: it is small)
