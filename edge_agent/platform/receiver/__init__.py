"""The reference receiver (central side): `edge-agent receiver run --config receiver.toml`."""

from edge_agent.platform.receiver.fsck import Finding, FsckReport, check_store
from edge_agent.platform.receiver.service import KeyRing, Receiver
from edge_agent.platform.receiver.store import ChunkStore

__all__ = ["ChunkStore", "Finding", "FsckReport", "KeyRing", "Receiver", "check_store"]
