"""The agent's key history: which public keys are trusted, and from when, by the signed rotation chain alone.

The agent's first signing key (the **genesis key**) is recorded in the catalog when the first document is
chained (meta `genesis_key`: the raw public key, base64). Every later key is trusted only because a
`key_rotation` document in the agent's document chain, signed by the key in force before it, names it
(`new_key_id`) and carries it (`new_public_key`, PEM). Walking those documents in chain order from the
genesis key gives every trusted key and the chain position from which each is the one in force. Nothing
else makes a key trusted: a `*.pub` in `keys/retired/` or anywhere else is not read.

- `key_history(catalog, layout)` builds the `KeyHistory` (with the problems met: a rotation document that
  does not verify stops the walk, and no key named after it is trusted);
- `KeyHistory.public_for(key_id)` is the public key of a trusted key, else `ManifestError` naming the key;
- `KeyHistory.in_force_at(seq)` is the key that must have signed chain document `seq`.

A catalog made before the genesis key was recorded adopts it once (`legacy_genesis`): the key that signed
chain document 1, found as the current key or as the public key in `keys/retired/` whose key id (SHA-256 of
the raw key) is the one that document names; the Sealer then records it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent.evidence.manifest import (
    RETIRED_DIR,
    AgentKey,
    ManifestError,
    key_id_of,
    load_public_key,
    read_document,
    verify_signature,
)
from edge_agent.evidence.suites import PublicKey

if TYPE_CHECKING:
    from edge_agent.catalog import Catalog
    from edge_agent.layout import StoreLayout

GENESIS_KEY = "genesis_key"          # meta: the first key: raw Ed25519 in base64, or PEM (suites)
KEY_IN_FORCE = "signing_key_id"      # meta: the key that signs the next document (moved by a rotation)
ROTATION_KIND = "key_rotation"


@dataclass(frozen=True)
class Rotation:
    seq: int              # the rotation document's place in the chain (signed by `old_key_id`)
    old_key_id: str
    new_key_id: str
    path: str             # the rotation document, relative to the data dir


@dataclass(frozen=True)
class KeyHistory:
    """Every key the agent's signed rotation chain trusts, in order, and where each took over."""

    genesis_key_id: str | None
    keys: dict[str, PublicKey] = field(default_factory=dict)    # in order of rotation
    rotations: tuple[Rotation, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def current_key_id(self) -> str | None:
        return self.rotations[-1].new_key_id if self.rotations else self.genesis_key_id

    def describe(self) -> str:
        if self.genesis_key_id is None:
            return "no genesis key is recorded"
        return " -> ".join([f"genesis {self.genesis_key_id}", *(f"{r.new_key_id} (rotation at seq {r.seq})"
                                                                for r in self.rotations)])

    def public_for(self, key_id: object) -> PublicKey:
        """The public key of trusted `key_id`; ManifestError naming it otherwise."""
        if isinstance(key_id, str) and key_id in self.keys:
            return self.keys[key_id]
        raise ManifestError(f"signed by {str(key_id)[:80]!r}, a key not in this agent's signed key history "
                            f"({self.describe()}); a public key file (e.g. in keys/{RETIRED_DIR}/) is not trusted")

    def in_force_at(self, seq: int) -> str | None:
        """The key id that must sign chain document `seq` (a rotation document is signed by the old key)."""
        at = bisect.bisect_left([r.seq for r in self.rotations], seq)
        return self.rotations[at - 1].new_key_id if at else self.genesis_key_id


def key_history(catalog: Catalog, layout: StoreLayout) -> KeyHistory:
    """The trusted keys, by walking the chain's key_rotation documents from the recorded genesis key."""
    recorded = catalog.meta.get(GENESIS_KEY)
    problems: list[str] = []
    genesis: PublicKey | None
    if recorded is not None:
        genesis = load_public_key(recorded)
    else:
        genesis = legacy_genesis(catalog, layout)
        if genesis is None and catalog.documents.head() is not None:
            problems.append("no genesis key is recorded and none can be adopted (meta genesis_key is missing): "
                            "no signature can be trusted; restore the catalog from a backup")
    if genesis is None:
        return KeyHistory(None, problems=tuple(problems))
    in_force = key_id_of(genesis)
    keys = {in_force: genesis}
    rotations: list[Rotation] = []
    for row in catalog.documents.of_kind(ROTATION_KIND):
        try:
            new = _handed_over(layout, row["path"], in_force, keys[in_force])
        except ManifestError as exc:
            problems.append(f"key_rotation {row['doc_id']} (chain seq {row['seq']}): {exc}; no key it or a later "
                            "rotation names is trusted")
            break
        new_id = key_id_of(new)
        keys[new_id] = new
        rotations.append(Rotation(row["seq"], in_force, new_id, row["path"]))
        in_force = new_id
    return KeyHistory(key_id_of(genesis), keys, tuple(rotations), tuple(problems))


def _handed_over(layout: StoreLayout, path: str, in_force: str, public: PublicKey) -> PublicKey:
    """The new key a rotation document hands over to, once it is checked against the key in force."""
    doc = read_document(layout.data_dir / path)
    if doc.get("type") != ROTATION_KIND or doc.get("old_key_id") != in_force:
        raise ManifestError(f"hands over from {str(doc.get('old_key_id'))[:80]!r}, but the key in force was "
                            f"{in_force}")
    return handed_over_key(doc, public)


def handed_over_key(doc: dict[str, Any], old: PublicKey) -> PublicKey:
    """The new key a `key_rotation` document hands over to, once it is signed by `old` (the key it hands over
    from; the caller has matched `old_key_id`) and its `new_public_key` has its `new_key_id`. The one rule for
    a rotation, at the agent (its key history) and at the receiver (learning a rotation); ManifestError says
    what does not hold."""
    verify_signature(doc, old)
    try:
        new = load_public_key(str(doc["new_public_key"]))
    except (KeyError, ValueError) as exc:
        raise ManifestError(f"carries no usable new_public_key: {exc}") from None
    if key_id_of(new) != doc.get("new_key_id"):
        raise ManifestError(f"new_public_key is {key_id_of(new)}, not the new_key_id it names")
    return new


def legacy_genesis(catalog: Catalog, layout: StoreLayout, current: AgentKey | None = None) -> PublicKey | None:
    """For a catalog made before `genesis_key` was recorded: the key that signed chain document 1 (the
    current key, or the public key in keys/retired/ with exactly that key id). None for an empty chain."""
    chain = catalog.documents.of_kind(None, limit=1)
    if not chain:
        return current.public if current is not None else None
    try:
        first = read_document(layout.data_dir / chain[0]["path"]).get("key_id")
    except ManifestError:
        return None
    candidates = [current.public] if current is not None else []
    try:
        candidates.append(AgentKey.load_public(layout.keys))
    except (OSError, ValueError, ManifestError):
        pass
    for pub in sorted((layout.keys / RETIRED_DIR).glob("*.pub")):
        try:
            candidates.append(load_public_key(pub.read_bytes()))
        except (OSError, ValueError, ManifestError):
            continue
    return next((key for key in candidates if key_id_of(key) == first), None)
