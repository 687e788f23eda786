"""Crypto suites: the one place that knows how a document is signed and checked under Ed25519 and 国密 SM2.

`[crypto] suite` picks the agent's key set: `ed25519` (one key), `sm2` (one key) or `ed25519+sm2` (two keys,
both signing every document). Everything else in the agent handles a key set as one public key object
(`PublicKey`): its `key_id`, its PEM, and `verify_document`/`sign_document` here.

Signed fields (docs/PROTOCOL.md section 10, "Crypto suites"):

- `key_id` names the key set: `ed25519:<16 hex>` (SHA-256 of the raw 32-byte key) or, for `sm2`,
  `sm2:<16 hex>` (SHA-256 of the uncompressed point 04||x||y); a dual set is named by its Ed25519 key.
- `sm2_key_id`, `sm2_sig` (SM2 keys only): the SM2 key's id and its signature, SM2 with SM3 and the
  distinguishing ID `1234567812345678`, DER `SEQUENCE {r, s}` (GB/T 35276) in base64, over the canonical
  bytes of the document without `sig` and `sm2_sig`.
- `sig` (Ed25519 keys only): Ed25519 over the canonical bytes of the document without `sig` (so in a dual
  document it covers `sm2_sig` too, and an Ed25519-only verifier accepts a dual document unchanged).

So a dual document verifies under each of its keys alone; an Ed25519 document is byte-identical to what the
agent signed before suites existed. Keys are PEM that OpenSSL 3 reads: PKCS#8 `PRIVATE KEY` and
SubjectPublicKeyInfo `PUBLIC KEY` (SM2: id-ecPublicKey on curve 1.2.156.10197.1.301, as `openssl genpkey
-algorithm SM2` writes); a dual set's file holds its Ed25519 block, then its SM2 block.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import gmssl_pyx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.protocol.canonical import canonical_json

ED25519, SM2 = "ed25519", "sm2"
SUITES = (ED25519, SM2, f"{ED25519}+{SM2}")
DEFAULT_SUITE = ED25519
SM2_ID = b"1234567812345678"   # GB/T 35276's default distinguishing ID

# Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA) (GB/T 32918.2): what precedes the message in the SM3 that
# SM2 signs; fixed per key, so computed once (gmssl's sm2_sign recomputes it, and validates the key, every call).
_SM2_CURVE = bytes.fromhex(
    "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC"   # a
    "28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93"   # b
    "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7"   # xG
    "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0")  # yG

# SM2 key encodings (DER), exactly as OpenSSL 3 writes them: PKCS#8 with the public point, and SPKI.
_SM2_ALG = bytes.fromhex("301306072a8648ce3d020106082a811ccf5501822d")   # id-ecPublicKey, curve SM2
_SM2_PRIV_HEAD = bytes.fromhex("308187020100") + _SM2_ALG + bytes.fromhex("046d306b0201010420")
_SM2_PRIV_MID = bytes.fromhex("a14403420004")
_SM2_SPKI_HEAD = bytes.fromhex("3059") + _SM2_ALG + bytes.fromhex("03420004")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s*(.*?)\s*-----END \1-----", re.S)


class SignatureError(ValueError):
    """A signature is missing, malformed or does not match; a key cannot be read. `str()` says which."""


def sm3_hasher() -> hashes.Hash:
    """A fresh SM3 hash (cryptography's, OpenSSL's implementation): `update(bytes)`, `finalize()`."""
    return hashes.Hash(hashes.SM3())


def sm3_hex(data: bytes) -> str:
    h = sm3_hasher()
    h.update(data)
    return h.finalize().hex()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pem(label: str, der: bytes) -> str:
    body = _b64(der)
    return f"-----BEGIN {label}-----\n" + "".join(body[i:i + 64] + "\n" for i in range(0, len(body), 64)) + \
        f"-----END {label}-----\n"


# -- SM2 keys -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sm2PublicKey:
    point: bytes   # x||y, 64 bytes

    @property
    def key_id(self) -> str:
        return "sm2:" + hashlib.sha256(b"\x04" + self.point).hexdigest()[:16]

    @cached_property
    def z(self) -> bytes:
        return bytes.fromhex(sm3_hex((len(SM2_ID) * 8).to_bytes(2, "big") + SM2_ID + _SM2_CURVE + self.point))

    def digest(self, data: bytes) -> bytes:
        """e = SM3(Z || M), what SM2 with SM3 signs for this key and the distinguishing ID."""
        h = sm3_hasher()
        h.update(self.z)
        h.update(data)
        return h.finalize()

    def spki_der(self) -> bytes:
        return _SM2_SPKI_HEAD + self.point

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            return bool(gmssl_pyx.sm2_verify_sm3_digest(self.point, self.digest(data), signature))
        except gmssl_pyx.GmsslInnerError:
            return False

    @classmethod
    def from_spki(cls, der: bytes) -> Sm2PublicKey:
        if len(der) != len(_SM2_SPKI_HEAD) + 64 or not der.startswith(_SM2_SPKI_HEAD):
            raise SignatureError("not an SM2 public key (SubjectPublicKeyInfo, id-ecPublicKey on curve SM2)")
        try:
            return cls(gmssl_pyx.normalize_sm2_public_key(der[-64:]))
        except gmssl_pyx.GmsslInnerError:
            raise SignatureError("SM2 public key is not a point on the curve") from None


@dataclass(frozen=True)
class Sm2PrivateKey:
    secret: bytes   # d, 32 bytes
    point: bytes    # its public point x||y

    @cached_property
    def _public(self) -> Sm2PublicKey:
        return Sm2PublicKey(self.point)

    @classmethod
    def generate(cls) -> Sm2PrivateKey:
        point, secret = gmssl_pyx.sm2_key_generate()
        return cls(secret, point)

    def public_key(self) -> Sm2PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return gmssl_pyx.sm2_sign_sm3_digest(self.secret, self._public.digest(data))

    def pkcs8_der(self) -> bytes:
        return _SM2_PRIV_HEAD + self.secret + _SM2_PRIV_MID + self.point

    @classmethod
    def from_pkcs8(cls, der: bytes) -> Sm2PrivateKey:
        if (len(der) != len(_SM2_PRIV_HEAD) + 32 + len(_SM2_PRIV_MID) + 64 or not der.startswith(_SM2_PRIV_HEAD)
                or der[len(_SM2_PRIV_HEAD) + 32:-64] != _SM2_PRIV_MID):
            raise SignatureError("not an SM2 private key as OpenSSL 3 writes it (PKCS#8 with its public point)")
        key = cls(der[len(_SM2_PRIV_HEAD):][:32], der[-64:])
        if not key.public_key().verify(key.sign(b"check"), b"check"):
            raise SignatureError("SM2 private key does not match the public point it carries")
        return key


# -- key sets -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DualPublicKey:
    """An `ed25519+sm2` key set: both keys sign every document."""

    ed25519: Ed25519PublicKey
    sm2: Sm2PublicKey


PublicKey = Ed25519PublicKey | Sm2PublicKey | DualPublicKey
PrivateKey = Ed25519PrivateKey | Sm2PrivateKey


def _ed_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def parts(key: PublicKey) -> tuple[Ed25519PublicKey | Sm2PublicKey, ...]:
    if isinstance(key, DualPublicKey):
        return (key.ed25519, key.sm2)
    return (key,)


def key_id_of(key: PublicKey) -> str:
    """The id documents name the key set by (`key_id`): its Ed25519 key's, else its SM2 key's."""
    first = parts(key)[0]
    return _ed_id(first) if isinstance(first, Ed25519PublicKey) else first.key_id


def suite_of(key: PublicKey) -> str:
    return "+".join(ED25519 if isinstance(part, Ed25519PublicKey) else SM2 for part in parts(key))


def public_pem(key: PublicKey) -> str:
    """The key set as PEM (one `PUBLIC KEY` block per key, Ed25519 first)."""
    out = []
    for part in parts(key):
        if isinstance(part, Ed25519PublicKey):
            out.append(part.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii"))
        else:
            out.append(_pem("PUBLIC KEY", part.spki_der()))
    return "".join(out)


def _public_part(der: bytes) -> Ed25519PublicKey | Sm2PublicKey:
    if der.startswith(_SM2_SPKI_HEAD):
        return Sm2PublicKey.from_spki(der)
    try:
        key = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise SignatureError(f"unreadable public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is neither Ed25519 nor SM2")
    return key


def load_public_keys(data: bytes | str) -> list[PublicKey]:
    """Every key set in a PEM text: each `PUBLIC KEY` block is a key, and an SM2 block right after an Ed25519
    block joins it as one `ed25519+sm2` set (how `public_pem` writes a dual set). A text without PEM is a raw
    Ed25519 key in base64. SignatureError if a block is not a usable key."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    blocks = [(m.group(1), m.group(2)) for m in _PEM_BLOCK.finditer(raw)]
    if not blocks:
        try:
            return [Ed25519PublicKey.from_public_bytes(base64.b64decode(raw.strip()))]
        except ValueError as exc:
            raise SignatureError(f"not a PEM public key nor a raw Ed25519 key in base64: {exc}") from None
    keys: list[PublicKey] = []
    for label, body in blocks:
        if label != b"PUBLIC KEY":
            raise SignatureError(f"a {label.decode('ascii', 'replace')} block where a PUBLIC KEY was expected")
        try:
            part = _public_part(base64.b64decode(b"".join(body.split()), validate=True))
        except ValueError as exc:
            raise SignatureError(f"unreadable public key block: {exc}") from None
        if isinstance(part, Sm2PublicKey) and keys and isinstance(keys[-1], Ed25519PublicKey):
            keys[-1] = DualPublicKey(keys[-1], part)
        else:
            keys.append(part)
    return keys


def load_public_key(data: bytes | str) -> PublicKey:
    """The one key set a PEM text (or raw base64 Ed25519 key) holds."""
    keys = load_public_keys(data)
    if len(keys) != 1:
        raise SignatureError(f"expected one key set, found {len(keys)}")
    return keys[0]


def genesis_text(key: PublicKey) -> str:
    """How the catalog records the genesis key: an Ed25519 key raw in base64 (as always), any other set as PEM."""
    if isinstance(key, Ed25519PublicKey):
        return _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return public_pem(key)


# -- private key sets ---------------------------------------------------------------------------------

def generate(suite: str) -> tuple[PrivateKey, ...]:
    if suite not in SUITES:
        raise SignatureError(f"unknown crypto suite {suite!r}; use one of {', '.join(SUITES)}")
    return tuple(Ed25519PrivateKey.generate() if name == ED25519 else Sm2PrivateKey.generate()
                 for name in suite.split("+"))


def public_of(private: Sequence[PrivateKey]) -> PublicKey:
    pubs = [p.public_key() for p in private]
    if len(pubs) == 2 and isinstance(pubs[0], Ed25519PublicKey) and isinstance(pubs[1], Sm2PublicKey):
        return DualPublicKey(pubs[0], pubs[1])
    if len(pubs) != 1:
        raise SignatureError("a key set is one Ed25519 key, one SM2 key, or an Ed25519 key then an SM2 key")
    return pubs[0]


def private_pem(private: Sequence[PrivateKey]) -> bytes:
    out = []
    for key in private:
        if isinstance(key, Ed25519PrivateKey):
            out.append(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        else:
            out.append(_pem("PRIVATE KEY", key.pkcs8_der()).encode("ascii"))
    return b"".join(out)


def load_private_pem(data: bytes) -> tuple[PrivateKey, ...]:
    """The key set of a private key file (PKCS#8 blocks, Ed25519 first). SignatureError if unusable."""
    keys: list[PrivateKey] = []
    for label, body in (m.groups() for m in _PEM_BLOCK.finditer(data)):
        if label != b"PRIVATE KEY":
            raise SignatureError(f"a {label.decode('ascii', 'replace')} block where a PRIVATE KEY was expected")
        der = base64.b64decode(b"".join(body.split()))
        if der.startswith(_SM2_PRIV_HEAD[:len(_SM2_PRIV_HEAD) - 9]):
            keys.append(Sm2PrivateKey.from_pkcs8(der))
            continue
        loaded = serialization.load_der_private_key(der, password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise SignatureError("private key is neither Ed25519 nor SM2")
        keys.append(loaded)
    public_of(keys)   # a valid set
    return tuple(keys)


# -- documents ----------------------------------------------------------------------------------------

SIG_FIELDS = ("sig", "sm2_sig")


def _sm2_bytes(doc: dict[str, Any], encode: Callable[[dict[str, Any]], bytes]) -> bytes:
    return encode({k: v for k, v in doc.items() if k not in SIG_FIELDS})


def _ed_bytes(doc: dict[str, Any], encode: Callable[[dict[str, Any]], bytes]) -> bytes:
    return encode({k: v for k, v in doc.items() if k != "sig"})


def sign_document(doc: dict[str, Any], private: Sequence[PrivateKey],
                  encode: Callable[[dict[str, Any]], bytes] = canonical_json) -> dict[str, Any]:
    """A copy of `doc` signed by the key set: `key_id`, then `sm2_key_id` and `sm2_sig`, then `sig` (module
    docstring). Signatures already on `doc` are replaced."""
    public = public_of(private)
    body = {k: v for k, v in doc.items() if k not in (*SIG_FIELDS, "sm2_key_id")}
    body["key_id"] = key_id_of(public)
    for key in private:
        if isinstance(key, Sm2PrivateKey):
            body["sm2_key_id"] = key.public_key().key_id
            body["sm2_sig"] = _b64(key.sign(_sm2_bytes(body, encode)))
    for key in private:
        if isinstance(key, Ed25519PrivateKey):
            body["sig"] = _b64(key.sign(_ed_bytes(body, encode)))
    return body


def _decoded(doc: dict[str, Any], field: str) -> bytes:
    value = doc.get(field)
    if not isinstance(value, str):
        raise SignatureError("document has no signature" if field == "sig" else f"document has no {field}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise SignatureError(f"{field} is not base64") from None


def verify_document(doc: dict[str, Any], key: PublicKey,
                    encode: Callable[[dict[str, Any]], bytes] = canonical_json) -> None:
    """SignatureError unless every key of the set `key` signed `doc`. A single key of a dual set checks its
    own signature alone (an Ed25519 key: `key_id` and `sig`; an SM2 key: `sm2_key_id` and `sm2_sig`)."""
    for part in parts(key):
        if isinstance(part, Ed25519PublicKey):
            if doc.get("key_id") != _ed_id(part):
                raise SignatureError(f"document signed by {str(doc.get('key_id'))[:80]!r}, expected {key_id_of(key)}")
            try:
                part.verify(_decoded(doc, "sig"), _ed_bytes(doc, encode))
            except InvalidSignature:
                raise SignatureError("signature does not match the document (altered or forged)") from None
        else:
            if doc.get("sm2_key_id") != part.key_id:
                raise SignatureError(f"document signed by SM2 key {str(doc.get('sm2_key_id'))[:80]!r} "
                                     f"(key_id {str(doc.get('key_id'))[:80]!r}), expected {part.key_id}")
            if not part.verify(_decoded(doc, "sm2_sig"), _sm2_bytes(doc, encode)):
                raise SignatureError("SM2 signature does not match the document (altered or forged)")
