"""Sync: the uplink that carries sealed files to the platform (wire protocol v1, DESIGN.md section 5).

`transfer` is one file's protocol as a pure state machine; `sender` puts the files in flight on the wire
(window, reader pool, bandwidth cap); `outbox` relays queued events; `ledger` is the catalog's side
(what to send, verdicts); `commands` authenticates platform commands; `status` and `sync_now` are the
agent's presence and the CLI's `sync now`; `uplink` composes them on one MQTT connection.
"""

from edge_agent.sync.sync_now import SYNC_NOW_META
from edge_agent.sync.uplink import Uplink

__all__ = ["SYNC_NOW_META", "Uplink"]
