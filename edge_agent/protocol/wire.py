"""Wire protocol v1 (DESIGN.md section 5): topics, the chunk frame, acks and `have` ranges.

Both ends import this module, so the agent and the reference receiver cannot
disagree on a byte. Everything here is pure: no I/O, no MQTT client.

Chunk frame: 4-byte big-endian header length N, then N bytes of UTF-8 JSON
`{"seq","offset","size","crc32"}` (or `"sha256"` in place of `"crc32"`: older agents, and any agent until the
receiver's acks list crc32; receivers take both), then exactly `size` bytes of the file starting at `offset`.
Chunk `seq` of a file with chunk size C covers bytes `[seq*C, min((seq+1)*C, size))`; a 0-byte file has no
chunks.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from edge_agent.protocol.canonical import canonical_json

PROTOCOL_VERSION = 2   # the default root is evidence/v2 (docs/PROTOCOL.md section 8)
HEADER_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 4096
FILE_ID_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")   # a ULID, Crockford base32
AGENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

ACK_RECEIVING, ACK_COMPLETE, ACK_REJECTED = "receiving", "complete", "rejected"
REASON_BUSY = "busy"   # `receiving` with this reason: the receiver cannot take a new transfer now; ask again later
# The chunk checks a receiver of this version takes, announced in its acks (`chunk_checks`): an agent sends `crc32`
# only to a receiver that announced it, `sha256` (what every receiver takes) otherwise (docs/PROTOCOL.md 3).
CHECK_CRC32, CHECK_SHA256 = "crc32", "sha256"
CHUNK_CHECKS = (CHECK_CRC32, CHECK_SHA256)
# What a receiver before `max_queued` (in its acks) queued of one agent's messages, and their bytes, before it dropped
# the rest: an agent that heard no `max_queued` keeps its unacknowledged chunks within these (docs/PROTOCOL.md 4).
LEGACY_MAX_QUEUED, LEGACY_MAX_QUEUED_BYTES = 256, 64 * 1024**2


class WireError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong with it."""


# -- topics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Every topic of one agent under `root`."""

    root: str
    agent_id: str

    def agent(self, suffix: str) -> str:
        return f"{self.root}/{self.agent_id}/{suffix}"

    @property
    def status(self) -> str:
        return self.agent("status")

    @property
    def acks(self) -> str:
        return self.agent("acks")

    @property
    def commands(self) -> str:
        return self.agent("commands")

    def file(self, file_id: str, kind: str) -> str:
        return self.agent(f"files/{file_id}/{kind}")

    @property
    def chain_doc(self) -> str:
        """The chain stream: `{"seq","doc"}`, every signed document in chain order (docs/PROTOCOL.md 10)."""
        return self.agent("chain/doc")

    @property
    def chain_query(self) -> str:
        """`{"head"}`: the agent's own chain head; the receiver answers with the head it holds."""
        return self.agent("chain/query")

    @property
    def chain_acks(self) -> str:
        return self.agent("chain_acks")


CHAIN_KINDS = ("doc", "query")


def platform_events(root: str) -> str:
    """Where receivers publish platform events (`chain_fork`, `chain_rewind`): no agent id starts with `_`."""
    return f"{root}/_platform/events"


def parse_chain_topic(root: str, topic: str) -> tuple[str, str] | None:
    """(agent id, kind) of `{root}/{agent}/chain/{doc|query}`; None if `topic` is not a chain topic at all;
    WireError if it is one with a bad agent id or kind."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/")
    if len(parts) != 3 or parts[1] != "chain":
        return None
    agent_id, _, kind = parts
    if not AGENT_ID_PATTERN.match(agent_id):
        raise WireError(f"agent id {agent_id!r} in topic is not a valid agent id")
    if kind not in CHAIN_KINDS:
        raise WireError(f"unknown chain message kind {kind!r} (doc or query)")
    return agent_id, kind


@dataclass(frozen=True)
class FileTopic:
    agent_id: str
    file_id: str
    kind: str   # manifest | chunk | query


def parse_file_topic(root: str, topic: str) -> FileTopic:
    """Split `{root}/{agent}/files/{file_id}/{kind}`; raise WireError for anything else."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        raise WireError(f"topic {topic!r} is not under {root!r}")
    parts = topic[len(prefix):].split("/")
    if len(parts) != 4 or parts[1] != "files":
        raise WireError(f"topic {topic!r} is not {root}/<agent>/files/<file_id>/<kind>")
    agent_id, _, file_id, kind = parts
    if not AGENT_ID_PATTERN.match(agent_id):
        raise WireError(f"agent id {agent_id!r} in topic is not a valid agent id")
    if not FILE_ID_PATTERN.match(file_id):
        raise WireError(f"file id {file_id!r} in topic is not a ULID")
    if kind not in ("manifest", "chunk", "query"):
        raise WireError(f"unknown message kind {kind!r} (manifest, chunk or query)")
    return FileTopic(agent_id, file_id, kind)


# -- schemas -----------------------------------------------------------------------------------


@cache
def schema(name: str) -> dict[str, Any]:
    """A JSON Schema from edge_agent/schemas (also published in docs/asyncapi.yaml)."""
    text = resources.files("edge_agent.protocol.schemas").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    doc = schema(name)
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc, format_checker=cls.FORMAT_CHECKER)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX8 = re.compile(r"[0-9a-f]{8}")
_MAX_SAFE = 9007199254740991
_PROGRESS_ACK_KEYS = frozenset({"file_id", "state", "have", "sha256", "reason", "chunk_checks", "max_queued",
                                "max_queued_bytes"})


def _plain_chunk_header(value: Any) -> bool:
    """True for a chunk header as every agent writes it: exactly the four fields, plain ints in range, 8 lower-case
    hex digits of `crc32` or 64 of `sha256`. Stricter than the schema (it refuses what the schema accepts only by
    its edges: 2.0 for an integer, a newline after the digits), never looser; whatever it refuses the full
    validator judges."""
    if type(value) is not dict or len(value) != 4:
        return False
    seq, offset, size = value.get("seq"), value.get("offset"), value.get("size")
    crc, digest = value.get(CHECK_CRC32), value.get(CHECK_SHA256)
    return (type(seq) is int and 0 <= seq <= _MAX_SAFE and type(offset) is int and 0 <= offset <= _MAX_SAFE
            and type(size) is int and 1 <= size <= 67108864
            and ((type(crc) is str and _HEX8.fullmatch(crc) is not None)
                 or (type(digest) is str and _HEX64.fullmatch(digest) is not None)))


def _plain_progress_ack(value: Any) -> bool:
    """True for a `receiving` ack as receivers write it (file_id, state, have, optional sha256 and reason; no
    receipt): stricter than the schema, never looser, like `_plain_chunk_header`."""
    if type(value) is not dict or value.get("state") != "receiving" or not value.keys() <= _PROGRESS_ACK_KEYS:
        return False
    file_id, have = value.get("file_id"), value.get("have", [])
    sha256, reason, checks = value.get("sha256"), value.get("reason"), value.get("chunk_checks", [])
    queued, queued_bytes = value.get("max_queued", 1), value.get("max_queued_bytes", 1)
    return (type(queued) is int and 1 <= queued <= _MAX_SAFE and type(queued_bytes) is int
            and 1 <= queued_bytes <= _MAX_SAFE
            and type(file_id) is str and FILE_ID_PATTERN.fullmatch(file_id) is not None and type(have) is list
            and all(type(r) is list and len(r) == 2 and type(r[0]) is int and type(r[1]) is int
                    and r[0] >= 0 and r[1] >= 0 for r in have)
            and (sha256 is None or (type(sha256) is str and _HEX64.fullmatch(sha256) is not None))
            and (reason is None or (type(reason) is str and len(reason) <= 1000))
            and type(checks) is list and len(checks) <= 8 and all(type(c) is str and len(c) <= 16 for c in checks))


# The messages of the data path, one per chunk (and per 16 chunks): a plain-Python check accepts the usual shape
# in microseconds; jsonschema (~0.1-0.4 ms a message) judges only what it refuses, and names the fault.
_FAST_PATH = {"chunk-header": _plain_chunk_header, "ack": _plain_progress_ack}


def validate(name: str, value: Any) -> None:
    """Raise WireError naming the first place where `value` breaks schema `name`."""
    fast = _FAST_PATH.get(name)
    if fast is not None and fast(value):
        return
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise WireError(f"{name}: {where}: {error.message[:200]}")


def decode_json(payload: bytes, name: str, max_bytes: int | None = None) -> dict[str, Any]:
    """Parse a JSON message and check it against schema `name`. Anything that is not such a message raises
    WireError: larger than `max_bytes` (checked before parsing), not UTF-8, not JSON, nested too deep for
    the parser or the validator (RecursionError), or against the schema."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise WireError(f"{name}: {len(payload)} bytes is larger than the {max_bytes} allowed")
    try:
        value = json.loads(payload)
        validate(name, value)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"{name}: not valid UTF-8 JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise WireError(f"{name}: nested too deep to read") from None
    return value


# -- chunks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkHeader:
    """A chunk's header. `check` is its transport check as the header gives it: the CRC-32 (8 hex digits) or,
    from agents before 2026-12, the SHA-256 (64) of the chunk's bytes; which one is told by its length, in the
    header and in the receiver's record lines alike (`chunk_check`)."""

    seq: int
    offset: int
    size: int
    check: str

    @property
    def check_name(self) -> str:
        return check_kind(self.check)

    def json(self) -> bytes:
        return canonical_json({"seq": self.seq, "offset": self.offset, "size": self.size,
                               self.check_name: self.check})


CHECK_WIDTH = {CHECK_CRC32: 8, CHECK_SHA256: 64}   # hex digits of each kind of chunk check


def check_kind(value: str) -> str:
    """The kind of a chunk check's value (a header's or a record's), told by its width."""
    return CHECK_CRC32 if len(value) == CHECK_WIDTH[CHECK_CRC32] else CHECK_SHA256


def check_of(data: bytes | bytearray | memoryview, kind: str) -> str:
    """The chunk check of `data` of `kind` (crc32 or sha256), as hex. Either only shows the bytes were not damaged
    on the way (the header is not signed: whoever can change the bytes can write a matching check of either
    kind); that the file is the one sealed is shown by its whole SHA-256 against the signed manifest, at the
    commit."""
    return f"{zlib.crc32(data):08x}" if kind == CHECK_CRC32 else hashlib.sha256(data).hexdigest()


def chunk_check(data: bytes | bytearray | memoryview, like: str) -> str:
    """The check of `data` of the kind `like` is (a header's `check` or a record's)."""
    return check_of(data, check_kind(like))


def encode_chunk(header: ChunkHeader, data: bytes | memoryview) -> bytes:
    head = header.json()
    return b"".join((HEADER_LENGTH.pack(len(head)), head, data))


def chunk_frame(seq: int, offset: int, size: int, fill: Callable[[memoryview], int],
                check: str = CHECK_CRC32) -> bytearray | None:
    """Chunk `seq`'s frame built in one buffer, the same bytes as `encode_chunk`: `fill(view)` puts the chunk's
    `size` bytes into `view` and returns how many it put (fewer: a short file, and None is returned); they are
    checked (`check`: crc32 or sha256) where they lie and the header written in front, so the chunk's bytes are
    not copied again."""
    # The header's length does not depend on the check's value (fixed width): known before the bytes are.
    head_size = len(ChunkHeader(seq, offset, size, "0" * CHECK_WIDTH[check]).json())
    start = HEADER_LENGTH.size + head_size
    frame = bytearray(start + size)
    with memoryview(frame) as view, view[start:] as data:
        if fill(data) != size:
            return None
        value = check_of(data, check)
    frame[:start] = HEADER_LENGTH.pack(head_size) + ChunkHeader(seq, offset, size, value).json()
    return frame


def _header_span(payload: bytes) -> int | None:
    """Where a chunk frame's bytes start, or None when its header length cannot be right."""
    if len(payload) < HEADER_LENGTH.size:
        return None
    (length,) = HEADER_LENGTH.unpack_from(payload)
    if length > MAX_HEADER_BYTES or HEADER_LENGTH.size + length > len(payload):
        return None
    return HEADER_LENGTH.size + length


def decode_chunk(payload: bytes) -> tuple[ChunkHeader, memoryview]:
    """Split a chunk frame into its checked header and its bytes (a view, not a copy)."""
    if len(payload) < HEADER_LENGTH.size:
        raise WireError(f"chunk: {len(payload)} bytes is shorter than the 4-byte header length")
    start = _header_span(payload)
    if start is None:
        raise WireError(f"chunk: header length {HEADER_LENGTH.unpack_from(payload)[0]} is larger than the message "
                        f"or {MAX_HEADER_BYTES} bytes")
    head = decode_json(payload[HEADER_LENGTH.size:start], "chunk-header")
    data = memoryview(payload)[start:]
    if len(data) != head["size"]:
        raise WireError(f"chunk {head['seq']}: header says {head['size']} bytes, message carries {len(data)}")
    check = head.get(CHECK_CRC32) or head[CHECK_SHA256]
    return ChunkHeader(head["seq"], head["offset"], head["size"], check), data


def chunk_data_check(payload: bytes) -> str | None:
    """The check of a chunk frame's bytes of the kind its header names (`"crc32"` in the header: CRC-32, else
    SHA-256), or None when the frame is too broken to find them (`decode_chunk` then says why). Lets a receiver
    check the bytes on one thread and the header on another; the header's own check is compared with it there
    (a check of the other kind never matches: it has another length)."""
    start = _header_span(payload)
    if start is None:
        return None
    kind = CHECK_CRC32 if payload.find(b'"crc32":', HEADER_LENGTH.size, start) >= 0 else CHECK_SHA256
    with memoryview(payload) as view, view[start:] as data:
        return check_of(data, kind)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_span(seq: int, size: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk `seq` in a file of `size` bytes."""
    offset = seq * chunk_size
    return offset, max(0, min(chunk_size, size - offset))


# -- have ranges -------------------------------------------------------------------------------


def to_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Sorted, merged [[first, last], ...] (inclusive) of a set of sequence numbers."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


def iter_ranges(ranges: Iterable[Iterable[int]]) -> Iterator[int]:
    for first, last in ranges:
        yield from range(first, last + 1)


class RangeSet:
    """Sequence numbers held as merged inclusive ranges: small however large the file."""

    def __init__(self, ranges: Iterable[Iterable[int]] = ()):
        merged: list[list[int]] = []
        for first, last in sorted((int(a), int(b)) for a, b in ranges):
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            elif first <= last:
                merged.append([first, last])
        self._ranges = merged

    def __contains__(self, seq: int) -> bool:
        lo, hi = 0, len(self._ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            first, last = self._ranges[mid]
            if seq < first:
                hi = mid
            elif seq > last:
                lo = mid + 1
            else:
                return True
        return False

    def __len__(self) -> int:
        return sum(last - first + 1 for first, last in self._ranges)

    def ranges(self) -> list[list[int]]:
        return [list(r) for r in self._ranges]


@dataclass(frozen=True)
class Ack:
    """What a receiver tells an agent about one file (schema `ack`)."""

    file_id: str
    state: str
    have: list[list[int]]
    sha256: str | None = None
    reason: str | None = None
    receipt: dict[str, Any] | None = None   # the receiver's signed receipt (complete, rejected)
    chunk_checks: tuple[str, ...] | None = None   # the chunk checks the receiver takes (CHUNK_CHECKS); None: sha256
    # What the receiver queues of this agent's messages (and bytes) before it drops the rest; None: the LEGACY_ values
    max_queued: int | None = None
    max_queued_bytes: int | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Ack:
        """An ack from its decoded JSON (`decode_json(payload, "ack")`). Only `file_id` and `state` are required:
        `have`, `sha256`, `reason` and `receipt` may be absent (read as [], None, None, None) and unknown fields
        are ignored (docs/PROTOCOL.md, "Reading an ack"), so a receiver that leaves out what does not apply to
        the state, or adds what a later version defines, is understood."""
        checks = doc.get("chunk_checks")
        return cls(doc["file_id"], doc["state"], doc.get("have") or [], doc.get("sha256"), doc.get("reason"),
                   doc.get("receipt"), None if checks is None else tuple(checks), doc.get("max_queued"),
                   doc.get("max_queued_bytes"))

    def encode(self) -> bytes:
        body: dict[str, Any] = {"file_id": self.file_id, "state": self.state, "have": self.have,
                                "sha256": self.sha256, "reason": self.reason}
        if self.receipt is not None:
            body["receipt"] = self.receipt
        if self.chunk_checks is not None:
            body["chunk_checks"] = list(self.chunk_checks)
        if self.max_queued is not None:
            body["max_queued"] = self.max_queued
        if self.max_queued_bytes is not None:
            body["max_queued_bytes"] = self.max_queued_bytes
        return canonical_json(body)
