"""Sync: the uplink that carries sealed files to the platform (wire protocol v1, DESIGN.md section 5)."""

from edge_agent.sync.uplink import SYNC_NOW_META, Uplink

__all__ = ["SYNC_NOW_META", "Uplink"]
