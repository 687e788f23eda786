"""The agent's signing key: show it (to enrol it on the platform) and rotate it."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.catalog import audit as audit_log
from edge_agent.evidence.manifest import begin_rotation, finish_rotation
from edge_agent.ingest import Sealer
from edge_agent.services.workspace import Result, ServiceError, Workspace


@dataclass(frozen=True)
class KeyInfo(Result):
    agent_id: str
    key_id: str
    public_key_pem: str
    public_key_b64: str


@dataclass(frozen=True)
class Rotation(Result):
    old_key_id: str
    key_id: str
    public_key_pem: str


def show(ws: Workspace) -> KeyInfo:
    """The current key (made, with the data dir, if the agent never ran)."""
    ws.layout.create()
    key = ws.key
    return KeyInfo(ws.config.agent.id, key.key_id, key.public_pem(), key.public_raw_b64())


def rotate(ws: Workspace, *, reason: str | None) -> Rotation:
    """Replace the signing key. The old key signs a `key_rotation` document naming the new one, so the chain
    of trust continues; its public half stays in keys/retired/ so earlier documents still verify. A crash
    between the two steps is finished by the next key load. The running daemon keeps the old key until it
    is restarted."""
    if not reason:
        raise ServiceError("say why the key is rotated: --reason (it goes into the signed rotation record and the "
                           "audit log)")
    catalog, layout = ws.catalog, ws.layout
    old, new = begin_rotation(layout.keys)
    body = {"old_key_id": old.key_id, "new_key_id": new.key_id, "new_public_key": new.public_pem(),
            "reason": reason, "by": audit_log.os_user()}
    path = layout.data_dir / "rotations" / f"{new.key_id.split(':', 1)[1]}.json"
    Sealer(catalog, old, layout, ws.config).sign_document("key_rotation", new.key_id, body, path)
    finish_rotation(layout.keys)
    catalog.audit("keys.rotated", subject=new.key_id, reason=reason, detail={"old_key_id": old.key_id})
    return Rotation(old.key_id, new.key_id, new.public_pem())
