"""The reference receiver (central side): `edge-agent receiver run --config receiver.toml`."""

from edge_agent.platform.receiver.fsck import Finding, FsckReport, check_store
from edge_agent.platform.receiver.keyring import KeyRefused, KeyRing
from edge_agent.platform.receiver.service import Receiver
from edge_agent.platform.receiver.store import ChunkStore

__all__ = ["ChunkStore", "Finding", "FsckReport", "KeyRefused", "KeyRing", "Receiver", "check_store"]
