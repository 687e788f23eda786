"""`edge-agent receiver run`: the reference receiver (central side of the wire protocol)."""

from __future__ import annotations

from edge_agent.config import ReceiverConfig
from edge_agent.services.workspace import ServiceError


def serve(config: ReceiverConfig) -> None:
    """Run a receiver until SIGTERM. Several may share one store and a shared subscription."""
    from edge_agent.platform.receiver import Receiver  # the platform side: not loaded by every CLI command

    try:
        receiver = Receiver(config)
    except OSError as exc:
        raise ServiceError(f"cannot open the receiver store {config.receiver.store_dir}: {exc.strerror}",
                           code=2) from exc
    receiver.run_forever()
