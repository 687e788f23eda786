"""Docking: turns docked recorder volumes into sessions, tagged files and ingest work.

One module per responsibility, so each can be read (and tested) alone:
- `service`   `DockService`, the dock drivers' listener: one worker per docked volume; the docks' health.
- `worker`    `VolumeWorker`, the thread of one slot: sequences the steps below, owns none of them.
- `discovery` identification, the walk of a volume, the settle rule, a new file's catalog row.
- `policy`    what each failure means (go on, stop the pass) and every alarm text a dock raises.
- `clearing`  verify-then-clear: a recorder's original is deleted only after the receiver confirmed
              its copy, and only if the dock's `clear_after_sync` says so (G2).
- `slots`     `SlotState` and `SlotStatus`, the state two threads share, behind one locked setter.
The SQL they need is in `edge_agent.catalog.docking`.
"""

from edge_agent.sources.docks.policy import UNDOCK_GRACE_S
from edge_agent.sources.docks.service import DockService
from edge_agent.sources.docks.slots import SlotState, SlotStatus
from edge_agent.sources.docks.worker import DockContext, VolumeWorker

__all__ = ["UNDOCK_GRACE_S", "DockContext", "DockService", "SlotState", "SlotStatus", "VolumeWorker"]
