"""The agents' public keys at the receiver: the keys an operator enrolled, and the keys the receiver learned
from the agents' signed rotation documents.

- Enrolled: `<keys_dir>/<agent_id>.pem` (PEM, several blocks allowed, or raw base64; an SM2 block right
  after an Ed25519 block is one `ed25519+sm2` key set, as `edge-agent keys show` prints it), the operator's file,
  reread when it changes and never written by the receiver.
- Learned: `<learned_dir>/<agent_id>.json` (in the receiver's store, `keys/learned/`), written durably by
  `KeyRing.learn_rotation` and only there. It lists the rotations learned, in order: old key id, new key id
  and public key, the SHA-256 of the rotation document's canonical bytes, its place in the agent's chain
  when the caller knows it (`chain_seq`) and when it was learned.

**Learning a rotation.** `learn_rotation(agent_id, rotation_doc, chain_seq=None)` is what the receiver's chain
store calls when it holds a `key_rotation` document in an agent's chain (the document's `prev` already
checked against the chain). The document must be a `key_rotation` of that agent, hand over from the agent's
key in force at this receiver (an enrolled key no rotation retired, or the newest learned key) and be signed
by it; its `new_public_key` must have its `new_key_id`. Then the new key is enrolled (durably, before the call
returns) and the old one is **retired**. Learning the same rotation again is a no-op; any other document is
refused with `KeyRefused` naming why, and nothing changes.

**Retired keys.** From the moment a rotation is learned, a document signed by its old key is refused
(`key_for` raises `KeyRefused`: "retired by the rotation to … learned at …") — unless the caller places the
document in the agent's chain before the rotation (`chain_seq` lower than the rotation's, both known to the
chain store): a file sealed before the rotation and sent after it is not refused for its older key. Without
a `chain_seq` for the document, "after" means after the receiver learned the rotation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.clock import iso_ms, now_ms
from edge_agent.durable import atomic_write, exclusive_lock, make_dirs
from edge_agent.evidence.keys import ROTATION_KIND, handed_over_key
from edge_agent.evidence.manifest import (
    ManifestError,
    canonical_json,
    key_id_of,
    load_public_key,
    public_pem,
)
from edge_agent.evidence.suites import PublicKey, load_public_keys

log = logging.getLogger(__name__)

class KeyRefused(ManifestError):
    """A document's key is not one to accept from this agent (unknown, not enrolled, retired), or a rotation
    document cannot be learned; `str()` says why."""


@dataclass(frozen=True)
class Learned:
    old_key_id: str
    new_key_id: str
    new_key: PublicKey
    rotation_sha256: str
    chain_seq: int | None
    learned_ms: int


@dataclass(frozen=True)
class AgentKeys:
    enrolled: dict[str, PublicKey]
    learned: tuple[Learned, ...]

    @property
    def all(self) -> dict[str, PublicKey]:
        return {**self.enrolled, **{r.new_key_id: r.new_key for r in self.learned}}

    def retired_by(self, key_id: str) -> Learned | None:
        return next((r for r in self.learned if r.old_key_id == key_id), None)

    def in_force(self) -> set[str]:
        """The keys a rotation may hand over from: the newest learned key, else every enrolled key."""
        if self.learned:
            return {self.learned[-1].new_key_id}
        return set(self.enrolled)


class KeyRing:
    """Enrolled and learned public keys of every agent (module docstring); thread-safe."""

    def __init__(self, keys_dir: Path, learned_dir: Path | None = None):
        self.keys_dir = Path(keys_dir)
        self.learned_dir = None if learned_dir is None else Path(learned_dir)
        self._cache: dict[str, tuple[tuple[int, int], AgentKeys]] = {}
        self._lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------------

    def key_for(self, agent_id: str, key_id: object, *, chain_seq: int | None = None) -> PublicKey:
        """The public key to check a document of `agent_id` signed by `key_id` against. KeyRefused if the agent
        is not enrolled, or the key was retired by a learned rotation and the document is not placed before
        it in the agent's chain (`chain_seq`, when the caller knows it)."""
        keys = self._agent(agent_id)
        known = keys.all
        if not known:
            raise KeyRefused(f"agent {agent_id} is not enrolled: no public key {self.keys_dir / (agent_id + '.pem')}")
        if not isinstance(key_id, str) or key_id not in known:
            return next(iter(known.values()))   # verify_signature names the key it expected
        retired = keys.retired_by(key_id)
        if retired is not None and not (chain_seq is not None and retired.chain_seq is not None
                                        and chain_seq < retired.chain_seq):
            raise KeyRefused(f"signed by {key_id}, retired by the agent's rotation to {retired.new_key_id} "
                             f"(learned {iso_ms(retired.learned_ms)}): a document signed after the rotation "
                             "must carry the new key")
        return known[key_id]

    def retired(self, agent_id: str) -> set[str]:
        """The agent's key ids retired by the rotations learned."""
        return {r.old_key_id for r in self._agent(agent_id).learned}

    # -- learning ------------------------------------------------------------------------------------

    def learn_rotation(self, agent_id: str, rotation_doc: dict[str, Any], *, chain_seq: int | None = None) -> str:
        """Learn the key `rotation_doc` hands over to (module docstring); returns the new key id. KeyRefused
        (nothing changed) if it is not a rotation of this agent's key in force signed by that key."""
        if self.learned_dir is None:
            raise KeyRefused("this key ring has no store for learned keys (learned_dir)")
        if rotation_doc.get("type") != ROTATION_KIND or rotation_doc.get("agent_id") != agent_id:
            raise KeyRefused(f"not a key_rotation document of agent {agent_id}")
        digest = hashlib.sha256(canonical_json(rotation_doc)).hexdigest()
        make_dirs(self.learned_dir, mode=0o750)
        # Receivers sharing the store learn one rotation at a time.
        with self._lock, exclusive_lock(self.learned_dir / ".lock"):
            keys = self._agent(agent_id, fresh=True)
            if any(r.rotation_sha256 == digest for r in keys.learned):
                return str(rotation_doc["new_key_id"])
            old = rotation_doc.get("old_key_id")
            if not isinstance(old, str) or old not in keys.in_force():
                raise KeyRefused(f"hands over from {str(old)[:80]!r}, but {agent_id}'s key in force here is "
                                 f"{', '.join(sorted(keys.in_force())) or 'none'}: enrol it, or learn the "
                                 "rotations before this one first")
            try:
                new = handed_over_key(rotation_doc, keys.all[old])
            except ManifestError as exc:
                raise KeyRefused(f"rotation document from {old} refused: {exc}") from None
            learned = [*keys.learned, Learned(old, key_id_of(new), new, digest, chain_seq, now_ms())]
            self._write(agent_id, learned)
        log.info("key rotation learned agent=%s old=%s new=%s chain_seq=%s", agent_id, old, key_id_of(new),
                 chain_seq)
        return key_id_of(new)

    def _write(self, agent_id: str, learned: list[Learned]) -> None:
        assert self.learned_dir is not None
        body = {"agent_id": agent_id, "rotations": [
            {"old_key_id": r.old_key_id, "new_key_id": r.new_key_id, "new_public_key": public_pem(r.new_key),
             "rotation_sha256": r.rotation_sha256, "chain_seq": r.chain_seq, "learned_ms": r.learned_ms}
            for r in learned]}
        atomic_write(self._learned_path(agent_id), json.dumps(body, indent=2).encode("utf-8"), mode=0o640)
        self._cache.pop(agent_id, None)

    # -- files ---------------------------------------------------------------------------------------

    def _learned_path(self, agent_id: str) -> Path:
        assert self.learned_dir is not None
        return self.learned_dir / f"{agent_id}.json"

    def _agent(self, agent_id: str, *, fresh: bool = False) -> AgentKeys:
        pem = self.keys_dir / f"{agent_id}.pem"
        learned = self._learned_path(agent_id) if self.learned_dir is not None else None
        stamp = (_mtime(pem), _mtime(learned))
        cached = self._cache.get(agent_id)
        if cached is not None and cached[0] == stamp and not fresh:
            return cached[1]
        keys = AgentKeys(_enrolled(pem), _learned(learned) if learned is not None else ())
        self._cache[agent_id] = (stamp, keys)
        return keys


def _mtime(path: Path | None) -> int:
    try:
        return path.stat().st_mtime_ns if path is not None else -1
    except FileNotFoundError:
        return -1


def _enrolled(path: Path) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return keys
    except OSError as exc:
        log.error("enrolled key unreadable path=%s error=%s", path, exc)
        return keys
    try:
        # An SM2 block right after an Ed25519 block is one `ed25519+sm2` key set (evidence/suites.py).
        for key in load_public_keys(text):
            keys[key_id_of(key)] = key
    except (ValueError, ManifestError) as exc:
        log.error("enrolled key unusable path=%s error=%s", path, exc)
        return {}
    return keys


def _learned(path: Path) -> tuple[Learned, ...]:
    try:
        body = json.loads(path.read_bytes())
        return tuple(Learned(r["old_key_id"], r["new_key_id"], load_public_key(r["new_public_key"]),
                             r["rotation_sha256"], r["chain_seq"], r["learned_ms"]) for r in body["rotations"])
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, KeyError, TypeError, ManifestError) as exc:
        # The receiver wrote it atomically; unreadable means damaged. Every document of the agent is refused
        # (loudly) rather than a retired key accepted again.
        raise KeyRefused(f"learned keys {path} unreadable ({exc}): restore it from the store's backup") from None
