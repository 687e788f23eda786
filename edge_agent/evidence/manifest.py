"""Signed documents: per-file manifests, docking-session manifests, annotations.

`file_manifest` and `session_manifest` build the bodies (the signed fields) of a file's and a docking
session's manifest from what the catalog holds; `ingest.seal` signs and chains them.

Canonical form is RFC 8785 (JCS) restricted to documents without floats, which
is exactly `json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` in UTF-8 (DESIGN.md section 4). Every document is signed
with the agent's key set over its canonical form without `sig`, and linked
to the agent's previous document by `prev` (SHA-256 of that document's
canonical bytes, signature included). Under the 国密 suites the key set also (or instead) signs with SM2
(evidence/suites.py, the one place that knows the signature fields).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.clock import iso_ms
from edge_agent.durable import atomic_write, fsync_dir, make_dirs
from edge_agent.evidence import suites
from edge_agent.evidence.suites import PrivateKey, PublicKey
from edge_agent.protocol.canonical import canonical_json as encode_canonical

if TYPE_CHECKING:
    from edge_agent.catalog import FileRecord
    from edge_agent.config import AgentSection

MANIFEST_VERSION = 1
GENESIS_PREV = "0" * 64


class ManifestError(Exception):
    """A signed document is malformed, has a bad signature, or breaks its chain."""


def canonical_json(doc: dict[str, Any]) -> bytes:
    """The canonical bytes of a signed document: the one encoder, refusing floats first."""
    _reject_floats(doc)
    return encode_canonical(doc)


def _reject_floats(value: Any, path: str = "$") -> None:
    if isinstance(value, float):
        raise ManifestError(f"{path}: signed documents hold no floats (got {value!r}); use integer ms")
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_floats(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _reject_floats(item, f"{path}[{i}]")


def document_hash(doc: dict[str, Any]) -> str:
    """SHA-256 of the canonical bytes of a whole signed document (this is what `prev` holds)."""
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def file_manifest(record: FileRecord, media: dict[str, Any], extras: Mapping[str, Any], *, agent: AgentSection,
                  model: str | None, serial: str | None, chunk_size: int) -> dict[str, Any]:
    """The signed fields of one file's manifest (without `prev`, `key_id`, `sig`): the file as the catalog
    holds it, its device's `model` and `serial`, its probed `media`, and the keys its source added at
    discovery (`extras`: a camera segment's camera and the gaps before it), which come last and win."""
    tz = agent.zone
    body = {
        "v": MANIFEST_VERSION,
        "type": "file",
        "file_id": record.file_id,
        "agent_id": agent.id, "site_id": agent.site, "unit": agent.unit,
        "source": {
            "kind": record.kind, "device_id": record.device_id, "model": model,
            "serial": serial, "slot": record.slot, "dock": record.dock,
            "original_path": record.original_path, "volume_label": record.volume_label,
        },
        "officer_id": record.officer_id, "case_id": record.case_id, "party": record.party,
        "recorded_start": iso_ms(record.recorded_start_ms, tz),
        "recorded_end": iso_ms(record.recorded_end_ms, tz),
        "recorded_start_ms": record.recorded_start_ms, "recorded_end_ms": record.recorded_end_ms,
        "ingested_at": iso_ms(record.ingested_at_ms, tz),
        "clock_offset_ms": record.clock_offset_ms,
        "size": record.size, "sha256": record.sha256,
        "chunk_size": chunk_size,
        "media": media,
        "retention": record.retention,
    }
    return {**body, **extras}


def session_manifest(session: Mapping[str, Any], files: Sequence[Mapping[str, Any]], tz: ZoneInfo,
                     volume_files: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The signed fields of a docking session's manifest: every file it brought that has been sealed (hash
    and size), and the original paths of the others. `files` are rows with file_id, original_path, sha256,
    size and state. `volume_files` (a docked volume's inventory) lists every entry found on the volume by
    `path` with its `status`: `collected` (file_id, sha256, size: its content is sealed, in this session or
    an earlier one), `uncollected` (file_id, reason), `pending`, `excluded` (the model's `rule`) or `refused`
    (`reason`); it is left out for sessions without one."""
    sealed = [r for r in files if r["sha256"] is not None and r["state"] not in ("discovered", "staged")]
    extra = {} if volume_files is None else {"volume_files": [dict(entry) for entry in volume_files]}
    # The recorder's own word at docking (GA/T 947.4 handshake), its clock offset read before any correction.
    if "recorder" in session.keys() and session["recorder"]:
        extra["recorder"] = json.loads(session["recorder"])
    return {**extra,
        "session_id": session["session_id"], "dock": session["dock"], "slot": session["slot"],
        "device_id": session["device_id"], "serial": session["serial"], "model": session["model"],
        "officer_id": session["officer_id"],
        "docked_at": iso_ms(session["docked_ms"], tz),
        "files": [{"file_id": r["file_id"], "sha256": r["sha256"], "size": r["size"],
                   "original_path": r["original_path"]} for r in sealed],
        "files_not_sealed": [r["original_path"] for r in files if r not in sealed],
    }


def key_id_of(public_key: PublicKey) -> str:
    return suites.key_id_of(public_key)


KEY_FILE = "agent_ed25519.pem"   # the key set in force, whatever its suite (the name predates SM2)
PUB_FILE = "agent_ed25519.pub"
NEXT_KEY_FILE = "agent_ed25519.next.pem"   # a rotation in progress (see begin_rotation)
RETIRED_DIR = "retired"                      # not read: retired keys are trusted through the rotation chain only


@dataclass(frozen=True)
class AgentKey:
    """The agent's signing key set (evidence/suites.py: one Ed25519 key, one SM2 key, or both), kept 0600 in
    data_dir/keys. Which keys verify which documents is the signed rotation chain's business
    (evidence/keys.py), not this file's."""

    private: PrivateKey | tuple[PrivateKey, ...]

    @property
    def privates(self) -> tuple[PrivateKey, ...]:
        return self.private if isinstance(self.private, tuple) else (self.private,)

    @property
    def public(self) -> PublicKey:
        return suites.public_of(self.privates)

    @property
    def suite(self) -> str:
        return suites.suite_of(self.public)

    @property
    def key_id(self) -> str:
        return key_id_of(self.public)

    def public_pem(self) -> str:
        return public_pem(self.public)

    def public_raw_b64(self) -> str:
        """The raw public key in base64 (an Ed25519 set's; an SM2 key's uncompressed point 04||x||y)."""
        first = suites.parts(self.public)[0]
        if isinstance(first, Ed25519PublicKey):
            return self.raw_b64(first)
        return base64.b64encode(b"\x04" + first.point).decode("ascii")

    @staticmethod
    def raw_b64(public: PublicKey) -> str:
        """How the catalog records the genesis key (`load_public_key` reads it back)."""
        return suites.genesis_text(public)

    def sign(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of `doc` with `key_id` and its suite's signatures set (evidence/suites.py)."""
        return suites.sign_document(doc, self.privates, canonical_json)

    def private_pem(self) -> bytes:
        return suites.private_pem(self.privates)

    @classmethod
    def generate(cls, suite: str = suites.DEFAULT_SUITE) -> AgentKey:
        return cls(suites.generate(suite))

    @classmethod
    def load_or_create(cls, keys_dir: Path, suite: str = suites.DEFAULT_SUITE) -> AgentKey:
        """Load the agent key, creating it (mode 0600, of `suite`) on first start. A rotation in progress is
        left alone: the data dir's owner finishes or drops it (`recover_rotation`); signers pick the key in
        force with `load_in_force`. A key of another suite than `suite` is loaded as it is: rotating it
        (`keys rotate`, or the daemon at start) changes the suite."""
        path = keys_dir / KEY_FILE
        if path.exists():
            return cls(_load_private(path))
        make_dirs(keys_dir, mode=0o700)
        os.chmod(keys_dir, 0o700)
        key = cls.generate(suite)
        atomic_write(path, key.private_pem(), mode=0o600)
        atomic_write(keys_dir / PUB_FILE, key.public_pem().encode("ascii"), mode=0o644)
        fsync_dir(keys_dir)
        return key

    @classmethod
    def load_in_force(cls, keys_dir: Path, key_id: str) -> AgentKey:
        """The private key with `key_id`: the key file, or the next key of a rotation whose document is
        chained but whose files are not yet swapped. ManifestError if neither is it."""
        for name in (KEY_FILE, NEXT_KEY_FILE):
            if (keys_dir / name).exists():
                key = cls(_load_private(keys_dir / name))
                if key.key_id == key_id:
                    return key
        raise ManifestError(f"the signing key in force is {key_id} (catalog), but {keys_dir} holds no such private "
                            "key: restore keys/ from the backup made at the rotation; nothing is signed meanwhile")

    @staticmethod
    def load_public(keys_dir: Path) -> PublicKey:
        """The current key's public half (agent_ed25519.pub), readable without the private key."""
        return load_public_key((keys_dir / PUB_FILE).read_bytes())


def public_pem(key: PublicKey) -> str:
    return suites.public_pem(key)


def _load_private(path: Path) -> tuple[PrivateKey, ...]:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    try:
        return suites.load_private_pem(path.read_bytes())
    except ValueError as exc:
        raise ManifestError(f"{path} is not a usable private key set ({exc}): restore keys/ from backup") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key file (the receiver's receipt key is loaded the same way)."""
    keys = _load_private(path)
    if len(keys) != 1 or not isinstance(keys[0], Ed25519PrivateKey):
        raise ManifestError(f"{path} is not an Ed25519 private key")
    return keys[0]


def begin_rotation(keys_dir: Path, suite: str = suites.DEFAULT_SUITE) -> AgentKey:
    """Step 1 of a rotation: write the next key (of `suite`) durably beside the current one and return it.
    The caller then signs and chains the `key_rotation` document with the old key, recording the new key as
    the one in force in the same transaction, and calls `finish_rotation`; `recover_rotation` settles a crash."""
    new = AgentKey.generate(suite)
    atomic_write(keys_dir / NEXT_KEY_FILE, new.private_pem(), mode=0o600)
    fsync_dir(keys_dir)
    return new


def finish_rotation(keys_dir: Path) -> None:
    """Step 2: the next key becomes the key; the old private key is gone (its public half is in the
    rotation chain: the old key is named by the rotation document and was recorded before it)."""
    nxt = keys_dir / NEXT_KEY_FILE
    key = AgentKey(_load_private(nxt))
    atomic_write(keys_dir / PUB_FILE, key.public_pem().encode("ascii"), mode=0o644)
    os.replace(nxt, keys_dir / KEY_FILE)
    fsync_dir(keys_dir)


def recover_rotation(keys_dir: Path, in_force: str | None) -> str | None:
    """Settle a rotation a crash interrupted (the data dir's owner only): finished if its document was
    chained (the next key is the one in force), dropped otherwise. Returns "finished", "dropped" or None."""
    nxt = keys_dir / NEXT_KEY_FILE
    if not nxt.exists():
        return None
    if in_force is not None and AgentKey(_load_private(nxt)).key_id == in_force:
        finish_rotation(keys_dir)
        return "finished"
    os.unlink(nxt)
    fsync_dir(keys_dir)
    return "dropped"


def load_public_key(pem_or_raw: bytes | str) -> PublicKey:
    """The key set of a PEM text (evidence/suites.py), or a raw Ed25519 key in base64."""
    try:
        return suites.load_public_key(pem_or_raw)
    except ValueError as exc:
        raise ManifestError(f"unusable public key: {exc}") from None


def verify_signature(doc: dict[str, Any], public_key: PublicKey) -> None:
    """Raise ManifestError unless `doc` carries a valid signature by every key of the set `public_key` (one
    key of a dual set checks its own signature alone)."""
    try:
        suites.verify_document(doc, public_key, canonical_json)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None


def write_document(path: Path, doc: dict[str, Any]) -> bytes:
    """Durably write a signed document in canonical form; return the bytes written."""
    data = canonical_json(doc)
    atomic_write(path, data, mode=0o444)
    return data


def read_document(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: unreadable document: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: not a JSON object")
    return doc
