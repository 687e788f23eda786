"""The reference receiver (central side): `edge-agent receiver run --config receiver.toml`."""

from edge_agent.platform.receiver.service import KeyRing, Receiver
from edge_agent.platform.receiver.store import ChunkStore

__all__ = ["ChunkStore", "KeyRing", "Receiver"]
