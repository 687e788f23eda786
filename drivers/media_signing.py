"""Camera-signed video: ONVIF Media Signing checked on the NAL units as they are recorded.

A camera that signs its video puts an SEI NAL unit (user data unregistered) into its H.264/H.265 stream
for every GOP. The SEI's payload, after the UUID `005bc93f-2d71-5e95-ada4-796f90877a6f` and one reserved
byte, is a list of TLVs (tag: 1 byte, length: 2 bytes big-endian), read here from ONVIF's
media-signing-framework (github.com/onvif/media-signing-framework, MIT; this is our own code):

- 1 general: version, signer's code version (3 bytes), partial-GOP flag, start and end time (8 bytes each),
  GOP counter (4 bytes), number of hashed NAL units (2 bytes), then the GOP hash and the linked hash;
- 2 hash list: version, then the hash of every NAL unit of the GOP (optional: low-bitrate mode drops it);
- 3 signature: version, signature length (2 bytes), the signature, padded;
- 4 crypto info: version, the hash algorithm's DER-encoded OID, the signing algorithm's (empty for EC);
- 5 vendor info: firmware version, serial number, manufacturer (length-prefixed strings);
- 6 certificates: version, user-provisioned flag, the PEM certificate chain without its root;
- 7 arbitrary data.

What is hashed (the framework's validator side): the slices only (H.264 types 1 and 5; H.265 types 0, 1
and 16-21) and the camera's own unsigned SEIs, each NAL unit from its header to its last non-zero byte
(trailing zero bytes are cut: some muxers add them). The first slice of an IDR/IRAP picture starts a GOP
and is hashed alone (the GOP's anchor); every other hashed NAL unit's hash is hash(anchor hash || hash of
the NAL unit). The GOP hash is the hash of the concatenated NAL unit hashes of one GOP. The linked hash
of a GOP's SEI is the anchor hash of the GOP before it, so a GOP removed with its SEI is seen. The
signature is over the hash of the SEI itself from its NAL header up to the signature TLV (without
emulation-prevention bytes unless the reserved byte's bit 6 says they were hashed), with the public key of
the first certificate in the chain, which must lead to a configured trust anchor.

The SEI of GOP k arrives after GOP k has ended, in GOP k+1. `GopChecker` therefore holds each GOP's NAL
unit hashes (32 bytes each, never the NAL units) until its SEI comes, and reports a `GopResult` per GOP.

Axis Signed Video (UUID `5369676e-6564-2056-6964-656f2e2e2e30`) is detected, not verified: its TLV format
is Axis's own, not ONVIF's, and its GOPs are reported `unverifiable`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

if TYPE_CHECKING:
    import av

log = logging.getLogger(__name__)

ONVIF_UUID = bytes.fromhex("005bc93f2d715e95ada4796f90877a6f")
AXIS_UUID = bytes.fromhex("5369676e656420566964656f2e2e2e30")
USER_DATA_UNREGISTERED = 5

# Per-GOP and per-segment verdicts.
VALID, INVALID, UNSIGNED, UNVERIFIABLE = "valid", "invalid", "unsigned", "unverifiable"
UNCHECKED = "unchecked"   # a GOP cut off by the end of the stream: its signature never came

# DER-encoded OIDs of the hash algorithms the crypto-info TLV may name.
_HASHES: dict[bytes, Callable[[], hashes.HashAlgorithm]] = {
    bytes.fromhex("0609608648016503040201"): hashes.SHA256,
    bytes.fromhex("0609608648016503040202"): hashes.SHA384,
    bytes.fromhex("0609608648016503040203"): hashes.SHA512,
}
WALL_CLOCK_SINCE = datetime(2000, 1, 1, tzinfo=UTC)   # an earlier signing time is stream time, not a date
MAX_CHAIN = 8            # certificates followed from a leaf to an anchor, at most
PENDING_GOPS_MAX = 3     # a signed stream's GOP still without its SEI this many GOPs later lost its signature
UNSIGNED_AFTER_GOPS = 2  # no signing SEI seen this many GOPs after a GOP ended: that GOP is unsigned
HASH_UNSIGNED_GOPS = 3   # after this many unsigned GOPs, NAL units are no longer hashed (until a signing SEI)


# -- NAL units -------------------------------------------------------------------------------------


def length_prefixed(extradata: bytes | None) -> bool:
    """A stream's packets carry 4-byte NAL unit lengths (MP4, Matroska: their extradata is an avcC/hvcC
    record, starting with its version 1), not start codes (Annex B, as FFmpeg's RTSP demuxer gives them)."""
    return bool(extradata) and extradata[0] == 1


def split_nals(data: bytes, prefixed: bool) -> list[bytes]:
    """The NAL units of one access unit, each without its start code or length prefix."""
    if not prefixed:
        return _split_annexb(data)
    nals, off = [], 0
    while off + 4 <= len(data):
        size = int.from_bytes(data[off:off + 4], "big")
        if off + 4 + size > len(data):
            raise ValueError(f"NAL unit length {size} runs past the packet ({len(data)} bytes)")
        nals.append(data[off + 4:off + 4 + size])
        off += 4 + size
    return nals


def _split_annexb(data: bytes) -> list[bytes]:
    nals = []
    starts = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    for n, start in enumerate(starts):
        end = starts[n + 1] - 3 if n + 1 < len(starts) else len(data)
        nal = data[start:end].rstrip(b"\x00") if n + 1 < len(starts) else data[start:end]
        if nal:
            nals.append(nal)
    return nals


HEAD_BYTES = 512   # of an access unit, where its first slice is looked for (`look`)
START_CODE = b"\x00\x00\x01"


def look(data: bytes | av.Packet, prefixed: bool, hevc: bool) -> tuple[bool, bytes | None]:
    """What the signing checker needs of an access unit (bytes or a PyAV packet) it may not have to split:
    whether it may hold a signing SEI, and the first bytes of its first slice (NAL header and first
    slice-header byte; None when it does not begin in the first `HEAD_BYTES`).

    A signing SEI is found by its UUID: their bytes hold no zero pair, so no emulation-prevention byte can
    split them. This runs for every packet of every camera that does not sign, so it reads as little as the
    standards allow. In an H.264 access unit in start-code form (what FFmpeg's RTSP demuxer gives), SEI NAL
    units precede its first slice (H.264 7.4.1.2.3): the NAL headers before the first slice are read, and
    only when one is a SEI are they searched (all of the unit when its first slice begins after
    `HEAD_BYTES`). H.265 also has suffix SEIs after the slices (7.4.2.4.4), and length-prefixed units (files)
    are read rarely: the whole unit is searched. `bytes.find`, not `in`: `in` first tries its operand as an
    integer and formats that error."""
    whole = data if isinstance(data, bytes) else bytes(data)
    first = None
    if not prefixed:
        sei = False
        start = whole.find(START_CODE, 0, HEAD_BYTES)
        while 0 <= start < len(whole) - 5:
            header = whole[start + 3]
            if ((header >> 1) & 0x3F) < 32 if hevc else 1 <= header & 0x1F <= 5:   # a slice
                first = whole[start + 3:start + 6]
                if not hevc:   # the SEIs, if any, are before it
                    return sei and (whole.find(ONVIF_UUID, 0, start) >= 0 or whole.find(AXIS_UUID, 0, start) >= 0), \
                        first
                break
            sei = sei or header & 0x1F == 6
            start = whole.find(START_CODE, start + 3, HEAD_BYTES)
    return whole.find(ONVIF_UUID) >= 0 or whole.find(AXIS_UUID) >= 0, first


def hashable(nal: bytes) -> bytes:
    """A NAL unit as it is hashed: up to its last non-zero byte."""
    return nal.rstrip(b"\x00")


def unescape(data: bytes) -> tuple[bytes, list[int]]:
    """`data` without emulation-prevention bytes (0x03 after two zero bytes), and for each byte kept its
    index in `data`."""
    out = bytearray()
    where: list[int] = []
    zeros = 0
    for i, byte in enumerate(data):
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        where.append(i)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out), where


@dataclass(frozen=True)
class NalInfo:
    kind: str          # "slice", "sei", "other"
    gop_start: bool    # first slice of an IDR/IRAP picture
    signing: str | None = None   # "onvif" / "axis" for a signing SEI


# The NAL units that are not signing SEIs, made once: `nal_info` runs for every NAL unit of every camera.
_OTHER = NalInfo("other", False)
_SLICE = NalInfo("slice", False)
_GOP_START = NalInfo("slice", True)
_SEI = NalInfo("sei", False)
_SIGNING_SEI = {"onvif": NalInfo("sei", False, "onvif"), "axis": NalInfo("sei", False, "axis")}


def nal_info(nal: bytes, hevc: bool) -> NalInfo:
    if len(nal) < (3 if hevc else 2):
        return _OTHER
    if hevc:
        t = (nal[0] >> 1) & 0x3F
        if t in (0, 1):
            return _SLICE
        if 16 <= t <= 21:
            return _GOP_START if nal[2] & 0x80 else _SLICE
        if t in (39, 40):
            return _SIGNING_SEI.get(_sei_signing(nal, 2), _SEI)
        return _OTHER
    t = nal[0] & 0x1F
    if t == 1:
        return _SLICE
    if t == 5:
        return _GOP_START if nal[1] & 0x80 else _SLICE
    if t == 6:
        return _SIGNING_SEI.get(_sei_signing(nal, 1), _SEI)
    return _OTHER


def _sei_signing(nal: bytes, header: int) -> str | None:
    """Which signing scheme a SEI's first message belongs to (by its UUID), None if none."""
    try:
        off, ptype, size = _sei_message(nal, header)
    except IndexError:
        return None
    if ptype != USER_DATA_UNREGISTERED or size < 16:
        return None
    uuid = nal[off:off + 16]
    return "onvif" if uuid == ONVIF_UUID else "axis" if uuid == AXIS_UUID else None


def _sei_message(nal: bytes, header: int) -> tuple[int, int, int]:
    """(payload offset, payload type, payload size) of a SEI's first message (in the raw NAL unit: the
    type, size and UUID of a signing SEI hold no emulation-prevention bytes)."""
    i, ptype = header, 0
    while nal[i] == 0xFF:
        ptype += 255
        i += 1
    ptype += nal[i]
    i += 1
    size = 0
    while nal[i] == 0xFF:
        size += 255
        i += 1
    size += nal[i]
    return i + 1, ptype, size


# -- the SEI's TLVs --------------------------------------------------------------------------------


class SeiError(ValueError):
    """A signing SEI that cannot be decoded."""


@dataclass
class SigningSei:
    reserved: int
    signed_at: datetime | None  # the GOP's start as the camera's clock says (signed with the rest)
    gop_counter: int
    partial_gop: bool
    num_nalus: int
    gop_hash: bytes
    linked_hash: bytes
    hash_list: list[bytes] | None
    signature: bytes | None
    hash_algo: Callable[[], hashes.HashAlgorithm] | None
    certificates: bytes | None
    vendor: dict[str, str] | None
    signed_part: bytes          # what the signature is over (hashed with the SEI's hash algorithm)
    raw: bytes                  # the whole NAL unit, for hashing when it is not signed

    @property
    def is_certificate_sei(self) -> bool:
        return bool(self.reserved & 0x80)


def parse_signing_sei(nal: bytes, hevc: bool) -> SigningSei:
    """Decode an ONVIF signing SEI; SeiError when it is not one or does not decode."""
    header = 2 if hevc else 1
    try:
        off, _, size = _sei_message(nal, header)
    except IndexError:
        raise SeiError("truncated SEI header") from None
    body = hashable(nal)
    # Emulation-prevention bytes are removed only when the sizes say there are some (as the framework
    # does): a SEI written without them may hold 00 00 03 as data.
    stop = 1 if body[-1:] == b"\x80" else 0
    if len(body) - off - size - stop > 0:
        clean, where = unescape(body)
    else:
        clean, where = body, list(range(len(body)))
    # Offsets below are into `clean`: the header and UUID hold no emulation-prevention bytes.
    if len(clean) < off + 17 or clean[off:off + 16] != ONVIF_UUID:
        raise SeiError("not an ONVIF Media Signing SEI")
    reserved = clean[off + 16]
    fields, signature_at = _tlvs(clean, off + 17, min(off + size, len(clean)))
    if 1 not in fields:
        raise SeiError("SEI without its general TLV")
    start_ts, partial, gop_counter, num_nalus, gop_hash, linked = _general(fields[1])
    hash_size = len(gop_hash)
    hash_list = None
    if 2 in fields and len(fields[2]) > 1:
        raw_list = fields[2][1:]
        hash_list = [raw_list[j:j + hash_size] for j in range(0, len(raw_list) - hash_size + 1, hash_size)]
    signature = None
    if 3 in fields:
        sig = fields[3]
        signature = sig[3:3 + int.from_bytes(sig[1:3], "big")]
    algo: Callable[[], hashes.HashAlgorithm] | None = None
    if 4 in fields:
        info = fields[4]
        oid = info[2:2 + info[1]]
        algo = _HASHES.get(oid)
        if algo is None:
            raise SeiError(f"hash algorithm with OID {oid.hex()} is not supported")
    certificates = fields[6][2:] if 6 in fields and len(fields[6]) > 2 else None
    if signature_at is None:
        signed_part = b""
    elif reserved & 0x40:   # hashed with its emulation-prevention bytes: cut the raw NAL unit there
        signed_part = body[:where[signature_at]]
    else:
        signed_part = clean[:signature_at]
    return SigningSei(reserved, _filetime(start_ts), gop_counter, partial, num_nalus, gop_hash, linked, hash_list,
                      signature, algo, certificates, _vendor(fields[5]) if 5 in fields else None, signed_part,
                      body if reserved & 0x40 else clean)


def _tlvs(data: bytes, start: int, end: int) -> tuple[dict[int, bytes], int | None]:
    """The TLVs between `start` and `end` by tag, and where the signature TLV begins."""
    fields: dict[int, bytes] = {}
    signature_at: int | None = None
    i = start
    while i + 3 <= end:
        tag, length = data[i], int.from_bytes(data[i + 1:i + 3], "big")
        if i + 3 + length > end:
            raise SeiError(f"TLV tag {tag} runs past the SEI's payload")
        if tag == 3:
            signature_at = i
        fields[tag] = data[i + 3:i + 3 + length]
        i += 3 + length
    return fields, signature_at


def _general(general: bytes) -> tuple[int, bool, int, int, bytes, bytes]:
    """(start time, partial-GOP flag, GOP counter, number of hashed NAL units, GOP hash, linked hash)."""
    version = general[0] if general else 0
    if version not in (1, 2):
        raise SeiError(f"general TLV version {version} is not supported")
    p = 1 + 3
    partial = bool(general[p])
    start_ts = int.from_bytes(general[p + 1:p + 9], "big", signed=True)
    p += 1 + 8 + (8 if version >= 2 else 0)
    gop_counter = int.from_bytes(general[p:p + 4], "big")
    num_nalus = int.from_bytes(general[p + 4:p + 6], "big")
    p += 6
    hash_size = (len(general) - p) // 2
    if hash_size <= 0:
        raise SeiError("general TLV without hashes")
    return start_ts, partial, gop_counter, num_nalus, general[p:p + hash_size], general[p + hash_size:p + 2 * hash_size]


def _filetime(value: int) -> datetime | None:
    """Windows FILETIME (100 ns since 1601-01-01 UTC), as the general TLV's timestamps are; None if unset."""
    if value <= 0:
        return None
    try:
        return datetime(1601, 1, 1, tzinfo=UTC) + timedelta(microseconds=value // 10)
    except OverflowError:
        return None


def _vendor(value: bytes) -> dict[str, str]:
    out, p = {}, 1
    for key in ("firmware_version", "serial_number", "manufacturer"):
        if p >= len(value):
            break
        n = value[p]
        out[key] = value[p + 1:p + 1 + n].decode("utf-8", "replace")
        p += 1 + n
    return out


# -- trust -----------------------------------------------------------------------------------------


def load_anchors(pem: bytes) -> list[x509.Certificate]:
    """Trust anchors from a PEM file's bytes (one or more certificates); ValueError if there is none."""
    return x509.load_pem_x509_certificates(pem)


def chain_trusted(chain: list[x509.Certificate], anchors: list[x509.Certificate],
                  at: datetime | None) -> str | None:
    """None if `chain[0]` leads through `chain[1:]` to one of `anchors` (each signature checked, and each
    certificate in its validity period at `at` unless None); otherwise why not."""
    cert = chain[0]
    pool = chain[1:]
    for _ in range(MAX_CHAIN):
        if at is not None and not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            return f"certificate {cert.subject.rfc4514_string()} is outside its validity period"
        for anchor in anchors:
            if _issued_by(cert, anchor):
                return None
        issuer = next((c for c in pool if _issued_by(cert, c)), None)
        if issuer is None:
            return f"certificate {cert.subject.rfc4514_string()} does not lead to a configured signing_ca"
        pool = [c for c in pool if c is not issuer]
        cert = issuer
    return "certificate chain too long"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_signature(key: object, signature: bytes, data: bytes, algo: hashes.HashAlgorithm) -> bool:
    digest = hashes.Hash(algo)
    digest.update(data)
    prehashed = utils.Prehashed(algo)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest.finalize(), ec.ECDSA(prehashed))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, digest.finalize(), padding.PSS(padding.MGF1(algo), padding.PSS.AUTO), prehashed)
        else:
            return False
    except InvalidSignature:
        return False
    return True


# -- GOPs ------------------------------------------------------------------------------------------


@dataclass
class GopResult:
    status: str                 # VALID, INVALID, UNSIGNED, UNVERIFIABLE
    reason: str | None = None   # why not valid
    signer: dict[str, object] | None = None


@dataclass
class _Gop:
    tags: set[int]
    hashes: list[bytes] = field(default_factory=list)
    closed: bool = False
    later_starts: int = 0       # GOPs started after this one ended
    result: GopResult | None = None


class GopChecker:
    """Checks one connection's video, NAL unit by NAL unit in stream order. `feed(nal, tag)` takes each
    NAL unit with a tag of the caller's (the segment it is written to); `results(tag)` gives the results
    of the GOPs that touched that tag once all are known. Memory: one hash per NAL unit of the GOPs
    waiting for their SEI (at most a few GOPs)."""

    def __init__(self, hevc: bool, anchors: list[x509.Certificate] | None):
        self.hevc = hevc
        self.anchors = anchors
        self.signing: str | None = None         # "onvif" / "axis" once a signing SEI was seen
        self.signer: dict[str, object] | None = None
        self._algo: Callable[[], hashes.HashAlgorithm] = hashes.SHA256
        self._chain_pem: bytes | None = None
        self._key: object | None = None
        self._chain: list[x509.Certificate] | None = None
        self._chain_error: str | None = None
        self._gops: deque[_Gop] = deque()
        self._anchor: bytes | None = None
        self._last_counter: int | None = None
        self._last_first_hash: bytes | None = None   # first NAL hash of the GOP the previous SEI covered
        self._verified_any = False
        self._hashing = True          # False after HASH_UNSIGNED_GOPS unsigned GOPs, until a signing SEI comes
        self._unsigned_gops = 0
        self.done: list[tuple[set[int], GopResult]] = []

    # the hash of one NAL unit, and with the GOP's anchor
    def _h(self, data: bytes) -> bytes:
        return hashlib.new(self._algo.name, data).digest()   # hashlib: less overhead per small NAL unit

    @property
    def idle(self) -> bool:
        """Only a GOP start or a signing SEI would change anything now: no signing SEI seen and the current
        GOP not hashed (an unsigned camera after its first GOPs). The caller may then skip the NAL units of
        an access unit that holds neither (`feed_unit`)."""
        return self._anchor is None and self.signing is None

    def feed_unit(self, data: bytes | av.Packet, prefixed: bool, key: bool, tag: int) -> None:
        """One access unit (bytes or a PyAV packet), in stream order, split into its NAL units only where that
        can change something. Once the checker is `idle` and hashes nothing (an unsigned camera after its first
        GOPs), a unit with no signing SEI where one may stand (`look`) is not split: a picture between
        keyframes changes nothing, and of a keyframe only its first slice's first bytes count (a GOP start:
        `feed` reads no further into a slice it does not hash)."""
        if self.idle:
            may_sign, first = look(data, prefixed, self.hevc)
            if not may_sign:
                if not key:
                    return
                if first is not None and not self._hashing:
                    self.feed(first, tag)
                    return
        for nal in split_nals(bytes(data), prefixed):
            self.feed(nal, tag)

    def feed(self, nal: bytes, tag: int) -> None:
        info = nal_info(nal, self.hevc)
        if info.kind == "sei":
            if info.signing == "onvif":
                self._onvif_sei(nal, tag)
            elif info.signing == "axis":
                self.signing = "axis"
            return
        if info.kind != "slice":
            return
        if info.gop_start:
            if not self._hashing and self.signing is not None:
                self._hashing = True   # the camera began signing: hash from this GOP on
            for gop in self._gops:
                if gop.closed:
                    gop.later_starts += 1
                else:
                    gop.closed = True
            self._gops.append(_Gop({tag}))
            self._anchor = None
            if self._hashing:
                self._anchor = self._h(hashable(nal))
                self._gops[-1].hashes.append(self._anchor)
            self._age()
            return
        if not self._gops or self._anchor is None:
            return   # before the first GOP of this connection (not recorded), or not hashing
        gop = self._gops[-1]
        gop.tags.add(tag)
        gop.hashes.append(self._h(self._anchor + self._h(hashable(nal))))

    def _age(self) -> None:
        """GOPs whose SEI did not come in time."""
        for gop in self._gops:
            if gop.result is not None or not gop.closed:
                continue
            if self.signing is None and gop.later_starts >= UNSIGNED_AFTER_GOPS - 1:
                gop.result = GopResult(UNSIGNED)
                self._unsigned_gops += 1
                if self._unsigned_gops >= HASH_UNSIGNED_GOPS:
                    self._hashing = False   # no signing SEI so far: stop hashing until one comes
            elif self.signing == "axis" and gop.later_starts >= UNSIGNED_AFTER_GOPS - 1:
                gop.result = GopResult(UNVERIFIABLE, "axis signed video is detected but not verified")
            elif self.signing == "onvif" and gop.later_starts >= PENDING_GOPS_MAX:
                gop.result = GopResult(INVALID, "no signature came for this GOP (its SEI is missing)")
        self._pop()

    def _pop(self) -> None:
        while self._gops and self._gops[0].result is not None:
            gop = self._gops.popleft()
            if gop.tags:
                self.done.append((gop.tags, gop.result))

    def finish(self) -> None:
        """End of the connection: GOPs still waiting for their SEI cannot be checked."""
        for gop in self._gops:
            if gop.result is None:
                if self.signing is None:
                    gop.result = GopResult(UNSIGNED)
                else:
                    gop.result = GopResult(UNCHECKED, "the stream ended before this GOP's signature came")
        self._pop()

    def pending(self, tag: int) -> bool:
        """Some GOP that touched `tag` has no result yet."""
        return any(tag in gop.tags for gop in self._gops)

    def results(self, tag: int) -> list[GopResult]:
        return [result for tags, result in self.done if tag in tags]

    def forget(self, tag: int) -> None:
        """The caller is done with `tag`: its results are dropped, and GOPs still waiting no longer report to
        it (so results kept are only those some tag still wants: memory stays bounded)."""
        self.done = [(tags, r) for tags, r in self.done if tag not in tags or tags - {tag}]
        for tags, _ in self.done:
            tags.discard(tag)
        for gop in self._gops:
            gop.tags.discard(tag)

    def _onvif_sei(self, nal: bytes, tag: int) -> None:
        self.signing = "onvif"
        began = not self._hashing
        if began:
            self._give_up("the camera began signing after this GOP started")
        try:
            sei = parse_signing_sei(nal, self.hevc)
        except SeiError as exc:
            self._fail_next(f"signing SEI does not decode: {exc}")
            return
        if sei.hash_algo is not None and sei.hash_algo != self._algo:
            # The NAL units so far were hashed with the default algorithm: their GOPs cannot be checked.
            self._algo = sei.hash_algo
            self._anchor = None
            self._give_up("the stream's hash algorithm was learned after this GOP began")
        if sei.vendor:
            self.signer = {**(self.signer or {}), **sei.vendor}
        if sei.certificates is not None and sei.certificates != self._chain_pem:
            self._learn_chain(sei.certificates)
        if sei.is_certificate_sei or began:
            return
        if sei.signature is None:
            self._fail_next("signing several GOPs with one signature is not supported; not checked", UNVERIFIABLE)
            return
        if self._key is None:
            self._judge(sei, GopResult(UNVERIFIABLE, self._chain_error
                                       or "no certificate in the stream to check the signature with"))
            return
        if not verify_signature(self._key, sei.signature, sei.signed_part, self._algo()):
            self._judge(sei, GopResult(INVALID, "the SEI's signature does not verify"))
            return
        self._judge(sei, None)

    def _give_up(self, reason: str) -> None:
        """Every GOP still waiting is `unverifiable` for `reason`."""
        for gop in self._gops:
            if gop.result is None:
                gop.result = GopResult(UNVERIFIABLE, reason)
        self._pop()

    def _learn_chain(self, pem: bytes) -> None:
        self._chain_pem = pem
        try:
            chain = x509.load_pem_x509_certificates(pem)
        except ValueError:
            self._key, self._chain, self._chain_error = None, None, "the stream's certificate chain does not parse"
            return
        leaf = chain[0]
        self._key, self._chain, self._chain_error = leaf.public_key(), chain, None
        self.signer = {**(self.signer or {}), "subject": leaf.subject.rfc4514_string(),
                       "issuer": leaf.issuer.rfc4514_string(), "certificate_serial": format(leaf.serial_number, "x")}

    def _trust(self, signed_at: datetime | None) -> tuple[str, str] | None:
        """None if the signing certificate leads to a trust anchor at the signing time the (signed) SEI
        states; else (verdict, why)."""
        if self._chain is None:
            return UNVERIFIABLE, self._chain_error or "no certificate in the stream to check the signature with"
        if self.anchors is None:
            return UNVERIFIABLE, "no signing_ca configured for this camera"
        # Validity is checked at the signing time the SEI states when that is a wall-clock time; some
        # signers (ONVIF's own samples) write stream time there, and then it is not checked.
        at = signed_at if signed_at is not None and signed_at >= WALL_CLOCK_SINCE else None
        why = chain_trusted(self._chain, self.anchors, at)
        return None if why is None else (INVALID, why)

    def _fail_next(self, reason: str, status: str = INVALID) -> None:
        gop = next((g for g in self._gops if g.closed and g.result is None), None)
        if gop is not None:
            gop.result = GopResult(status, reason)
        self._pop()

    def _judge(self, sei: SigningSei, failed: GopResult | None) -> None:
        """Match the SEI with the oldest GOP waiting for one and record the result."""
        gop = next((g for g in self._gops if g.result is None), None)
        if gop is None:
            return
        hashes_ = gop.hashes[:sei.num_nalus] if sei.partial_gop else gop.hashes
        computed = self._h(b"".join(hashes_))
        if not gop.closed and computed != sei.gop_hash and not self._verified_any:
            # The first SEI of a connection signs the GOP before the first one recorded.
            self._last_counter = sei.gop_counter
            return
        if not gop.closed and computed != sei.gop_hash:
            return   # wait: the GOP it signs has not ended yet
        counter_ok = self._last_counter is None or sei.gop_counter == (self._last_counter + 1) & 0xFFFFFFFF
        linked_ok = self._last_first_hash is None or sei.linked_hash == self._last_first_hash
        self._last_counter = sei.gop_counter
        self._last_first_hash = gop.hashes[0] if gop.hashes else None
        self._verified_any = True
        if failed is not None:
            gop.result = failed
        elif computed != sei.gop_hash:
            gop.result = GopResult(INVALID, self._mismatch(gop, sei))
        elif not counter_ok or not linked_ok:
            gop.result = GopResult(INVALID, "a GOP is missing before this one (GOP counter or linked hash)")
        elif (distrust := self._trust(sei.signed_at)) is not None:
            gop.result = GopResult(*distrust)
        else:
            gop.result = GopResult(VALID, None, dict(self.signer or {}))
        self._pop()

    @staticmethod
    def _mismatch(gop: _Gop, sei: SigningSei) -> str:
        if sei.hash_list is None:
            return f"the GOP's content does not match its signature ({len(gop.hashes)} NAL units hashed)"
        if len(sei.hash_list) != len(gop.hashes):
            return (f"the GOP has {len(gop.hashes)} NAL units, its signature lists {len(sei.hash_list)}: "
                    "NAL units added or removed")
        bad = [i for i, (a, b) in enumerate(zip(gop.hashes, sei.hash_list, strict=True)) if a != b]
        return f"NAL unit(s) {bad[:5]} of the GOP differ from what the camera signed"


def segment_verdict(results: list[GopResult], signing: str | None) -> dict[str, object]:
    """One segment's `signing` manifest object from the results of the GOPs it holds."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    unchecked = counts.pop(UNCHECKED, 0)
    if not counts:
        status = UNSIGNED if signing is None else UNVERIFIABLE
    elif counts.get(INVALID):
        status = INVALID
    elif counts.get(UNVERIFIABLE):
        status = UNVERIFIABLE
    elif counts.get(VALID) and counts.get(UNSIGNED):
        status = INVALID   # part signed, part not: signatures stripped from part of it
    elif counts.get(VALID):
        status = VALID
    else:
        status = UNSIGNED
    out: dict[str, object] = {"status": status, "gops": len(results), "gops_valid": counts.get(VALID, 0),
                              "gops_unchecked": unchecked}
    if signing is not None:
        out["format"] = signing
    reasons = [r.reason for r in results if r.reason and r.status not in (VALID, UNCHECKED)]
    if not reasons and status != VALID:
        reasons = [r.reason for r in results if r.reason]
    if status == INVALID and counts.get(VALID) and counts.get(UNSIGNED) and not reasons:
        reasons = ["some GOPs carry no signature while others do"]
    if reasons:
        out["reason"] = reasons[0]
    signer = next((r.signer for r in results if r.signer), None)
    if signer:
        out["signer"] = signer
    return out


def check_file(path: str, anchors: list[x509.Certificate] | None) -> dict[str, object]:
    """The verdict for a whole video file (a stored segment, a camera's own recording), read packet by
    packet: a GOP whose SEI is not in the file (the last one) cannot be checked."""
    import av

    with av.open(path) as container:
        stream = next(iter(container.streams.video), None)
        if stream is None:
            return segment_verdict([], None)
        checker = GopChecker(stream.codec_context.name == "hevc", anchors)
        for nal in iter_nals(container, stream):
            checker.feed(nal, 0)
        checker.finish()
        return segment_verdict(checker.results(0), checker.signing)


def iter_nals(container: object, stream: object) -> Iterator[bytes]:
    """Every NAL unit of a demuxed video stream, in order."""
    prefixed = length_prefixed(stream.codec_context.extradata)  # type: ignore[attr-defined]
    for packet in container.demux(stream):  # type: ignore[attr-defined]
        if packet.size:
            yield from split_nals(bytes(packet), prefixed)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
