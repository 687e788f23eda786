"""`edge-agent receiver run|keys`: the reference receiver (central side of the wire protocol) and its receipt key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import ReceiverConfig
from edge_agent.services.workspace import Result, ServiceError


@dataclass(frozen=True)
class ReceiptKeyInfo(Result):
    """The receiver's receipt key: what every agent pins (`mqtt.receiver_keys`)."""

    key_id: str
    public_key_pem: str
    path: Path                       # the public key's file, to copy onto the agents
    old_key_id: str | None = None    # after a rotation: the key it replaced


def serve(config: ReceiverConfig) -> None:
    """Run a receiver until SIGTERM. Several may share one store and a shared subscription."""
    from edge_agent.platform.receiver import Receiver  # the platform side: not loaded by every CLI command

    try:
        receiver = Receiver(config)
    except OSError as exc:
        raise ServiceError(f"cannot open the receiver store {config.receiver.store_dir}: {exc.strerror}",
                           code=2) from exc
    receiver.run_forever()


def receipt_key(config: ReceiverConfig, *, rotate: bool = False) -> ReceiptKeyInfo:
    """The receipt key (made if the receiver never ran); with `rotate`, a new one replaces it. A running receiver
    signs with a rotated key after its restart: pin the new public key on every agent before that."""
    from edge_agent.platform.receiver.receipts import PUB_FILE, ReceiverKey

    keys_dir = config.receiver.receipt_key_dir
    try:
        old, key = ReceiverKey.rotate(keys_dir) if rotate else (None, ReceiverKey.load_or_create(keys_dir))
    except OSError as exc:
        raise ServiceError(f"cannot use the receipt key in {keys_dir}: {exc}", code=2) from exc
    return ReceiptKeyInfo(key.key_id, key.public_pem(), keys_dir / PUB_FILE, old.key_id if old else None)
