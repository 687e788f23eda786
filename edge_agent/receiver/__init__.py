"""The reference receiver (central side): `edge-agent receiver run --config receiver.toml`."""

from edge_agent.receiver.service import KeyRing, Receiver
from edge_agent.receiver.store import ChunkStore

__all__ = ["ChunkStore", "KeyRing", "Receiver"]
