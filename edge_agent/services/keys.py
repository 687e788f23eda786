"""The agent's signing key: show it (to enrol it on the platform) and rotate it.

`rotate` is done by the data dir's owner (`layout.DataDirLock`) and no one else, as `import` is:
- a daemon runs (it holds the lock): the request goes to it over its control socket (`ops/control.py`); its
  sealer chains the rotation document and swaps its key under its lock, so it signs with the new key at once
  and never with the old one after the rotation document; `keys.rotated` is audited as the calling OS user
  (from the kernel);
- no daemon runs: this process takes the lock, settles a rotation a crash interrupted, and rotates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_agent.catalog import audit as audit_log
from edge_agent.evidence.keys import KEY_IN_FORCE
from edge_agent.evidence.manifest import (
    AgentKey,
    ManifestError,
    key_id_of,
    load_public_key,
    public_pem,
    recover_rotation,
)
from edge_agent.i18n import N_
from edge_agent.ingest import Sealer
from edge_agent.layout import DataDirLock, DataDirOwned
from edge_agent.ops import control
from edge_agent.ops.control import RotateArgs
from edge_agent.services.workspace import TAKES_NO_REQUESTS, Result, ServiceError, Workspace


@dataclass(frozen=True)
class KeyInfo(Result):
    agent_id: str
    key_id: str
    public_key_pem: str
    public_key_b64: str
    suite: str = "ed25519"   # [crypto] suite of this key set (docs/PROTOCOL.md "Crypto suites")


@dataclass(frozen=True)
class Rotation(Result):
    old_key_id: str
    key_id: str
    public_key_pem: str
    via: str            # "daemon" (the running daemon rotated and signs with the new key now) or "cli"


def show(ws: Workspace) -> KeyInfo:
    """The current key (made, with the data dir, if the agent never ran)."""
    ws.layout.create()
    key = ws.key
    return KeyInfo(ws.config.agent.id, key.key_id, key.public_pem(), key.public_raw_b64(), key.suite)


def rotate(ws: Workspace, *, reason: str | None) -> Rotation:
    """Replace the signing key. The old key signs a `key_rotation` document naming the new one (and carrying
    its public key), chained, so the chain of trust continues from the genesis key (evidence/keys.py)."""
    if not reason:
        raise ServiceError(N_("say why the key is rotated: --reason (it goes into the signed rotation record and "
                              "the audit log)"))
    layout = ws.layout.open()
    args = RotateArgs(reason, user=audit_log.os_user())
    try:
        lock = DataDirLock.acquire(layout, command="keys rotate")
    except DataDirOwned as owned:
        try:
            result = control.request(layout.control_socket, "keys_rotate", args.as_wire())
        except control.ControlUnavailable as exc:
            raise ServiceError(TAKES_NO_REQUESTS, code=2, owner=owned, error=exc) from None
        except control.ControlError as exc:
            raise ServiceError(N_("the daemon (pid {pid}) refused the rotation: {error}"), pid=owned.pid,
                               error=exc) from None
        return _rotation(result, "daemon")
    with lock:
        recover_rotation(layout.keys, ws.catalog.meta.get(KEY_IN_FORCE))   # a rotation a crash interrupted
        sealer = Sealer(ws.catalog, AgentKey.load_or_create(layout.keys, ws.config.crypto.suite), layout, ws.config)
        old, new = sealer.rotate_key(reason=reason, actor=audit_log.os_user(), via="cli")
        return Rotation(old, new, sealer.key.public_pem(), "cli")


def _rotation(result: dict[str, Any], via: str) -> Rotation:
    try:
        key = load_public_key(str(result.get("public_key_pem")))   # what the daemon said, as a key
    except (ValueError, ManifestError) as exc:
        raise ServiceError(N_("the daemon's answer holds no usable public key ({error}); see its log"),
                           error=exc) from None
    return Rotation(str(result.get("old_key_id")), key_id_of(key), public_pem(key), via)
